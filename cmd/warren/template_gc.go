package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/warren-sh/warren/internal/server"
)

func runTemplateGC(args []string) error {
	fs := flag.NewFlagSet("template gc", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: warren template gc [flags]

Removes what no template build, sandbox or running build of this host's data
directory uses: step layers, source images, build artifacts (of deleted
templates, of failed or interrupted builds) and superseded base template
builds (an upgrade that changes envd makes a new one; the store retires the
old one, which goes once no sandbox, snapshot or template builds on it; a
base build the store never recorded stays), and trims the build cache to
--template-cache-max, least recently used first. 'warren up' does the same
after every build and template deletion, and hourly; this runs one now, beside
a running warren or without one. Give it the data directory and database
'warren up' uses.

Flags (each also read from the environment variable shown):
`)
		fs.PrintDefaults()
	}
	e := &envFlags{fs: fs}
	dataDir := e.String("data-dir", "WARREN_DATA_DIR", "/var/lib/warren", "warren's data directory")
	dbURL := e.String("database-url", "WARREN_DATABASE_URL", "", "Postgres URL, if warren up uses one; default: SQLite in the data dir")
	cacheMax := templateCacheMax(e)
	dryRun := fs.Bool("dry-run", false, "report what would be removed; remove nothing")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := e.err(); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("template gc takes no arguments, got %q", fs.Args())
	}
	limit, err := cacheMax()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := server.Config{DataDir: *dataDir, DatabaseURL: *dbURL, TemplateCacheMax: limit}
	r, err := server.CollectTemplates(ctx, cfg, *dryRun, log)
	if err != nil {
		return err
	}
	verb, retired := "removed", "retired"
	if *dryRun {
		verb, retired = "would remove", "would retire"
	}
	fmt.Printf("%s %d layers, %d source images, %d build artifacts, %d old base builds: %s; and %d cache entries (%d over the limit, %d broken or over an old base build)\n",
		verb, r.Removed["layer"], r.Removed["source"], r.Removed["artifact"], r.Removed["base"], humanBytes(r.FreedBytes),
		r.Evicted+r.Stale, r.Evicted, r.Stale)
	for _, b := range r.Retired {
		fmt.Printf("%s base build %s from the store (superseded; %s)\n", retired, b.ID, b.Artifact)
	}
	fmt.Printf("kept: %s for live builds and sandboxes, %s in %d cache entries\n",
		humanBytes(r.LiveBytes), humanBytes(r.CacheBytes), r.CacheEntries)
	return nil
}
