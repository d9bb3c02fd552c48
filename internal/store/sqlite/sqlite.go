// Package sqlite is the embedded store.Store: one SQLite file (modernc.org's
// pure-Go SQLite), for a warren that runs on one host.
//
// The file is in WAL mode, so readers never wait for the writer. All writes go
// through a single connection: SQLite allows one writer at a time anyway, and
// queuing writers on that connection (in Go, in arrival order) instead of in
// SQLite's busy handler keeps UpdateSandbox transactions strictly serial.
// Write transactions begin IMMEDIATE, taking the write lock up front, so a
// second process on the same file waits (busy_timeout) instead of failing on a
// lock upgrade.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/pressly/goose/v3"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
	"github.com/warren-sh/warren/internal/store/migrations"
)

// busyTimeout is how long a statement waits for another process's lock.
const busyTimeout = 10 * time.Second

// Store is a store.Store on a SQLite file.
type Store struct {
	write *sql.DB // one connection; see the package comment
	read  *sql.DB // query-only connections
}

var _ store.Store = (*Store)(nil)

// Open opens (creating it, mode 0600, when missing) the SQLite database at
// path and brings its schema up to date. The parent directory must exist.
func Open(ctx context.Context, path string) (*Store, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", path, err)
	}
	dir := filepath.Dir(abs)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("open sqlite store %s: directory %s does not exist; create it first", abs, dir)
	}
	// SQLite would create the file with the umask's mode; the store holds key
	// hashes and agent tokens, so create it private. The -wal and -shm files
	// SQLite adds take the database file's mode.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store: %w", err)
	}
	f.Close()

	write, err := sql.Open("sqlite", dsn(abs, url.Values{
		"_journal_mode": {"WAL"},
		// NORMAL is durable in WAL mode except for the last commits before a
		// power loss, which a restart's reconcile recovers from.
		"_synchronous": {"NORMAL"},
		"_txlock":      {"immediate"},
	}))
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	write.SetMaxOpenConns(1)
	write.SetMaxIdleConns(1)
	write.SetConnMaxLifetime(0)
	write.SetConnMaxIdleTime(0)

	if err := migrate(ctx, write); err != nil {
		write.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}

	read, err := sql.Open("sqlite", dsn(abs, url.Values{"_query_only": {"1"}}))
	if err != nil {
		write.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	n := max(4, runtime.GOMAXPROCS(0))
	read.SetMaxOpenConns(n)
	read.SetMaxIdleConns(n)
	read.SetConnMaxIdleTime(0)
	return &Store{write: write, read: read}, nil
}

// dsn is a file: URI for path (so any byte in the path survives) with the
// options every connection shares plus extra.
func dsn(path string, extra url.Values) string {
	q := url.Values{
		"_busy_timeout": {fmt.Sprint(busyTimeout.Milliseconds())},
		"_foreign_keys": {"1"},
	}
	for k, v := range extra {
		q[k] = v
	}
	u := url.URL{Scheme: "file", Path: path, RawQuery: q.Encode()}
	return u.String()
}

// migrate applies the embedded migrations that db lacks.
func migrate(ctx context.Context, db *sql.DB) error {
	p, err := goose.NewProvider(goose.DialectSQLite3, db, migrations.SQLite,
		goose.WithDisableGlobalRegistry(true), goose.WithLogger(goose.NopLogger()))
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error {
	return errors.Join(s.read.Close(), s.write.Close())
}

// classify turns a constraint violation into store.ErrConflict (unique) or
// store.ErrNotFound (a foreign key: the referenced row is missing) and passes
// other errors through.
func classify(err error) error {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return err
	}
	switch se.Code() {
	case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
		return store.ErrConflict
	case sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
		return store.ErrNotFound
	}
	return err
}

// exactlyOne is nil when res changed one row and ErrNotFound when none.
func exactlyOne(res sql.Result) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return store.ErrNotFound
	}
	return nil
}

// timeLayout is how times are stored: fixed width, so text order is time order.
const timeLayout = "2006-01-02T15:04:05.000000Z"

// timeArg is t as stored.
func timeArg(t time.Time) string { return column.Round(t).Format(timeLayout) }

// timePtrArg is t as stored, NULL for nil.
func timePtrArg(t *time.Time) any {
	if t == nil {
		return nil
	}
	return timeArg(*t)
}

// timeCol scans a stored time.
type timeCol struct{ dst *time.Time }

func (c timeCol) Scan(src any) error {
	s, ok := src.(string)
	if !ok {
		return fmt.Errorf("time column holds %T, not text", src)
	}
	t, err := time.Parse(timeLayout, s)
	if err != nil {
		return fmt.Errorf("time column: %w", err)
	}
	*c.dst = t
	return nil
}

// timePtrCol scans a stored optional time.
type timePtrCol struct{ dst **time.Time }

func (c timePtrCol) Scan(src any) error {
	if src == nil {
		*c.dst = nil
		return nil
	}
	var t time.Time
	if err := (timeCol{&t}).Scan(src); err != nil {
		return err
	}
	*c.dst = &t
	return nil
}

// mapCol scans a stored JSON object.
type mapCol struct{ dst *map[string]string }

func (c mapCol) Scan(src any) error {
	var b []byte
	switch v := src.(type) {
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		return fmt.Errorf("map column holds %T, not text", src)
	}
	m, err := column.DecodeMap(b)
	if err != nil {
		return err
	}
	*c.dst = m
	return nil
}

var (
	_ sql.Scanner = timeCol{}
	_ sql.Scanner = timePtrCol{}
	_ sql.Scanner = mapCol{}
)

// scanner is a *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }

// collect scans every row of rows with scan.
func collect[T any](rows *sql.Rows, err error, scan func(scanner) (*T, error)) ([]*T, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// one scans the single row of row with scan; ErrNotFound when there is none.
func one[T any](row *sql.Row, scan func(scanner) (*T, error)) (*T, error) {
	v, err := scan(row)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, store.ErrNotFound
	}
	return v, err
}
