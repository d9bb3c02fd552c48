package template

// These tests build template storage as the builder lays it out, with real
// files in a temporary data directory: qcow2 layers that name their backing
// files in their headers, cache entries, artifacts with snapshot disks, VM
// state and blob storage that build on them.

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
)

// tree is a data directory under construction.
type tree struct {
	t       *testing.T
	dataDir string
	kernel  string // the base template's boot files, which builds name
	initrd  string
}

func newTree(t *testing.T) *tree {
	t.Helper()
	tr := &tree{t: t, dataDir: t.TempDir()}
	for _, d := range []string{layersDir, finalsDir, sourcesDir, "base/0123456789abcdef"} {
		must(t, os.MkdirAll(tr.path(d), 0o700))
	}
	tr.kernel, tr.initrd = tr.path("base/0123456789abcdef/kernel"), tr.path("base/0123456789abcdef/initramfs.cpio")
	tr.file(tr.kernel, 64<<10)
	tr.file(tr.initrd, 64<<10)
	return tr
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// path is p under the data directory's templates/.
func (tr *tree) path(p string) string { return filepath.Join(tr.dataDir, "templates", p) }

// file writes size random (so: allocated) bytes to p.
func (tr *tree) file(p string, size int) string {
	tr.t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	must(tr.t, os.MkdirAll(filepath.Dir(p), 0o700))
	must(tr.t, os.WriteFile(p, b, 0o600))
	return p
}

// qcow2 makes p a qcow2 overlay of backing as the runtime does, grown to
// size bytes by data after its tables (which QEMU never reads: they stand
// for the step's writes).
func (tr *tree) qcow2(p, backing string, size int) string {
	tr.t.Helper()
	must(tr.t, os.MkdirAll(filepath.Dir(p), 0o700))
	format := "raw"
	if strings.HasSuffix(backing, ".qcow2") {
		format = "qcow2"
	}
	must(tr.t, microvm.WriteOverlay(p, backing, format))
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	must(tr.t, err)
	defer f.Close()
	fi, err := f.Stat()
	must(tr.t, err)
	if grow := size - int(fi.Size()); grow > 0 {
		b := make([]byte, grow)
		rand.Read(b)
		_, err = f.Write(b)
		must(tr.t, err)
	}
	return p
}

func (tr *tree) source(name string) string {
	return tr.file(tr.path(sourcesDir+"/"+name+".ext4"), 1<<20)
}

// layer makes step hash's layer of build over backing, and its cache entry
// last used at used (zero: no entry).
func (tr *tree) layer(hash, build, backing string, used time.Time) string {
	p := tr.qcow2(tr.path(layersDir+"/"+hash+"-"+build+".qcow2"), backing, 1<<20)
	if !used.IsZero() {
		tr.entry(tr.path(layersDir+"/"+hash+".json"), layerEntry{Layer: p, Step: "1", CreatedAt: used}, used)
	}
	return p
}

func (tr *tree) entry(p string, v any, used time.Time) {
	tr.t.Helper()
	b, _ := json.Marshal(v)
	must(tr.t, os.WriteFile(p, b, 0o600))
	must(tr.t, os.Chtimes(p, used, used))
}

// artifact makes the artifact of build b of template tpl over root: its
// snapshot disk an overlay of root, as the builder leaves it.
func (tr *tree) artifact(tpl, b, root string) string {
	return tr.artifactAt(ArtifactDir(tr.dataDir, tpl, b), root)
}

// artifactAt makes an artifact in dir (a snapshot's, in blob storage).
func (tr *tree) artifactAt(dir, root string) string {
	return tr.artifactBooting(dir, root, tr.kernel, tr.initrd)
}

// artifactBooting makes an artifact in dir whose VM boots kernel and initrd.
func (tr *tree) artifactBooting(dir, root, kernel, initrd string) string {
	tr.t.Helper()
	a := &Artifact{
		BuildID: filepath.Base(dir), Dir: dir, Kernel: kernel, Initramfs: initrd, RootDisk: root,
		Snapshot: filepath.Join(dir, snapshotDir), CPUs: 2, MemoryMiB: 512,
	}
	tr.qcow2(microvm.SnapshotDisk(a.Snapshot), root, 64<<10)
	tr.file(filepath.Join(a.Snapshot, "mem"), 1<<20)
	must(tr.t, os.WriteFile(filepath.Join(a.Snapshot, "manifest.json"), []byte(`{"memory":"file"}`), 0o600))
	must(tr.t, os.WriteFile(filepath.Join(dir, initSecretFile), []byte("secret\n"), 0o600))
	b, _ := json.Marshal(a)
	must(tr.t, os.WriteFile(filepath.Join(dir, artifactFile), b, 0o644))
	return dir
}

// final makes the cache entry of a final snapshot: the artifact at dir.
func (tr *tree) final(key, dir string, used time.Time) string {
	p := tr.path(finalsDir + "/" + key + ".json")
	tr.entry(p, finalEntry{Artifact: dir}, used)
	return p
}

func (tr *tree) collect(opts GCOptions) *GCResult {
	tr.t.Helper()
	opts.DataDir = tr.dataDir
	res, err := CollectGarbage(context.Background(), opts)
	must(tr.t, err)
	return res
}

// wantExist checks which paths exist.
func wantExist(t *testing.T, exist bool, paths ...string) {
	t.Helper()
	for _, p := range paths {
		_, err := os.Stat(p)
		if exist && err != nil {
			t.Errorf("%s is gone, want it kept", p)
		}
		if !exist && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s is there (%v), want it removed", p, err)
		}
	}
}

