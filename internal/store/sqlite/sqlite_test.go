package sqlite_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/sqlite"
	"github.com/warren-sh/warren/internal/store/storetest"
)

func open(tb testing.TB, path string) *sqlite.Store {
	tb.Helper()
	s, err := sqlite.Open(context.Background(), path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return open(t, filepath.Join(t.TempDir(), "warren.db"))
	})
}

func TestOpenCreatesPrivateWALFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "warren.db")
	s := open(t, path)
	if err := s.CreateTeam(context.Background(), &store.Team{ID: "a", Slug: "a"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"warren.db", "warren.db-wal"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("%s: %v (want a WAL-mode database)", name, err)
		}
		if mode := fi.Mode().Perm(); mode != 0o600 {
			t.Errorf("%s has mode %o, want 600", name, mode)
		}
	}
}

func TestOpenNeedsParentDirectory(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-dir")
	_, err := sqlite.Open(context.Background(), filepath.Join(missing, "warren.db"))
	if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "create it first") {
		t.Fatalf("Open in a missing directory: %v, want an error naming %s and saying to create it", err, missing)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Fatalf("Open created %s: %v", missing, err)
	}
}

func TestReopenKeepsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "warren.db")
	ctx := context.Background()
	s, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateTeam(ctx, &store.Team{ID: "a", Slug: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Migrations that already ran are skipped, and the rows are there.
	s2 := open(t, path)
	if _, err := s2.GetTeam(ctx, "a"); err != nil {
		t.Fatalf("team after reopen: %v", err)
	}
}

func BenchmarkListSandboxes1000(b *testing.B) {
	storetest.BenchmarkListSandboxes1000(b, open(b, filepath.Join(b.TempDir(), "warren.db")))
}
