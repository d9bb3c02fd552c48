package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
)

// gcData is a data directory whose template storage a TemplateGC collects,
// and the store that lists its builds.
type gcData struct {
	t       *testing.T
	f       *fixture
	dataDir string
}

// build records a build of a new template of team A with status, and makes
// its artifact over root in dir (when not empty; relative to the data dir
// as the builder's are stored), its snapshot disk an overlay of root.
func (d *gcData) build(tpl, id string, status store.BuildStatus, dir, root string) string {
	d.t.Helper()
	ctx := context.Background()
	now := time.Now().UTC()
	if _, err := d.f.store.GetTemplate(ctx, tpl); errors.Is(err, store.ErrNotFound) {
		must(d.t, d.f.store.CreateTemplate(ctx, &store.Template{ID: tpl, TeamID: d.f.teamA.ID, CreatedAt: now, UpdatedAt: now}))
	}
	b := &store.Build{ID: id, TemplateID: tpl, Status: status, CreatedAt: now, UpdatedAt: now}
	abs := dir
	if dir != "" && !filepath.IsAbs(dir) {
		abs = filepath.Join(d.dataDir, dir)
	}
	if status == store.BuildReady {
		b.Artifact = dir
	}
	must(d.t, d.f.store.CreateBuild(ctx, b))
	if dir == "" {
		return ""
	}
	snap := filepath.Join(abs, "snapshot")
	must(d.t, os.MkdirAll(snap, 0o700))
	must(d.t, microvm.WriteOverlay(microvm.SnapshotDisk(snap), root, "raw"))
	a, _ := json.Marshal(template.Artifact{BuildID: id, Dir: abs, RootDisk: root, Snapshot: snap})
	must(d.t, os.WriteFile(filepath.Join(abs, "artifact.json"), a, 0o644))
	return abs
}

func (d *gcData) collect() *template.GCResult {
	d.t.Helper()
	gc := &control.TemplateGC{
		Store: d.f.store, DataDir: d.dataDir, CacheMax: 0,
		InUse: []string{filepath.Join(d.dataDir, "vms"), filepath.Join(d.dataDir, "blobs")},
	}
	res, err := gc.Collect(context.Background(), false)
	must(d.t, err)
	return res
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return !errors.Is(err, fs.ErrNotExist)
}

// TestTemplateGCRoots checks that a collection keeps what the store lists
// (ready builds, wherever their artifacts are; builds in progress, whose
// artifact it does not know yet) and what those build on, and removes the
// builds of deleted templates and failed builds' leftovers.
func TestTemplateGCRoots(t *testing.T) {
	f := newFixture(t)
	d := &gcData{t: t, f: f, dataDir: t.TempDir()}
	ctx := context.Background()
	src := filepath.Join(d.dataDir, "templates", "sources", "img.ext4")
	must(t, os.MkdirAll(filepath.Dir(src), 0o700))
	must(t, os.WriteFile(src, make([]byte, 1<<20), 0o600))

	// Without the base template's build the store is not this data
	// directory's: the collection refuses.
	gc := &control.TemplateGC{Store: f.store, DataDir: d.dataDir}
	if _, err := gc.Collect(ctx, false); err == nil || !strings.Contains(err.Error(), "base template") {
		t.Errorf("a collection against a store without the base template: %v, want a refusal", err)
	}
	if !exists(src) {
		t.Fatal("the refused collection removed a source")
	}
	base := d.build(control.BaseTemplateID, "b0", store.BuildReady, "templates/base/0123456789abcdef", src)
	must(t, f.store.SetAlias(ctx, &store.Alias{Alias: "base", TemplateID: control.BaseTemplateID}))

	ready := d.build("tready", "b1", store.BuildReady, "templates/tready/b1", src)
	building := d.build("tbuilding", "b2", store.BuildBuilding, "templates/tbuilding/b2", src)
	failed := d.build("tfailed", "b3", store.BuildError, "templates/tfailed/b3", src)
	doomed := d.build("tdoomed", "b4", store.BuildReady, "templates/tdoomed/b4", src)
	parent := d.build("tparent", "b5", store.BuildReady, "templates/tparent/b5", src)
	// A snapshot of a sandbox of tparent, in blob storage: its disk is an
	// overlay of tparent's snapshot disk.
	snapshot := d.build("tsnap", "b6", store.BuildReady,
		filepath.Join(d.dataDir, "blobs", "snapshots", "tsnap", "b6"), microvm.SnapshotDisk(filepath.Join(parent, "snapshot")))

	must(t, f.store.DeleteTemplate(ctx, "tdoomed"))
	must(t, f.store.DeleteTemplate(ctx, "tparent"))
	res := d.collect()
	for p, keep := range map[string]bool{
		base: true, ready: true, building: true, snapshot: true, src: true,
		parent: true, // deleted, but the snapshot builds on it
		failed: false, doomed: false, filepath.Dir(doomed): false,
	} {
		if exists(p) != keep {
			t.Errorf("%s: exists %v, want %v", p, exists(p), keep)
		}
	}
	if res.Removed["artifact"] != 2 {
		t.Errorf("removed %v, want the failed and the deleted build", res.Removed)
	}

	// The snapshot deleted (its template and its blob entry), what it built
	// on goes at the next collection.
	must(t, f.store.DeleteTemplate(ctx, "tsnap"))
	must(t, os.RemoveAll(snapshot))
	d.collect()
	if exists(parent) {
		t.Errorf("%s outlived the snapshot that built on it", parent)
	}
	if !exists(ready) || !exists(src) {
		t.Error("a live build went with the snapshot")
	}
}
