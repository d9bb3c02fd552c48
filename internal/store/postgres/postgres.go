// Package postgres is the store.Store that several warren processes share: a
// Postgres database reached through a pgx connection pool.
//
// The schema lives in the connection's current schema (the first of its
// search_path), so one database can hold several warrens side by side.
// UpdateSandbox locks the sandbox's row (SELECT ... FOR UPDATE) for the
// length of the caller's function, so processes on different hosts change a
// sandbox one at a time.
package postgres

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
	"github.com/warren-sh/warren/internal/store/migrations"
)

// Store is a store.Store on a Postgres database.
type Store struct {
	pool *pgxpool.Pool
}

var _ store.Store = (*Store)(nil)

// Open connects to the database at url (a postgres:// URL or a key=value
// string, as libpq takes) and brings its schema up to date.
func Open(ctx context.Context, url string) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// The URL may hold a password: name only the failure.
		return nil, fmt.Errorf("open postgres store: parse database URL: %w", err)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open postgres store: %w", err)
	}
	if err := migrate(ctx, pool); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open postgres store on %s:%d/%s: %w", cfg.ConnConfig.Host, cfg.ConnConfig.Port,
			cfg.ConnConfig.Database, err)
	}
	return &Store{pool: pool}, nil
}

// migrate applies the embedded migrations that the current schema lacks,
// holding an advisory lock so that warrens starting together migrate once.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Release()
	var schema string
	if err := conn.QueryRow(ctx, `SELECT current_schema()`).Scan(&schema); err != nil {
		return fmt.Errorf("current schema: %w", err)
	}
	if schema == "" {
		return errors.New("no schema to migrate: the search_path names none that exists")
	}
	// The lock is per schema (warrens in other schemas need not wait) and
	// covers all of goose's work: its session locker would leave its first
	// look at the version table unlocked, which makes concurrent first starts
	// collide and retry a second later.
	h := fnv.New64a()
	h.Write([]byte("warren migrate " + schema))
	key := int64(h.Sum64())
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, key); err != nil {
		return fmt.Errorf("lock schema %s for migration: %w", schema, err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, key)

	// goose's connections are its own, so the migration works even with a
	// pool of one (pool_max_conns=1), which the lock above already holds.
	db := stdlib.OpenDB(*pool.Config().ConnConfig)
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.Postgres,
		goose.WithDisableGlobalRegistry(true), goose.WithLogger(goose.NopLogger()))
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrate schema %s: %w", schema, err)
	}
	return nil
}

// Close closes the pool.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// classify turns a constraint violation into store.ErrConflict (unique) or
// store.ErrNotFound (a foreign key: the referenced row is missing) and passes
// other errors through.
func classify(err error) error {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return err
	}
	switch pe.Code {
	case "23505": // unique_violation
		return store.ErrConflict
	case "23503": // foreign_key_violation
		return store.ErrNotFound
	}
	return err
}

// exactlyOne is nil when tag reports one changed row and ErrNotFound when none.
func exactlyOne(tag pgconn.CommandTag, err error) error {
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return store.ErrNotFound
	}
	return nil
}

// noRows maps pgx's "no rows" to store.ErrNotFound.
func noRows(err error) error {
	if errors.Is(err, pgx.ErrNoRows) {
		return store.ErrNotFound
	}
	return err
}

// timeArg is t as stored.
func timeArg(t time.Time) time.Time { return column.Round(t) }

// timePtrArg is t as stored, NULL for nil.
func timePtrArg(t *time.Time) *time.Time { return column.RoundPtr(t) }

// timeCol scans a timestamptz into UTC (pgx reads it in the local zone).
type timeCol struct{ dst *time.Time }

func (c timeCol) Scan(src any) error {
	t, ok := src.(time.Time)
	if !ok {
		return fmt.Errorf("time column holds %T, not a time", src)
	}
	*c.dst = t.UTC()
	return nil
}

// timePtrCol scans an optional timestamptz into UTC.
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

// mapCol scans a jsonb object.
type mapCol struct{ dst *map[string]string }

func (c mapCol) Scan(src any) error {
	var b []byte
	switch v := src.(type) {
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		return fmt.Errorf("map column holds %T, not JSON text", src)
	}
	m, err := column.DecodeMap(b)
	if err != nil {
		return err
	}
	*c.dst = m
	return nil
}

// pgx scans into a database/sql Scanner with the value database/sql would see.
var (
	_ sql.Scanner = timeCol{}
	_ sql.Scanner = timePtrCol{}
	_ sql.Scanner = mapCol{}
)

// scanner is a pgx.Row or pgx.Rows.
type scanner interface{ Scan(dest ...any) error }

// collect scans every row of rows with scan.
func collect[T any](rows pgx.Rows, err error, scan func(scanner) (*T, error)) ([]*T, error) {
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

// one scans row with scan; ErrNotFound when there is no row.
func one[T any](row pgx.Row, scan func(scanner) (*T, error)) (*T, error) {
	v, err := scan(row)
	if err != nil {
		return nil, noRows(err)
	}
	return v, nil
}