var (
	t0     = time.Now().Add(-72 * time.Hour)
	hourly = func(n int) time.Time { return t0.Add(time.Duration(n) * time.Hour) }
)

func TestGCRemovesWhatNothingUses(t *testing.T) {
	tr := newTree(t)
	// Template t1, live: source ← step 1 ← step 2 ← its snapshot disk.
	src := tr.source("s1")
	l1 := tr.layer("h1", "b1", src, hourly(1))
	l2 := tr.layer("h2", "b1", l1, hourly(1))
	live := tr.artifact("t1", "b1", l2)
	fin := tr.final("f1", live, hourly(1))
	// A deleted template's build and its own steps, over a source of its own.
	src2 := tr.source("s2")
	l3 := tr.layer("h3", "b2", src2, time.Time{})
	dead := tr.artifact("t2", "b2", l3)
	// Leftovers: a crashed build's directory, an old temporary file.
	crashed := tr.path("t1/b3")
	must(t, os.MkdirAll(crashed, 0o700))
	tmp := tr.file(tr.path(layersDir+"/.h9.json.tmp-123"), 10)
	must(t, os.Chtimes(tmp, t0, t0))
	fresh := tr.file(tr.path(layersDir+"/.h8.json.tmp-456"), 10)
	// Entries broken by hand or by an older warren, which the builder would
	// trust: a layer whose source is gone; a final whose artifact lost its
	// snapshot disk (its manifest is there).
	gone := tr.source("gone")
	l4 := tr.layer("h4", "b4", gone, hourly(2))
	must(t, os.Remove(gone))
	broken := tr.artifact("t3", "b4", l2)
	must(t, os.Remove(microvm.SnapshotDisk(filepath.Join(broken, snapshotDir))))
	tr.final("f4", broken, hourly(2))
	if b := brokenTrusted(tr); len(b) != 2 {
		t.Fatalf("the builder trusts broken %q, want h4.json and f4.json", b)
	}

	res := tr.collect(GCOptions{Live: liveDirs(live), CacheMax: NoCacheLimit})
	wantExist(t, true, src, l1, l2, live, fin, tr.path(layersDir+"/h1.json"), tr.path(layersDir+"/h2.json"), fresh, tr.kernel)
	wantExist(t, false, src2, l3, dead, filepath.Dir(dead), crashed, tmp, l4, broken)
	if want := map[string]int{"layer": 2, "source": 1, "artifact": 3}; !mapsEqual(res.Removed, want) {
		t.Errorf("removed %v, want %v", res.Removed, want)
	}
	if b := brokenTrusted(tr); len(b) != 0 || res.Stale != 2 {
		t.Errorf("after the collection the builder trusts broken %q (%d stale entries removed, want 2)", b, res.Stale)
	}
	if res.FreedBytes < 3<<20 || res.LiveBytes < 3<<20 || res.CacheBytes != 0 || res.CacheEntries != 3 {
		t.Errorf("result %+v: want ≥3 MiB freed and live, no cache beyond the live build, 3 entries", res)
	}
	if _, err := LoadArtifact(live); err != nil {
		t.Errorf("the live build: %v", err)
	}

	t.Run("a dry run removes nothing", func(t *testing.T) {
		tr := newTree(t)
		orphan := tr.layer("h1", "b1", tr.source("s1"), time.Time{})
		res := tr.collect(GCOptions{DryRun: true, CacheMax: NoCacheLimit})
		wantExist(t, true, orphan)
		if res.Removed["layer"] != 1 || res.Removed["source"] != 1 {
			t.Errorf("dry run reports %v, want a layer and a source", res.Removed)
		}
	})
}

