// Package migrations holds the store's schema as goose SQL migrations, one
// directory per SQL dialect. The two directories describe the same tables and
// change together: a migration added to one gets its twin in the other, with
// the same number.
package migrations

import (
	"embed"
	"io/fs"
)

//go:embed sqlite/*.sql postgres/*.sql
var files embed.FS

// SQLite is the migrations for store/sqlite.
var SQLite = sub("sqlite")

// Postgres is the migrations for store/postgres.
var Postgres = sub("postgres")

func sub(dir string) fs.FS {
	f, err := fs.Sub(files, dir)
	if err != nil {
		panic(err) // unreachable: dir is embedded above
	}
	return f
}
