package postgres_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/postgres"
	"github.com/warren-sh/warren/internal/store/postgres/pgtest"
	"github.com/warren-sh/warren/internal/store/storetest"
)

// server is the test binary's database server (see pgtest).
var server *pgtest.Server

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	srv, err := pgtest.Start(ctx)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: postgres store tests need a Postgres server: %v\n", err)
		return 1
	}
	defer func() {
		if err := srv.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stop postgres: %v\n", err)
		}
	}()
	server = srv
	return m.Run()
}

func open(tb testing.TB, url string) *postgres.Store {
	tb.Helper()
	s, err := postgres.Open(context.Background(), url)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, server.Schema(t)) })
}

func TestConcurrentOpensMigrateOnce(t *testing.T) {
	url := server.Schema(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			s, err := postgres.Open(context.Background(), url)
			if err == nil {
				s.Close()
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Open of one schema: %v", err)
		}
	}
}

func TestReopenKeepsData(t *testing.T) {
	url := server.Schema(t)
	ctx := context.Background()
	s, err := postgres.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateTeam(ctx, &store.Team{ID: "a", Slug: "a"}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := open(t, url).GetTeam(ctx, "a"); err != nil {
		t.Fatalf("team after reopen: %v", err)
	}
}

func TestOpenErrorHidesPassword(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, url := range []string{
		"postgres://warren:s3cret-pw@127.0.0.1:1/warren?sslmode=disable&connect_timeout=2", // nothing listens
		"postgres://warren:s3cret-pw@127.0.0.1:1/warren?sslmode=bogus",
	} {
		_, err := postgres.Open(ctx, url)
		if err == nil {
			t.Fatalf("Open(%s) succeeded", url)
		}
		if strings.Contains(err.Error(), "s3cret-pw") {
			t.Fatalf("Open error shows the password: %v", err)
		}
	}
}

func BenchmarkListSandboxes1000(b *testing.B) {
	storetest.BenchmarkListSandboxes1000(b, open(b, server.Schema(b)))
}

func TestOpenWithPoolOfOne(t *testing.T) {
	// The migration lock holds a pooled connection; migrating must not wait
	// for a second one.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := postgres.Open(ctx, server.Schema(t)+"&pool_max_conns=1")
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}
