package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
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

func (d *gcData) collect() *control.GCResult {
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

// newBaseData is a data directory with the base image, whose store has the
// default team (the base template's owner); it returns the image's files.
func newBaseData(t *testing.T) (*gcData, []string) {
	t.Helper()
	f := newFixture(t)
	d := &gcData{t: t, f: f, dataDir: t.TempDir()}
	_, _, err := control.Bootstrap(context.Background(), f.store, control.TeamLimits{}, "")
	must(t, err)
	base := filepath.Join(d.dataDir, "templates", "base")
	must(t, os.MkdirAll(base, 0o700))
	image := []string{filepath.Join(base, "rootfs.ext4"), filepath.Join(base, "manifest.json")}
	must(t, os.WriteFile(image[0], make([]byte, 1<<20), 0o600))
	must(t, os.WriteFile(image[1], []byte("{}"), 0o600))
	return d, image
}

// baseBuild makes base build id in the data directory as EnsureBase does
// (its root disk a link of the base image, its snapshot disk an overlay of
// that) and records it as warren up does, as the current base build.
func (d *gcData) baseBuild(id string) (dir, buildID string) {
	d.t.Helper()
	ctx := context.Background()
	dir = d.baseDir(id)
	must(d.t, control.EnsureBaseTemplate(ctx, d.f.store, control.BaseBuild{Key: id, Artifact: dir}))
	tag, err := d.f.store.GetTag(ctx, control.BaseTemplateID, "default")
	must(d.t, err)
	return dir, tag.BuildID
}

// baseDir makes base build id's directory as EnsureBase does, and records
// nothing.
func (d *gcData) baseDir(id string) string {
	d.t.Helper()
	base := filepath.Join(d.dataDir, "templates", "base")
	dir := filepath.Join(base, id)
	snap := filepath.Join(dir, "snapshot")
	must(d.t, os.MkdirAll(snap, 0o700))
	root := filepath.Join(dir, "rootfs.ext4")
	must(d.t, os.Link(filepath.Join(base, "rootfs.ext4"), root))
	for _, f := range []string{"kernel", "initramfs.cpio", "snapshot/mem"} {
		must(d.t, os.WriteFile(filepath.Join(dir, f), make([]byte, 64<<10), 0o600))
	}
	must(d.t, os.WriteFile(filepath.Join(dir, "init-secret"), []byte("secret\n"), 0o600))
	must(d.t, os.WriteFile(filepath.Join(snap, "manifest.json"), []byte(`{"memory":"file"}`), 0o600))
	must(d.t, microvm.WriteOverlay(microvm.SnapshotDisk(snap), root, "raw"))
	a, _ := json.Marshal(template.Artifact{
		BuildID: id, Dir: dir, RootDisk: root, Snapshot: snap,
		Kernel: filepath.Join(dir, "kernel"), Initramfs: filepath.Join(dir, "initramfs.cpio"),
	})
	must(d.t, os.WriteFile(filepath.Join(dir, "artifact.json"), a, 0o644))
	return dir
}

// overlay makes p a qcow2 overlay of backing (a sandbox's or a layer's disk).
func overlay(t *testing.T, p, backing string) string {
	t.Helper()
	must(t, os.MkdirAll(filepath.Dir(p), 0o700))
	must(t, microvm.WriteOverlay(p, backing, "qcow2"))
	return p
}

func buildIDs(builds []*store.Build) []string {
	var ids []string
	for _, b := range builds {
		ids = append(ids, b.ID)
	}
	slices.Sort(ids)
	return ids
}

func sorted(ids ...string) []string {
	slices.Sort(ids)
	return ids
}

// TestTemplateGCRetiresBaseBuilds: after an upgrade (a new base build), a
// collection drops from the store the old base builds nothing can start
// from, so base names the new one, and removes their directories unless
// something still builds on them: a paused or running sandbox, a template
// built from them. Those go once nothing does. A tag or a build queued from
// an old build keeps its row. The base image and the current build stay.
func TestTemplateGCRetiresBaseBuilds(t *testing.T) {
	d, image := newBaseData(t)
	f := d.f
	ctx := context.Background()
	defaultTeam, err := f.store.GetTeam(ctx, control.DefaultTeamID)
	must(t, err)
	disk := func(dir string) string { return microvm.SnapshotDisk(filepath.Join(dir, "snapshot")) }

	// Six warren versions, each with its base build; the last is current.
	freeDir, free := d.baseBuild("000000000000000a")
	pausedDir, paused := d.baseBuild("000000000000000b")
	runningDir, running := d.baseBuild("000000000000000c")
	childDir, child := d.baseBuild("000000000000000d")
	taggedDir, tagged := d.baseBuild("000000000000000e")
	sourceDir, source := d.baseBuild("000000000000000f")
	currentDir, current := d.baseBuild("0123456789abcdef")

	// A sandbox of each of two old builds: one paused (its saved disk in
	// blob storage), one running (its overlay in the VMs' state).
	now := time.Now().UTC()
	pausedDisk := overlay(t, filepath.Join(d.dataDir, "blobs", "paused", "sbp", "vm", "rootfs.qcow2"), disk(pausedDir))
	must(t, f.store.InsertSandbox(ctx, &store.Sandbox{
		ID: "sbp", TeamID: f.teamA.ID, TemplateID: control.BaseTemplateID, BuildID: paused, NodeID: "node-1",
		State: store.StatePaused, EnvdAccessToken: "tok", AutoPause: true, AutoPauseMemory: true, Timeout: time.Minute,
		StartedAt: now.Add(-time.Hour), EndAt: now.Add(-time.Minute),
		Paused: &store.PausedState{Key: "paused/sbp", Memory: true, At: now},
	}))
	f.node.mu.Lock()
	f.node.saved["paused/sbp"] = true
	f.node.mu.Unlock()
	runningDisk := overlay(t, filepath.Join(d.dataDir, "vms", "sbr", "overlay.qcow2"), disk(runningDir))
	must(t, f.store.InsertSandbox(ctx, &store.Sandbox{
		ID: "sbr", TeamID: f.teamA.ID, TemplateID: control.BaseTemplateID, BuildID: running, NodeID: "node-1",
		State: store.StateRunning, EnvdAccessToken: "tok", StartedAt: now, EndAt: now.Add(time.Hour),
	}))
	// A template built from an old build (fromTemplate base).
	step := overlay(t, filepath.Join(d.dataDir, "templates", "layers", "h1-c1.qcow2"), disk(childDir))
	userDir := d.build("child", "c1", store.BuildReady, "templates/child/c1", step)
	// A tag on an old build, and a build queued from another.
	must(t, f.store.SetTag(ctx, &store.Tag{TemplateID: control.BaseTemplateID, Tag: "pinned", BuildID: tagged, CreatedAt: now}))
	must(t, f.store.CreateTemplate(ctx, &store.Template{ID: "queued", TeamID: f.teamA.ID, CreatedAt: now, UpdatedAt: now}))
	must(t, f.store.CreateBuild(ctx, &store.Build{
		ID: "q1", TemplateID: "queued", Status: store.BuildWaiting, CreatedAt: now, UpdatedAt: now,
		Spec: `{"started":true,"fromTemplate":"base","fromBuildID":"` + source + `"}`,
	}))

	var logs strings.Builder
	gc := &control.TemplateGC{
		Store: f.store, DataDir: d.dataDir, CacheMax: 0, Log: slog.New(slog.NewTextHandler(&logs, nil)),
		InUse: []string{filepath.Join(d.dataDir, "vms"), filepath.Join(d.dataDir, "blobs")},
	}
	baseBuilds := func() []string {
		builds, err := f.store.ListBuilds(ctx, control.BaseTemplateID)
		must(t, err)
		return buildIDs(builds)
	}
	all := sorted(free, paused, running, child, tagged, source, current)
	retire := sorted(free, paused, running, child)

	// A dry run says what would go and changes nothing.
	res, err := gc.Collect(ctx, true)
	must(t, err)
	if got := buildIDs(res.Retired); !slices.Equal(got, retire) || res.Removed["base"] != 1 {
		t.Errorf("dry run: retires %v and removes %v; want %v retired, the unused one's directory removed", got, res.Removed, retire)
	}
	if got := baseBuilds(); !slices.Equal(got, all) {
		t.Errorf("after the dry run the store lists base builds %v, want all %v", got, all)
	}
	for _, dir := range []string{freeDir, pausedDir, runningDir, childDir, taggedDir, sourceDir, currentDir} {
		if !exists(dir) {
			t.Errorf("the dry run removed %s", dir)
		}
	}

	res, err = gc.Collect(ctx, false)
	must(t, err)
	if got := buildIDs(res.Retired); !slices.Equal(got, retire) || res.Removed["base"] != 1 {
		t.Errorf("retired %v and removed %v; want %v retired, the unused one's directory removed", got, res.Removed, retire)
	}
	if got, want := baseBuilds(), sorted(tagged, source, current); !slices.Equal(got, want) {
		t.Errorf("the store lists base builds %v, want %v", got, want)
	}
	if !strings.Contains(logs.String(), "built-in template build retired") || !strings.Contains(logs.String(), free) {
		t.Errorf("the log does not name the retired builds:\n%s", logs.String())
	}
	for p, keep := range map[string]bool{
		freeDir: false, pausedDir: true, runningDir: true, childDir: true, taggedDir: true, sourceDir: true,
		currentDir: true, userDir: true, image[0]: true, image[1]: true,
	} {
		if exists(p) != keep {
			t.Errorf("%s: exists %v, want %v", p, exists(p), keep)
		}
	}
	for _, disk := range []string{pausedDisk, runningDisk, microvm.SnapshotDisk(filepath.Join(userDir, "snapshot"))} {
		if err := microvmtest.OpenChain(disk); err != nil {
			t.Error(err)
		}
	}
	if _, err := template.LoadArtifact(currentDir); err != nil {
		t.Errorf("the current build: %v", err)
	}

	// base names the current build; a tag still names its old one.
	c := control.New(f.config)
	for ref, want := range map[string]string{"base": current, "base:pinned": tagged} {
		r, err := c.ResolveTemplate(ctx, defaultTeam, ref)
		if err != nil || r.Build.ID != want {
			t.Errorf("%s resolves to %+v (%v), want build %s", ref, r, err, want)
		}
	}
	// The paused sandbox of a retired build resumes: its saved state is
	// all a resume needs.
	if sb, resumed, err := c.Connect(ctx, f.teamA, "sbp", time.Minute); err != nil || !resumed || sb.State != store.StateRunning {
		t.Errorf("resume of a sandbox of a retired base build: %+v resumed=%v err=%v", sb, resumed, err)
	}

	// Once nothing builds on them, the old builds go: the sandboxes gone,
	// the child template deleted, the tag removed, the queued build failed.
	must(t, os.RemoveAll(filepath.Join(d.dataDir, "blobs", "paused", "sbp")))
	must(t, os.RemoveAll(filepath.Join(d.dataDir, "vms", "sbr")))
	must(t, f.store.DeleteTemplate(ctx, "child"))
	must(t, f.store.DeleteTag(ctx, control.BaseTemplateID, "pinned"))
	q, err := f.store.GetBuild(ctx, "q1")
	must(t, err)
	q.Status = store.BuildError
	must(t, f.store.UpdateBuild(ctx, q))
	res, err = gc.Collect(ctx, false)
	must(t, err)
	if got, want := buildIDs(res.Retired), sorted(tagged, source); !slices.Equal(got, want) || res.Removed["base"] != 5 {
		t.Errorf("retired %v and removed %v; want %v retired, 5 base builds removed", got, res.Removed, want)
	}
	if got, want := baseBuilds(), []string{current}; !slices.Equal(got, want) {
		t.Errorf("the store lists base builds %v, want %v", got, want)
	}
	for _, dir := range []string{pausedDir, runningDir, childDir, taggedDir, sourceDir, userDir} {
		if exists(dir) {
			t.Errorf("%s outlived what built on it", dir)
		}
	}
	for _, p := range append(image, currentDir) {
		if !exists(p) {
			t.Errorf("%s is gone", p)
		}
	}
}

// A store that a warren before base builds were retired recorded (no tag
// names the current base build) keeps every base build: which one is
// current is not known.
func TestTemplateGCRetiresNothingWithoutCurrentBase(t *testing.T) {
	d, _ := newBaseData(t)
	oldDir, _ := d.baseBuild("000000000000000a")
	currentDir, _ := d.baseBuild("0123456789abcdef")
	must(t, d.f.store.DeleteTag(context.Background(), control.BaseTemplateID, "default"))

	res := d.collect()
	if len(res.Retired) != 0 || res.Removed["base"] != 0 || !exists(oldDir) || !exists(currentDir) {
		t.Errorf("retired %v, removed %v; want every base build kept", buildIDs(res.Retired), res.Removed)
	}
}

// TestTemplateGCKeepsBaseBuildsOfOtherStores: a base build in the data
// directory that this store never recorded (another store's: the store was
// reset, or several warrens and test binaries share a cache of base builds)
// stays, though nothing this store knows reaches it; the builds this store
// retires go.
func TestTemplateGCKeepsBaseBuildsOfOtherStores(t *testing.T) {
	d, image := newBaseData(t)
	foreign := d.baseDir("00000000000000ff")
	oldDir, old := d.baseBuild("000000000000000a")
	currentDir, _ := d.baseBuild("0123456789abcdef")

	res := d.collect()
	if got := buildIDs(res.Retired); !slices.Equal(got, []string{old}) || res.Removed["base"] != 1 {
		t.Errorf("retired %v and removed %v; want %s retired and removed", got, res.Removed, old)
	}
	for p, keep := range map[string]bool{foreign: true, oldDir: false, currentDir: true, image[0]: true, image[1]: true} {
		if exists(p) != keep {
			t.Errorf("%s: exists %v, want %v", p, exists(p), keep)
		}
	}
	if _, err := template.LoadArtifact(foreign); err != nil {
		t.Errorf("the other store's build: %v", err)
	}
}
