// Package pgtest gives a test binary a Postgres database of its own: a fresh
// database in the server WARREN_TEST_DATABASE_URL names, or else a private
// server started from Debian's Postgres binaries (apt-get install -y
// postgresql) in a temporary directory, on a unix socket there and on
// 127.0.0.1. Call Start from TestMain and Stop when the tests are done; a
// private server left behind by a killed test binary is stopped and removed by
// the next Start.
package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvURL names the variable holding a postgres:// URL of a server to use
// instead of a private one. Its role must be allowed to create databases.
const EnvURL = "WARREN_TEST_DATABASE_URL"

// InstallHint is the command that installs the server binaries.
const InstallHint = "apt-get install -y postgresql"

// dirPrefix starts the name of a private server's temporary directory.
const dirPrefix = "warren-pgtest-"

// Server is one test binary's database.
type Server struct {
	url     *url.URL // the run's database
	dropURL string   // a maintenance database to drop it from; "" for a private server

	// A private server's directory, pg_ctl and the account it runs as.
	dir   string
	pgCtl string
	cred  *syscall.Credential

	schemas atomic.Int64
}

// Start returns a fresh database for this test binary.
func Start(ctx context.Context) (*Server, error) {
	if v := os.Getenv(EnvURL); v != "" {
		return startExternal(ctx, v)
	}
	return startPrivate(ctx)
}

// URL is the run's database.
func (s *Server) URL() string { return s.url.String() }

// Schema creates a fresh schema in the run's database and returns a URL whose
// search_path is that schema: an empty database for one test.
func (s *Server) Schema(tb testing.TB) string {
	tb.Helper()
	name := fmt.Sprintf("test_%d", s.schemas.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := exec1(ctx, s.URL(), "CREATE SCHEMA "+pgx.Identifier{name}.Sanitize()); err != nil {
		tb.Fatalf("create schema %s: %v", name, err)
	}
	u := *s.url
	q := u.Query()
	q.Set("search_path", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// Stop drops the run's database, or stops the private server and removes its
// directory.
func (s *Server) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if s.dir == "" {
		name := strings.TrimPrefix(s.url.Path, "/")
		return exec1(ctx, s.dropURL, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	}
	err := s.run(ctx, s.pgCtl, "stop", "-D", filepath.Join(s.dir, "data"), "-m", "fast", "-w")
	return errors.Join(err, os.RemoveAll(s.dir))
}

func startExternal(ctx context.Context, raw string) (*Server, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, fmt.Errorf("%s is not a postgres:// URL", EnvURL)
	}
	name := "warren_test_" + randomHex()
	if err := exec1(ctx, raw, "CREATE DATABASE "+name); err != nil {
		return nil, fmt.Errorf("create database %s in the server of %s: %w", name, EnvURL, err)
	}
	db := *u
	db.Path = "/" + name
	return &Server{url: &db, dropURL: raw}, nil
}

func startPrivate(ctx context.Context) (srv *Server, err error) {
	bin, err := serverBinaries()
	if err != nil {
		return nil, err
	}
	s := &Server{pgCtl: filepath.Join(bin, "pg_ctl")}
	if os.Geteuid() == 0 {
		// Postgres refuses to run as root.
		s.cred, err = postgresAccount()
		if err != nil {
			return nil, err
		}
	}
	s.reclaim(ctx)

	s.dir, err = os.MkdirTemp("", dirPrefix)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	// The owner file lets a later Start tell a leftover from a live run.
	if err := os.WriteFile(filepath.Join(s.dir, "owner"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, err
	}
	if s.cred != nil {
		if err := os.Chown(s.dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			return nil, err
		}
	}
	data := filepath.Join(s.dir, "data")
	if err := s.run(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--no-locale", "--no-sync"); err != nil {
		return nil, err
	}
	port, err := startServer(ctx, s, data)
	if err != nil {
		return nil, err
	}
	admin := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if err := exec1(ctx, admin, "CREATE DATABASE warren_test"); err != nil {
		return nil, fmt.Errorf("create database: %w", err)
	}
	s.url, _ = url.Parse(fmt.Sprintf("postgres://postgres@127.0.0.1:%d/warren_test?sslmode=disable", port))
	return s, nil
}

// startServer starts the private server on a free loopback port, trying
// again when another process takes the port first.
func startServer(ctx context.Context, s *Server, data string) (port int, err error) {
	for range 3 {
		port, err = freePort()
		if err != nil {
			return 0, err
		}
		// fsync off: the data dies with the test run anyway.
		opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off -c synchronous_commit=off "+
			"-c full_page_writes=off -c max_connections=200", port, s.dir)
		err = s.run(ctx, s.pgCtl, "start", "-D", data, "-l", filepath.Join(s.dir, "postgres.log"), "-w", "-t", "60",
			"-o", opts)
		if err == nil {
			return port, nil
		}
	}
	log, _ := os.ReadFile(filepath.Join(s.dir, "postgres.log"))
	return 0, fmt.Errorf("%w\nserver log:\n%s", err, log)
}

// serverBinaries is the bin directory of the newest Postgres Debian installed.
func serverBinaries() (string, error) {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(found) == 0 {
		return "", fmt.Errorf("no Postgres server binaries in /usr/lib/postgresql/*/bin: install them with `%s` "+
			"(or set %s to a server's postgres:// URL)", InstallHint, EnvURL)
	}
	version := func(p string) int {
		v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
		return v
	}
	newest := slices.MaxFunc(found, func(a, b string) int { return version(a) - version(b) })
	return filepath.Dir(newest), nil
}

// postgresAccount is the credential of the postgres account Debian creates.
func postgresAccount() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, the private Postgres server needs the postgres account, which "+
			"`%s` creates: %w", InstallHint, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// reclaim stops and removes private servers whose test binary is gone.
func (s *Server) reclaim(ctx context.Context) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "owner"))
		if err != nil {
			continue // not ours, or still being set up
		}
		pid, err := strconv.Atoi(string(b))
		if err != nil || alive(pid) {
			continue
		}
		s.run(ctx, s.pgCtl, "stop", "-D", filepath.Join(dir, "data"), "-m", "immediate", "-w")
		os.RemoveAll(dir)
	}
}

// alive reports whether process pid exists and is not a zombie (a killed
// test binary can linger as one until its new parent reaps it).
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	i := bytes.LastIndexByte(stat, ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] != 'Z'
}

// run runs a Postgres program as the server's account, in its directory.
func (s *Server) run(ctx context.Context, prog string, args ...string) error {
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Dir = os.TempDir()
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w\n%s", filepath.Base(prog), strings.Join(args, " "), err, out)
	}
	return nil
}

// exec1 runs one statement on the database at url.
func exec1(ctx context.Context, url, sql string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
