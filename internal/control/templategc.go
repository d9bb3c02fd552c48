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
//
// Each collection first retires the base template's builds that nothing can
// start from any more (retireBase): every warren upgrade that changes envd
// makes a new base build, and the old ones would otherwise stay listed, and
// kept, for ever.
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

// GCResult is what a collection found and removed (or, in a dry run, would).
type GCResult struct {
	*template.GCResult
	// Retired are the base template's builds dropped from the store:
	// superseded, and nothing could start from them any more. Their files
	// went with the collection (Removed["base"]) unless something still
	// builds on them.
	Retired []*store.Build
}

// Collect runs one collection; with dryRun it reports what would go.
func (g *TemplateGC) Collect(ctx context.Context, dryRun bool) (*GCResult, error) {
	log := g.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	out := &GCResult{}
	retire := func(ctx context.Context) (dirs []string, err error) {
		out.Retired, err = retireBase(ctx, g.Store, g.DataDir, dryRun)
		for _, b := range out.Retired {
			msg := "built-in template build retired: superseded, and nothing can start from it any more"
			if dryRun {
				msg = "built-in template build would be retired (dry run): superseded, and nothing can start from it any more"
			}
			log.Info(msg, "template", b.TemplateID, "build", b.ID, "artifact", b.Artifact, "created", b.CreatedAt)
			dirs = append(dirs, dataPath(g.DataDir, b.Artifact))
		}
		return dirs, err
	}
	res, err := template.CollectGarbage(ctx, template.GCOptions{
		DataDir: g.DataDir, InUse: g.InUse, CacheMax: g.CacheMax, DryRun: dryRun, Log: g.Log,
		RetireBase: retire,
		Live:       func(ctx context.Context) ([]string, error) { return g.live(ctx, out.Retired) },
	})
	if err != nil {
		return nil, err
	}
	out.GCResult = res
	if dryRun {
		return out, nil
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
	return out, nil
}

// retireBase drops from the store the base template's ready builds that
// nothing can start from any more: all but the one its default tag names
// (the build warren up recorded last, EnsureBaseTemplate), unless another
// tag names it or a build waiting or running starts from it (fromTemplate
// resolved to it). Nothing else needs the row: a create or a build names
// base by alias or tag; a paused sandbox resumes from what its pause saved
// (startPaused does without the row); and the build's files stay while
// anything builds on them (running and paused sandboxes' disks, named
// snapshots, templates built from it), which the collection finds by their
// chains. Each build's directory is marked retired first
// (template.RetireBaseBuild): a collection removes no base build the store
// did not retire. With dryRun it only says which builds would go.
//
// The code-interpreter-v1 template, which warren builds itself as well, has
// its superseded builds retired the same way.
func retireBase(ctx context.Context, st store.Store, dataDir string, dryRun bool) ([]*store.Build, error) {
	var retired []*store.Build
	for _, id := range []string{BaseTemplateID, CodeInterpreterTemplateID} {
		r, err := retireBuiltin(ctx, st, dataDir, id, dryRun)
		retired = append(retired, r...)
		if err != nil {
			return retired, err
		}
	}
	return retired, nil
}

// retireBuiltin is retireBase for the built-in template templateID.
func retireBuiltin(ctx context.Context, st store.Store, dataDir, templateID string, dryRun bool) ([]*store.Build, error) {
	current, err := st.GetTag(ctx, templateID, defaultTag)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil // recorded by an older warren: which build is current is not known
	}
	if err != nil {
		return nil, err
	}
	builds, err := st.ListBuilds(ctx, templateID)
	if err != nil {
		return nil, err
	}
	if !slices.ContainsFunc(builds, func(b *store.Build) bool { return b.ID == current.BuildID && b.Status == store.BuildReady }) {
		return nil, nil // then no other build may go
	}
	needed := map[string]bool{}
	tags, err := st.ListTags(ctx, templateID)
	if err != nil {
		return nil, err
	}
	for _, t := range tags {
		needed[t.BuildID] = true
	}
	pending, err := st.ListBuildsByStatus(ctx, store.BuildWaiting, store.BuildBuilding)
	if err != nil {
		return nil, err
	}
	for _, b := range pending {
		if spec, err := decodeSpec(b); err == nil && spec.FromBuildID != "" {
			needed[spec.FromBuildID] = true
		}
	}
	var retired []*store.Build
	for _, b := range builds {
		if b.Status != store.BuildReady || needed[b.ID] {
			continue
		}
		if !dryRun {
			if b.Artifact != "" {
				if err := template.RetireBaseBuild(dataPath(dataDir, b.Artifact)); err != nil {
					return retired, err
				}
			}
			if err := st.DeleteBuild(ctx, b.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
				return retired, fmt.Errorf("retire base build %s: %w", b.ID, err)
			}
		}
		retired = append(retired, b)
	}
	return retired, nil
}

// live lists the artifacts of the builds the store lists as ready or
// building, but the base builds retired (a dry run's are still listed). A
// store without a ready build of the base template is not the store of this
// data directory's warren (a collection against it would remove every
// build): it refuses.
func (g *TemplateGC) live(ctx context.Context, retired []*store.Build) ([]string, error) {
	builds, err := g.Store.ListBuildsByStatus(ctx, store.BuildReady, store.BuildBuilding)
	if err != nil {
		return nil, fmt.Errorf("list builds: %w", err)
	}
	builds = slices.DeleteFunc(builds, func(b *store.Build) bool {
		return slices.ContainsFunc(retired, func(r *store.Build) bool { return r.ID == b.ID })
	})
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
// StoredArtifact is how the store keeps the artifact directory dir: relative
// to the data dir when inside it (as the node resolves it), else as it is.
func StoredArtifact(dataDir, dir string) string {
	if abs, err := filepath.Abs(dir); err == nil {
		if rel, err := filepath.Rel(dataDir, abs); err == nil && filepath.IsLocal(rel) {
			return rel
		}
	}
	return dir
}

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
