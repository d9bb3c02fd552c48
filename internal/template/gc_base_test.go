package template

// Collection of the base template's builds: templates/base/<build>/ beside
// the base root image, laid out as EnsureBase and internal/image leave them.

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/fslock"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
)

// Base build IDs: newTree's boot files are the current build's.
const (
	currentBase = "0123456789abcdef"
	oldBase     = "aaaaaaaaaaaaaaaa"
)

// baseImage makes the base root image and what internal/image keeps beside
// it; it returns what must never go.
func (tr *tree) baseImage() []string {
	tr.t.Helper()
	img := tr.file(tr.path(baseDir+"/rootfs.ext4"), 1<<20)
	manifest := tr.path(baseDir + "/manifest.json")
	must(tr.t, os.WriteFile(manifest, []byte(`{"recipe":1}`), 0o644))
	work := tr.file(tr.path(baseDir+"/.build-123/rootfs.ext4"), 4<<10) // a build of the image under way
	imgLock := tr.path(baseDir + "/.lock")
	must(tr.t, os.WriteFile(imgLock, nil, 0o600))
	return []string{img, manifest, work, imgLock}
}

// baseBuild makes base build id as EnsureBase does: its boot files, the
// base image hard-linked as its root disk, a snapshot whose disk is an
// overlay of that, artifact.json last.
func (tr *tree) baseBuild(id string) string {
	tr.t.Helper()
	dir := tr.path(baseDir + "/" + id)
	kernel := tr.file(filepath.Join(dir, kernelFile), 64<<10)
	initrd := tr.file(filepath.Join(dir, initramfsFile), 64<<10)
	root := filepath.Join(dir, rootfsFile)
	must(tr.t, os.Link(tr.path(baseDir+"/rootfs.ext4"), root))
	return tr.artifactBooting(dir, root, kernel, initrd)
}

// retire returns a GCOptions.RetireBase that retires the base builds in
// dirs as the store does (control.TemplateGC): each marked, unless in a dry
// run, and all returned.
func retire(t *testing.T, dryRun bool, dirs ...string) func(context.Context) ([]string, error) {
	return func(context.Context) ([]string, error) {
		if !dryRun {
			for _, d := range dirs {
				must(t, RetireBaseBuild(d))
			}
		}
		return dirs, nil
	}
}

// baseDisk is a base build's snapshot disk: what its sandboxes and the
// templates built from it overlay.
func (tr *tree) baseDisk(id string) string {
	return microvm.SnapshotDisk(tr.path(baseDir + "/" + id + "/" + snapshotDir))
}