// liveDirs is GCOptions.Live of a store that lists dirs.
func liveDirs(dirs ...string) func(context.Context) ([]string, error) {
	return func(context.Context) ([]string, error) { return dirs, nil }
}

func mapsEqual(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

// TestGCKeepsChains checks every kind of root keeps what it builds on, down
// to the source, when nothing else does.
func TestGCKeepsChains(t *testing.T) {
	for _, tc := range []struct {
		name string
		// root makes, over the snapshot disk of the otherwise unused build
		// parent, a root; it returns GCOptions naming it.
		root func(tr *tree, parentDisk string) GCOptions
	}{
		{"a template built from the template (fromTemplate)", func(tr *tree, disk string) GCOptions {
			step := tr.layer("hc", "bc", disk, time.Time{})
			return GCOptions{Live: liveDirs(tr.artifact("child", "bc", step))}
		}},
		{"a template from the template without steps", func(tr *tree, disk string) GCOptions {
			return GCOptions{Live: liveDirs(tr.artifact("child", "bc", disk))}
		}},
		{"a snapshot template in blob storage", func(tr *tree, disk string) GCOptions {
			blobs := filepath.Join(tr.dataDir, "blobs")
			dir := tr.artifactAt(filepath.Join(blobs, "snapshots", "s1", "b1"), disk)
			return GCOptions{Live: liveDirs(dir), InUse: []string{blobs}}
		}},
		{"a paused sandbox", func(tr *tree, disk string) GCOptions {
			blobs := filepath.Join(tr.dataDir, "blobs")
			tr.qcow2(filepath.Join(blobs, "paused", "i1", "vm", "rootfs.qcow2"), disk, 64<<10)
			return GCOptions{InUse: []string{blobs}}
		}},
		{"a running sandbox", func(tr *tree, disk string) GCOptions {
			vms := filepath.Join(tr.dataDir, "vms")
			tr.qcow2(filepath.Join(vms, "i1", "overlay.qcow2"), disk, 64<<10)
			return GCOptions{InUse: []string{vms, filepath.Join(tr.dataDir, "blobs")}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTree(t)
			src := tr.source("s")
			l1 := tr.layer("h1", "bp", src, time.Time{})
			parent := tr.artifact("parent", "bp", l1)
			opts := tc.root(tr, microvm.SnapshotDisk(filepath.Join(parent, snapshotDir)))
			opts.CacheMax = 0
			res := tr.collect(opts)
			wantExist(t, true, src, l1, parent)
			if res.Removed["layer"]+res.Removed["source"]+res.Removed["artifact"] != 0 {
				t.Errorf("removed %v, want nothing", res.Removed)
			}
			if _, err := LoadArtifact(parent); err != nil {
				t.Errorf("the parent build: %v", err)
			}
		})
	}
}

// cachedSteps is what a build of the steps with hashes would find cached,
// as the builder looks (marking the entries used).
func (tr *tree) cachedSteps(hashes ...string) int {
	bd := &build{b: &LocalBuilder{cfg: BuilderConfig{DataDir: tr.dataDir}}, hashes: append([]string{"source"}, hashes...)}
	bd.req.Steps = make([]Step, len(hashes))
	n, _ := bd.cachedSteps()
	return n
}

func TestGCEvictsLeastRecentlyUsed(t *testing.T) {
	tr := newTree(t)
	// Three cached chains of one step each over a source of its own (2 MiB
	// a chain), used an hour apart, and a live one.
	var chains [3][2]string
	for i, name := range []string{"a", "b", "c"} {
		src := tr.source(name)
		chains[i] = [2]string{src, tr.layer("h"+name, "b"+name, src, hourly(i))}
	}
	liveSrc := tr.source("live")
	liveStep := tr.layer("hl", "bl", liveSrc, hourly(-10))
	live := tr.artifact("t", "bl", liveStep)

	// Room for two chains: the least recently used one goes.
	res := tr.collect(GCOptions{Live: liveDirs(live), CacheMax: 4<<20 + 64<<10})
	wantExist(t, false, chains[0][:]...)
	wantExist(t, true, chains[1][0], chains[1][1], chains[2][0], chains[2][1], liveSrc, liveStep, live)
	if res.Evicted != 1 || res.CacheEntries != 3 || res.CacheBytes < 4<<20 || res.CacheBytes > 4<<20+64<<10 {
		t.Errorf("result %+v: want 1 evicted, 3 entries kept (2 chains and the live step's, which costs nothing)", res)
	}
	if tr.cachedSteps("ha") != 0 || tr.cachedSteps("hl") != 1 {
		t.Error("the builder finds the evicted step cached, or not the live one")
	}

	// A build that hits b's step makes it the most recently used: c goes.
	if tr.cachedSteps("hb") != 1 {
		t.Fatal("step hb is not cached")
	}
	tr.collect(GCOptions{Live: liveDirs(live), CacheMax: 2<<20 + 64<<10})
	wantExist(t, true, chains[1][:]...)
	wantExist(t, false, chains[2][:]...)

	// 0 keeps what costs nothing; off keeps every entry.
	tr.collect(GCOptions{Live: liveDirs(live), CacheMax: NoCacheLimit})
	wantExist(t, true, chains[1][:]...)
	res = tr.collect(GCOptions{Live: liveDirs(live), CacheMax: 0})
	wantExist(t, false, chains[1][:]...)
	wantExist(t, true, liveSrc, liveStep, live, tr.path(layersDir+"/hl.json"))
	if res.CacheEntries != 1 || res.CacheBytes != 0 {
		t.Errorf("with 0: %d entries keep %d bytes, want the live step's alone, for nothing", res.CacheEntries, res.CacheBytes)
	}
}

func TestGCKeepsWhatRunningBuildsUse(t *testing.T) {
	tr := newTree(t)
	src := tr.source("s")
	cached := tr.layer("h1", "old", src, hourly(1)) // the layer the build boots
	release, err := pinBuild(t.Context(), tr.dataDir, "run1", []string{src, cached, ArtifactDir(tr.dataDir, "t", "run1")})
	must(t, err)
	// What it has made so far: a layer no entry names yet, its artifact
	// directory without artifact.json.
	own := tr.layer("h2", "run1", cached, time.Time{})
	dir := ArtifactDir(tr.dataDir, "t", "run1")
	must(t, os.MkdirAll(filepath.Join(dir, snapshotDir), 0o700))
	// A build that died: its pin is held by no one.
	dead := tr.layer("h3", "run2", src, time.Time{})
	must(t, os.WriteFile(tr.path(pinsDir+"/run2"), []byte(`{"build":"run2","uses":["`+src+`"]}`), 0o600))

	tr.collect(GCOptions{CacheMax: 0})
	wantExist(t, true, src, cached, own, dir)
	wantExist(t, false, dead, tr.path(pinsDir+"/run2"))

	release()
	tr.collect(GCOptions{CacheMax: 0})
	wantExist(t, false, src, cached, own, dir)

	t.Run("the store is asked under the cache lock", func(t *testing.T) {
		asked := false
		tr.collect(GCOptions{Live: func(ctx context.Context) ([]string, error) {
			asked = true
			ctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			if unlock, err := LockCache(ctx, tr.dataDir); err == nil {
				unlock()
				t.Error("a build could start while the collection asked the store for its roots")
			}
			return nil, nil
		}})
		if !asked {
			t.Error("Live was not called")
		}
	})

	t.Run("a collection waits for a build picking its cache entries", func(t *testing.T) {
		unlock, err := lockCache(t.Context(), tr.dataDir, nil)
		must(t, err)
		done := make(chan error, 1)
		go func() {
			_, err := CollectGarbage(t.Context(), GCOptions{DataDir: tr.dataDir})
			done <- err
		}()
		select {
		case err := <-done:
			t.Fatalf("the collection ran under a held cache lock (err %v)", err)
		case <-time.After(500 * time.Millisecond):
		}
		unlock()
		select {
		case err := <-done:
			must(t, err)
		case <-time.After(5 * time.Second):
			t.Fatal("the collection did not run once the lock was free")
		}
	})
}

// crashTree is a data directory with something of every kind to remove and
// to keep; it returns what must stay.
func crashTree(tr *tree) (live string, keep []string) {
	src := tr.source("s")
	l1 := tr.layer("h1", "b1", src, hourly(5))
	l2 := tr.layer("h2", "b1", l1, hourly(5))
	live = tr.artifact("t1", "b1", l2)
	keep = []string{src, l1, l2, live}
	// An old chain over another source, its entries and a deleted
	// template's build with its final entry: evicted, all of it.
	old := tr.source("old")
	o1 := tr.layer("o1", "b2", old, hourly(1))
	o2 := tr.layer("o2", "b2", o1, hourly(1))
	tr.final("fo", tr.artifact("t2", "b2", o2), hourly(1))
	// Broken already: an entry whose layer's source is gone, a final
	// whose artifact lost its snapshot.
	gone := tr.source("gone")
	tr.layer("g1", "b3", gone, hourly(2))
	os.Remove(gone)
	broken := tr.artifact("t3", "b3", l2)
	os.RemoveAll(filepath.Join(broken, snapshotDir))
	tr.final("fb", broken, hourly(2))
	// A superseded base build and a cached step built on it (fromTemplate
	// base): the entry goes before the build.
	keep = append(keep, tr.baseImage()...)
	must(tr.t, RetireBaseBuild(tr.baseBuild(oldBase)))
	tr.layer("ob", "b4", tr.baseDisk(oldBase), hourly(3))
	return live, keep
}

// brokenTrusted lists the cache entries the builder would use though what
// they name is not whole: a layer over files missing along its chain, an
// artifact that loads but whose snapshot disk's chain is broken.
func brokenTrusted(tr *tree) []string {
	var out []string
	bd := &build{b: &LocalBuilder{cfg: BuilderConfig{DataDir: tr.dataDir}}}
	chain := microvmtest.OpenChain
	entries, _ := filepath.Glob(tr.path(layersDir + "/*.json"))
	for _, e := range entries {
		if layer := bd.layerOf(strings.TrimSuffix(filepath.Base(e), ".json")); layer != "" {
			if chain(layer) != nil {
				out = append(out, filepath.Base(e))
			}
		}
	}
	finals, _ := filepath.Glob(tr.path(finalsDir + "/*.json"))
	for _, f := range finals {
		if a, ok := bd.cachedFinal(strings.TrimSuffix(filepath.Base(f), ".json")); ok {
			if chain(microvm.SnapshotDisk(a.Snapshot)) != nil {
				out = append(out, filepath.Base(f))
			}
		}
	}
	return out
}

// TestGCCrashLeavesNothingTrustedBroken stops a collection after each of
// its removals, as a crash would: at every point every cache entry the
// builder would trust is whole, and the next collection finishes the work.
func TestGCCrashLeavesNothingTrustedBroken(t *testing.T) {
	probe := newTree(t)
	live, _ := crashTree(probe)
	// What the tree breaks on purpose: the builder trusts it until a
	// collection removes it.
	brokenBefore := brokenTrusted(probe)
	if !slices.Equal(brokenBefore, []string{"g1.json"}) {
		t.Fatalf("before any collection the builder trusts broken %q, want g1.json", brokenBefore)
	}
	c := newCollector(GCOptions{DataDir: probe.dataDir, Live: liveDirs(live), CacheMax: 0})
	c.baseLocked = true // as CollectGarbage, which holds the base builds' lock
	steps, err := c.plan(t.Context())
	must(t, err)
	if len(steps) < 8 {
		t.Fatalf("the sweep has %d steps; the tree should need more", len(steps))
	}
	for k := 0; k <= len(steps); k++ {
		tr := newTree(t)
		live, keep := crashTree(tr)
		c := newCollector(GCOptions{DataDir: tr.dataDir, Live: liveDirs(live), CacheMax: 0})
		c.baseLocked = true
		steps, err := c.plan(t.Context())
		must(t, err)
		trash := tr.path(trashDir + "/gc-crashed")
		must(t, os.MkdirAll(trash, 0o700))
		moved := 0
		for i, st := range steps[:k] {
			must(t, c.do(st, trash, i))
			if st.item != nil {
				moved++
			}
		}
		// Each removal is one rename: what goes leaves its place whole,
		// and is deleted from the trash.
		if in, _ := os.ReadDir(trash); len(in) != moved {
			t.Errorf("crash after step %d: %d items in the trash, want the %d moved", k, len(in), moved)
		}
		for _, e := range brokenTrusted(tr) {
			if !slices.Contains(brokenBefore, e) {
				t.Errorf("crash after step %d of %d: the builder trusts %s, whose files are partly gone", k, len(steps), e)
			}
		}

		res := tr.collect(GCOptions{Live: liveDirs(live), CacheMax: 0})
		if b := brokenTrusted(tr); len(b) > 0 {
			t.Errorf("crash after step %d, then a collection: the builder trusts broken %q", k, b)
		}
		wantExist(t, true, keep...)
		wantExist(t, false, trash, tr.path(baseDir+"/"+oldBase))
		left := listTree(t, tr)
		want := []string{"base", layersDir, "h1.json", "h2.json", "h1-b1.qcow2", "h2-b1.qcow2", sourcesDir, "s.ext4", finalsDir, "t1", "b1"}
		slices.Sort(want)
		if !slices.Equal(left, want) {
			t.Errorf("crash after step %d of %d: left %q, want %q (result %+v)", k, len(steps), left, want, res)
		}
	}
}

// listTree names what is under templates/ (but base's and bookkeeping
// files), sorted.
func listTree(t *testing.T, tr *tree) []string {
	var out []string
	filepath.WalkDir(tr.path(""), func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == tr.path("") {
			return nil
		}
		name := d.Name()
		if strings.HasPrefix(name, ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		out = append(out, name)
		if d.IsDir() && (name == "base" || name == "b1") {
			return filepath.SkipDir
		}
		return nil
	})
	slices.Sort(out)
	return out
}

func TestParseCacheMax(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"20GiB", 20 << 30}, {"20gib", 20 << 30}, {"500MB", 500e6}, {"1.5 GiB", 3 << 29},
		{"123", 123}, {"4096B", 4096}, {"2TB", 2e12}, {"0", 0}, {"off", NoCacheLimit}, {"OFF", NoCacheLimit},
	} {
		if got, err := ParseCacheMax(tc.in); err != nil || got != tc.want {
			t.Errorf("ParseCacheMax(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "-1", "20G", "1e9", "GiB", "twenty", "0x10", "20 GiBs", "nan", "99999999TiB"} {
		_, err := ParseCacheMax(in)
		if err == nil || !strings.Contains(err.Error(), "KiB, MiB, GiB, TiB") || !strings.Contains(err.Error(), "off") {
			t.Errorf("ParseCacheMax(%q) = %v, want an error listing the accepted forms", in, err)
		}
	}
}
