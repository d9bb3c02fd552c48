package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
)

// gcEvery is how often Templates collects template storage besides after
// each build and template deletion: the cache budget also applies to what
// ages, and crash leftovers go.
const gcEvery = time.Hour

// TemplateGC collects the template build storage of a data directory
// (template.CollectGarbage) with the roots the store knows: every build it
// lists as ready (base builds, user builds, snapshots in blob storage) and
// the artifact directories of builds it lists as building. Running and
// paused sandboxes need no row of their own: their disks, under InUse, are
// roots themselves (their template may be deleted while they run).
type TemplateGC struct {
	Store   store.Store
	DataDir string
	// InUse are the directories whose disks use template storage: the VM
	// runtime's state root and blob storage.
	InUse []string
	// CacheMax bounds the layer cache (template.GCOptions.CacheMax).
	CacheMax int64
	Log      *slog.Logger

	mu    sync.Mutex
	stats GCStats
}

// GCStats adds up a process's collections, for metrics.
type GCStats struct {
	// CacheBytes is what the cache kept beyond live builds at the last
	// collection.
	CacheBytes int64
	// FreedBytes and Removed (by kind: layer, source, artifact) add up
	// every collection's removals.
	FreedBytes int64
	Removed    map[string]int64
}

// Stats returns the totals so far.
func (g *TemplateGC) Stats() GCStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.stats
	s.Removed = map[string]int64{}
	for k, v := range g.stats.Removed {
		s.Removed[k] = v
	}
	return s
}

// Collect runs one collection; with dryRun it reports what would go.
func (g *TemplateGC) Collect(ctx context.Context, dryRun bool) (*template.GCResult, error) {
	res, err := template.CollectGarbage(ctx, template.GCOptions{
		DataDir: g.DataDir, Live: g.live, InUse: g.InUse, CacheMax: g.CacheMax, DryRun: dryRun, Log: g.Log,
	})
	if err != nil || dryRun {
		return res, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.stats.CacheBytes = res.CacheBytes
	g.stats.FreedBytes += res.FreedBytes
	if g.stats.Removed == nil {
		g.stats.Removed = map[string]int64{}
	}
	for k, n := range res.Removed {
		g.stats.Removed[k] += int64(n)
	}
	return res, nil
}

// live lists the artifacts of the builds the store lists as ready or
// building. A store without a ready build of the base template is not the
// store of this data directory's warren (a collection against it would
// remove every build): it refuses.
func (g *TemplateGC) live(ctx context.Context) ([]string, error) {
	builds, err := g.Store.ListBuildsByStatus(ctx, store.BuildReady, store.BuildBuilding)
	if err != nil {
		return nil, fmt.Errorf("list builds: %w", err)
	}
	base, err := g.Store.GetAlias(ctx, "", "base")
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	if base == nil || !slices.ContainsFunc(builds, func(b *store.Build) bool { return b.TemplateID == base.TemplateID && b.Status == store.BuildReady }) {
		return nil, errors.New("the store lists no build of the base template, so it is not the store of this data directory's warren; nothing was removed (give the --database-url 'warren up' uses)")
	}
	var live []string
	for _, b := range builds {
		switch {
		case b.Artifact != "":
			live = append(live, dataPath(g.DataDir, b.Artifact))
		case b.Status == store.BuildBuilding:
			// Its builder may have returned the artifact, not yet
			// recorded. One that has not made it yet cannot while the
			// collection holds the cache lock.
			dir := template.ArtifactDir(g.DataDir, b.TemplateID, b.ID)
			if _, err := os.Stat(dir); err == nil {
				live = append(live, dir)
			}
		}
	}
	return live, nil
}

// dataPath resolves a path stored relative to the data directory.
func dataPath(dataDir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dataDir, p)
}

// collectSoon asks for a collection of template storage; requests made while
// one waits are one.
func (t *Templates) collectSoon() {
	select {
	case t.gcWake <- struct{}{}:
	default:
	}
}

// collectLoop collects template storage at start, when asked and every
// gcEvery, until ctx is done.
func (t *Templates) collectLoop(ctx context.Context) {
	tick := time.NewTicker(gcEvery)
	defer tick.Stop()
	for {
		if _, err := t.cfg.GC.Collect(ctx, false); err != nil && ctx.Err() == nil {
			t.log.Error("template storage collection", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-t.gcWake:
		}
	}
}