// TestGCSupersededBaseBuilds: an old base build the store retired goes once
// nothing builds on it, whatever it is, and stays, whole, while anything
// does; the current build and the base image stay.
func TestGCSupersededBaseBuilds(t *testing.T) {
	for _, tc := range []struct {
		name string
		// use makes something that builds on the old build; it returns
		// GCOptions naming it and the disks it opens.
		use  func(tr *tree) (GCOptions, []string)
		keep bool
	}{
		{"nothing", func(tr *tree) (GCOptions, []string) { return GCOptions{}, nil }, false},
		{"a running sandbox", func(tr *tree) (GCOptions, []string) {
			vms := filepath.Join(tr.dataDir, "vms")
			disk := tr.qcow2(filepath.Join(vms, "i1", "overlay.qcow2"), tr.baseDisk(oldBase), 64<<10)
			return GCOptions{InUse: []string{vms}}, []string{disk}
		}, true},
		{"a paused sandbox", func(tr *tree) (GCOptions, []string) {
			// Its sandbox.json names the build's boot files (a disk-only
			// resume boots them); its disk overlays the build's.
			blobs := filepath.Join(tr.dataDir, "blobs")
			disk := tr.qcow2(filepath.Join(blobs, "paused", "i1", "vm", "rootfs.qcow2"), tr.baseDisk(oldBase), 64<<10)
			tr.file(filepath.Join(blobs, "paused", "i1", "sandbox.json"), 100)
			return GCOptions{InUse: []string{blobs}}, []string{disk}
		}, true},
		{"a named snapshot of its sandbox", func(tr *tree) (GCOptions, []string) {
			blobs := filepath.Join(tr.dataDir, "blobs")
			old := tr.path(baseDir + "/" + oldBase)
			dir := tr.artifactBooting(filepath.Join(blobs, "snapshots", "s1", "b1"), tr.baseDisk(oldBase),
				filepath.Join(old, kernelFile), filepath.Join(old, initramfsFile))
			return GCOptions{Live: liveDirs(dir), InUse: []string{blobs}}, []string{microvm.SnapshotDisk(filepath.Join(dir, snapshotDir))}
		}, true},
		{"a template built from it (fromTemplate base)", func(tr *tree) (GCOptions, []string) {
			step := tr.layer("h1", "b1", tr.baseDisk(oldBase), time.Time{})
			old := tr.path(baseDir + "/" + oldBase)
			dir := tr.artifactBooting(ArtifactDir(tr.dataDir, "t1", "b1"), step,
				filepath.Join(old, kernelFile), filepath.Join(old, initramfsFile))
			return GCOptions{Live: liveDirs(dir)}, []string{microvm.SnapshotDisk(filepath.Join(dir, snapshotDir))}
		}, true},
		{"a template built from an image, which boots its kernel", func(tr *tree) (GCOptions, []string) {
			step := tr.layer("h1", "b1", tr.source("img"), time.Time{})
			old := tr.path(baseDir + "/" + oldBase)
			dir := tr.artifactBooting(ArtifactDir(tr.dataDir, "t1", "b1"), step,
				filepath.Join(old, kernelFile), filepath.Join(old, initramfsFile))
			return GCOptions{Live: liveDirs(dir)}, []string{microvm.SnapshotDisk(filepath.Join(dir, snapshotDir))}
		}, true},
		{"a build running from it", func(tr *tree) (GCOptions, []string) {
			release, err := pinBuild(tr.t.Context(), tr.dataDir, "run1", []string{tr.baseDisk(oldBase)})
			must(tr.t, err)
			tr.t.Cleanup(release)
			return GCOptions{}, nil
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTree(t)
			image := tr.baseImage()
			current := tr.baseBuild(currentBase)
			old := tr.baseBuild(oldBase)
			opts, disks := tc.use(tr)
			opts.Live = appendLive(opts.Live, current)
			opts.CacheMax = 0
			opts.RetireBase = retire(t, false, old)
			res := tr.collect(opts)

			wantExist(t, true, image...)
			wantExist(t, true, current)
			if _, err := LoadArtifact(current); err != nil {
				t.Errorf("the current build: %v", err)
			}
			wantExist(t, tc.keep, old)
			want := 1
			if tc.keep {
				want = 0
			}
			if res.Removed["base"] != want {
				t.Errorf("removed %v, want %d base build(s)", res.Removed, want)
			}
			if tc.keep {
				// Whole: what it holds, its boot files too.
				if _, err := LoadArtifact(old); err != nil {
					t.Errorf("the old build, kept: %v", err)
				}
				wantExist(t, true, filepath.Join(old, kernelFile), filepath.Join(old, initramfsFile))
			}
			for _, d := range disks {
				if err := microvmtest.OpenChain(d); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// appendLive adds dirs to what live lists.
func appendLive(live func(context.Context) ([]string, error), dirs ...string) func(context.Context) ([]string, error) {
	return func(ctx context.Context) ([]string, error) {
		var out []string
		if live != nil {
			l, err := live(ctx)
			if err != nil {
				return nil, err
			}
			out = l
		}
		return append(out, dirs...), nil
	}
}

// TestGCLeavesBaseBuildsBeingMade: while EnsureBase holds the base builds'
// lock (making a build, which has no artifact.json yet, or recording one in
// the store), a collection neither retires nor removes base builds.
func TestGCLeavesBaseBuildsBeingMade(t *testing.T) {
	tr := newTree(t)
	image := tr.baseImage()
	current := tr.baseBuild(currentBase)
	old := tr.baseBuild(oldBase)
	making := tr.path(baseDir + "/bbbbbbbbbbbbbbbb")
	tr.file(filepath.Join(making, kernelFile), 64<<10)
	tr.qcow2(microvm.SnapshotDisk(filepath.Join(making, snapshotDir)), tr.path(baseDir+"/rootfs.ext4"), 64<<10)

	unlock, err := fslock.Lock(t.Context(), tr.path(baseDir+"/"+lockFile), nil)
	must(t, err)
	retired := 0
	opts := GCOptions{
		Live: liveDirs(current), CacheMax: 0,
		RetireBase: func(ctx context.Context) ([]string, error) {
			retired++
			return retire(t, false, old)(ctx)
		},
	}
	res := tr.collect(opts)
	wantExist(t, true, making, old, current)
	if res.Removed["base"] != 0 || retired != 0 {
		t.Errorf("under EnsureBase's lock: removed %v, retired %d times; want no base build touched", res.Removed, retired)
	}

	// The lock free, the unfinished directory is a dead build's (EnsureBase
	// would remove it too; no store need retire it), and the old build goes.
	unlock()
	res = tr.collect(opts)
	wantExist(t, false, making, old)
	wantExist(t, true, current)
	wantExist(t, true, image...)
	if res.Removed["base"] != 2 || retired != 1 {
		t.Errorf("lock free: removed %v, retired %d times; want 2 base builds, once", res.Removed, retired)
	}
}

// TestGCSupersededBaseBuildDryRun: a dry run counts the base builds the
// store would retire (it marks none) and removes nothing.
func TestGCSupersededBaseBuildDryRun(t *testing.T) {
	tr := newTree(t)
	tr.baseImage()
	current := tr.baseBuild(currentBase)
	old := tr.baseBuild(oldBase)
	res := tr.collect(GCOptions{Live: liveDirs(current), CacheMax: 0, DryRun: true, RetireBase: retire(t, true, old)})
	wantExist(t, true, old, current)
	wantExist(t, false, filepath.Join(old, retiredFile))
	if res.Removed["base"] != 1 || res.FreedBytes < 64<<10 {
		t.Errorf("dry run reports %v, %d bytes; want the old base build", res.Removed, res.FreedBytes)
	}
}

// TestGCKeepsBaseBuildsNotRetired: a collection removes only the base
// builds its store retired (RetireBase now, or marked by an earlier
// collection), never one it merely does not know: a data directory may hold
// base builds another store recorded (a store reset; test binaries and a
// warren sharing a cache of base builds), and such a build, removed, would
// fail whoever restores it next. A retired build that EnsureBase takes back
// (unretireBase) is not retired any more.
func TestGCKeepsBaseBuildsNotRetired(t *testing.T) {
	tr := newTree(t)
	image := tr.baseImage()
	current := tr.baseBuild(currentBase)
	foreign := tr.baseBuild("1111111111111111")   // another store's current build
	earlier := tr.baseBuild("2222222222222222")   // retired by an earlier collection
	inUse := tr.baseBuild("3333333333333333")     // retired earlier, a sandbox still on it
	takenBack := tr.baseBuild("4444444444444444") // retired, then EnsureBase's again
	now := tr.baseBuild("5555555555555555")       // retired by this collection
	for _, d := range []string{earlier, inUse, takenBack} {
		must(t, RetireBaseBuild(d))
	}
	must(t, unretireBase(takenBack))
	// A cached step over the foreign build is no more stale than the build.
	step := tr.layer("h1", "b1", tr.baseDisk("1111111111111111"), hourly(1))
	vms := filepath.Join(tr.dataDir, "vms")
	sandbox := tr.qcow2(filepath.Join(vms, "i1", "overlay.qcow2"), tr.baseDisk("3333333333333333"), 64<<10)
	opts := GCOptions{Live: liveDirs(current), InUse: []string{vms}, CacheMax: NoCacheLimit, RetireBase: retire(t, false, now)}

	res := tr.collect(opts)
	wantExist(t, true, image...)
	wantExist(t, true, current, foreign, inUse, takenBack, step, tr.path(layersDir+"/h1.json"))
	wantExist(t, false, earlier, now)
	if res.Removed["base"] != 2 || res.Stale != 0 {
		t.Errorf("removed %v, %d stale entries; want the 2 retired base builds nothing uses, no entry", res.Removed, res.Stale)
	}
	if err := microvmtest.OpenChain(sandbox); err != nil {
		t.Error(err)
	}

	// The sandbox gone, its retired build goes; the others stay.
	must(t, os.RemoveAll(vms))
	opts.RetireBase = retire(t, false)
	res = tr.collect(opts)
	wantExist(t, false, inUse)
	wantExist(t, true, current, foreign, takenBack, step)
	if res.Removed["base"] != 1 {
		t.Errorf("removed %v, want the retired build the sandbox used", res.Removed)
	}
}

// TestGCCacheOverSupersededBase: cache entries of builds from an old base
// build can never be hit again; they do not keep it, whatever the budget.
func TestGCCacheOverSupersededBase(t *testing.T) {
	tr := newTree(t)
	tr.baseImage()
	current := tr.baseBuild(currentBase)
	old := tr.baseBuild(oldBase)
	stale := tr.layer("h1", "b1", tr.baseDisk(oldBase), hourly(2))
	// A deleted template's build from the old base build, which a build
	// of the same steps would have reused.
	deleted := tr.artifactBooting(ArtifactDir(tr.dataDir, "t1", "b1"), stale,
		filepath.Join(old, kernelFile), filepath.Join(old, initramfsFile))
	finalOld := tr.final("f1", deleted, hourly(2))
	fresh := tr.layer("h2", "b2", tr.baseDisk(currentBase), hourly(1))

	res := tr.collect(GCOptions{Live: liveDirs(current), CacheMax: NoCacheLimit, RetireBase: retire(t, false, old)})
	wantExist(t, false, old, stale, deleted, finalOld, tr.path(layersDir+"/h1.json"))
	wantExist(t, true, current, fresh, tr.path(layersDir+"/h2.json"))
	if res.Stale != 2 || res.Removed["base"] != 1 || res.CacheEntries != 1 {
		t.Errorf("result %+v: want the 2 entries over the old build stale, it removed, the other entry kept", res)
	}
	if tr.cachedSteps("h2") != 1 {
		t.Error("the step over the current base build is not cached any more")
	}
}

// TestGCDataDirByAnotherPath: given the data directory by another path than
// warren up's (a symlink), a collection still finds the store's artifacts
// and the disks' chains, which name up's paths.
func TestGCDataDirByAnotherPath(t *testing.T) {
	realDir := t.TempDir()
	link := filepath.Join(t.TempDir(), "warren")
	must(t, os.Symlink(realDir, link))
	tr := &tree{t: t, dataDir: link} // up's spelling
	must(t, os.MkdirAll(tr.path(baseDir), 0o700))
	tr.baseImage()
	tr.kernel, tr.initrd = tr.path(baseDir+"/"+currentBase+"/"+kernelFile), tr.path(baseDir+"/"+currentBase+"/"+initramfsFile)
	current := tr.baseBuild(currentBase)
	old := tr.baseBuild(oldBase)
	vms := filepath.Join(link, "vms")
	tr.qcow2(filepath.Join(vms, "i1", "overlay.qcow2"), tr.baseDisk(oldBase), 64<<10)
	user := tr.artifact("t1", "b1", tr.layer("h1", "b1", tr.baseDisk(currentBase), time.Time{}))

	// The store names the old build by up's spelling; a dry run does not
	// mark it, so the collection must recognise the name.
	for _, dataDir := range []string{realDir, link} {
		res, err := CollectGarbage(t.Context(), GCOptions{
			DataDir: dataDir, Live: liveDirs(current, user), InUse: []string{filepath.Join(dataDir, "vms")}, CacheMax: 0,
			RetireBase: retire(t, true, old),
		})
		must(t, err)
		wantExist(t, true, current, old, user)
		if n := res.Removed["base"] + res.Removed["artifact"] + res.Removed["layer"]; n != 0 {
			t.Errorf("collection of %s removed %v, want nothing", dataDir, res.Removed)
		}
	}
	must(t, os.RemoveAll(vms))
	res, err := CollectGarbage(t.Context(), GCOptions{
		DataDir: realDir, Live: liveDirs(current, user), CacheMax: 0, DryRun: true, RetireBase: retire(t, true, old),
	})
	must(t, err)
	if res.Removed["base"] != 1 {
		t.Errorf("dry run of %s, the old build retired by up's spelling: removed %v, want it", realDir, res.Removed)
	}
}
