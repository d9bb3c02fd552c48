package template

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/fslock"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// Garbage collection of template build storage (CollectGarbage).
//
// What may go, under <dataDir>/templates: step layers (layers/*.qcow2),
// source disks (sources/*.ext4), build artifacts (<template>/<build>/) and
// the base template's builds (base/<16 hex digits>/, EnsureBase; only those
// the store retired, below), each as a whole. The base image beside those
// (base/rootfs.ext4, manifest.json) and anything else in base/ is never
// touched. What references what:
//
//	artifact  artifact.json names its root disk (the last step's layer, a
//	          source, or another artifact's snapshot disk), its kernel and
//	          initramfs; snapshot/rootfs.qcow2 is an overlay over the root disk
//	layer     a qcow2 overlay over the layer before it, the first over a
//	          source or a template's snapshot disk (fromTemplate)
//	VM, blob  a sandbox's disk overlay (vms/<id>/), a paused sandbox's or a
//	          snapshot's disk (blobs/...) is an overlay over a template
//	          build's snapshot disk
//	base      a base build's artifact names files of its own only; user
//	          templates name its snapshot disk (fromTemplate base), its
//	          kernel and initramfs (fromImage builds boot those)
//
// so the chains are read where QEMU reads them: in the qcow2 headers. The
// roots are the live artifacts (GCOptions.Live), every qcow2 image and
// artifact under GCOptions.InUse, and running builds (pins, below). The cache
// entries (layers/<hash>.json → a layer, finals/<key>.json → an artifact) are
// kept, most recently used first, while what they keep beyond the roots fits
// GCOptions.CacheMax; everything neither reaches is removed.
//
// Base builds are the exception: a collection removes only those the store
// retired (GCOptions.RetireBase marks each, RetireBaseBuild, before the store
// drops it), once no root reaches them, and dead ones (no artifact.json: a
// build that died). A base build it merely finds unlisted stays: the data
// directory may be shared with what another store, or none, recorded (a
// store reset, tests sharing a cache of base builds), and a base build
// wrongly removed breaks whoever restores it next, while one wrongly kept
// only takes disk. A retired build no root reaches is superseded: no build
// can start from it again, so the cache entries that reach it are stale.
//
// A base build's directory has no artifact.json while EnsureBase makes it,
// and one the store does not list until EnsureBase has recorded it
// (BaseOptions.Register): both under base/.artifact.lock, as are a
// retirement and EnsureBase taking a retired build back (it clears the
// mark). A collection takes that lock if it is free, and otherwise leaves
// the base builds alone.
//
// Bookkeeping files under <dataDir>/templates:
//
//	.cache.lock        a collection holds it (flock) while it marks and
//	                   sweeps; a build holds it while it picks the cached
//	                   layers, source and snapshot it starts from and pins them
//	.building/<build>  a running build's pin: locked by the build while it
//	                   runs, JSON naming what it started from; a pin nobody
//	                   holds is a dead build's, and removed
//	.trash/            a collection moves what it removes here (by rename),
//	                   then deletes it; leftovers of a crash go next time
const (
	cacheLockFile = ".cache.lock"
	pinsDir       = ".building"
	trashDir      = ".trash"
)

// DefaultCacheMax is the default GCOptions.CacheMax: the disk the build
// cache may keep beyond what live templates, sandboxes and builds need.
const DefaultCacheMax int64 = 20 << 30

// NoCacheLimit as GCOptions.CacheMax keeps every valid cache entry: only
// what nothing references is removed.
const NoCacheLimit int64 = -1

// staleTempAge is how old a temporary file of an atomic write
// (".<name>.tmp-*") must be before a collection takes it for a crash's
// leftover: the writes take milliseconds.
const staleTempAge = time.Hour

// sizeNumber is the number of a cache size: digits, maybe a fraction.
var sizeNumber = regexp.MustCompile(`^[0-9]+(\.[0-9]+)?$`)

// ParseCacheMax parses a cache size limit: a number of bytes with an optional
// unit (KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024),
// or "off" (NoCacheLimit). 0 keeps only the cache entries that cost nothing
// beyond what live builds need.
func ParseCacheMax(s string) (int64, error) {
	v := strings.TrimSpace(s)
	if strings.EqualFold(v, "off") {
		return NoCacheLimit, nil
	}
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1},
	}
	mult := int64(1)
	for _, u := range units {
		if len(v) > len(u.suffix) && strings.EqualFold(v[len(v)-len(u.suffix):], u.suffix) {
			v, mult = strings.TrimSpace(v[:len(v)-len(u.suffix)]), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(v, 64)
	if !sizeNumber.MatchString(v) || err != nil || n*float64(mult) > 1<<62 {
		return 0, fmt.Errorf("%q is not a cache size: want bytes with an optional unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB), such as 20GiB or 500MB; 0 (keep only what live builds use); or off (no limit)", s)
	}
	return int64(n * float64(mult)), nil
}

// GCOptions says what CollectGarbage keeps.
type GCOptions struct {
	// DataDir is the data directory whose templates/ is collected.
	DataDir string
	// Live returns the artifact directories of the builds the store lists
	// as ready (in templates/ or in blob storage), and those of builds it
	// lists as building: kept, with everything they reference. It is called
	// under the cache lock: a build that starts meanwhile waits, so none
	// makes an artifact the answer misses.
	Live func(context.Context) ([]string, error)
	// InUse are directories whose qcow2 images and artifacts use template
	// storage: the VM runtime's state (running sandboxes) and blob storage
	// (paused sandboxes, snapshots). Every one found is a root.
	InUse []string
	// RetireBase, when set, is called before Live under the cache lock and
	// the base builds' lock, so that no base build is being recorded
	// meanwhile: the store may drop the base builds nothing can start from
	// any more, marking each retired first (RetireBaseBuild), and returns
	// their artifact directories (with DryRun: those it would retire, and
	// marks nothing). Only retired base builds go, once nothing reaches
	// them. A collection that finds a base build being made does not call
	// it.
	RetireBase func(context.Context) (retired []string, err error)
	// CacheMax bounds the bytes the kept cache entries hold beyond the roots;
	// NoCacheLimit keeps every valid entry.
	CacheMax int64
	// DryRun reports what would be removed and removes nothing.
	DryRun bool
	// Log receives a line per collection that removes something (and the
	// broken references it finds); nil discards.
	Log *slog.Logger
}

// GCResult is what a collection found and removed (or, with DryRun, would).
type GCResult struct {
	// LiveBytes is what the roots keep in templates/; CacheBytes what the
	// kept cache entries (CacheEntries of them) keep beyond that. Files with
	// several hard links count a share per link.
	LiveBytes, CacheBytes int64
	CacheEntries          int
	// Evicted is how many entries were dropped to fit CacheMax; Stale how
	// many named something missing or broken, or built on a superseded base
	// build.
	Evicted, Stale int
	// Removed counts what went, by kind: "layer", "source", "artifact",
	// "base" (a base template build).
	Removed map[string]int
	// FreedBytes is what the removed files took.
	FreedBytes int64
}

// CollectGarbage removes from dataDir/templates what no root references and
// the cache entries beyond opts.CacheMax, least recently used first (a build
// that uses an entry marks it used). Removal is crash-safe: entries go first
// (each file at once), then the files they named, each moved aside by one
// rename before it is deleted, so no entry ever names something half-gone.
// It waits for builds that are picking their cache entries, and keeps what
// running builds use.
func CollectGarbage(ctx context.Context, opts GCOptions) (*GCResult, error) {
	c := newCollector(opts)
	if _, err := os.Stat(c.root); errors.Is(err, fs.ErrNotExist) {
		return c.res, nil
	}
	began := time.Now()
	unlock, err := lockCache(ctx, opts.DataDir, nil)
	if err != nil {
		return nil, fmt.Errorf("template gc: %w", err)
	}
	unlockBase, err := c.lockBase()
	if err != nil {
		unlock()
		return nil, fmt.Errorf("template gc: %w", err)
	}
	trash, err := c.collect(ctx)
	unlockBase()
	unlock()
	if trash != "" {
		if rerr := os.RemoveAll(trash); rerr != nil {
			err = errors.Join(err, rerr)
		}
		os.Remove(filepath.Dir(trash)) // unless another collection's is there
	}
	if err != nil {
		return nil, fmt.Errorf("template gc: %w", err)
	}
	r := c.res
	if r.Removed["layer"]+r.Removed["source"]+r.Removed["artifact"]+r.Removed["base"]+r.Evicted+r.Stale > 0 {
		msg := "template storage collected"
		if opts.DryRun {
			msg = "template storage collection (dry run: nothing removed)"
		}
		c.opts.Log.Info(msg, "freed_bytes", r.FreedBytes, "layers", r.Removed["layer"], "sources", r.Removed["source"],
			"artifacts", r.Removed["artifact"], "base_builds", r.Removed["base"],
			"evicted_entries", r.Evicted, "stale_entries", r.Stale,
			"cache_bytes", r.CacheBytes, "cache_entries", r.CacheEntries, "live_bytes", r.LiveBytes,
			"took", time.Since(began).Round(time.Millisecond))
	}
	return r, nil
}

// LockCache holds off collections of dataDir's template storage until
// unlock. A Builder that writes under dataDir/templates takes it while it
// picks what it builds on and makes its artifact directory (LocalBuilder
// does, and then pins what it uses for the rest of the build): a collection
// under way would not know them.
func LockCache(ctx context.Context, dataDir string) (unlock func(), err error) {
	return lockCache(ctx, dataDir, nil)
}

func lockCache(ctx context.Context, dataDir string, waiting func()) (func(), error) {
	return fslock.Lock(ctx, filepath.Join(dataDir, "templates", cacheLockFile), waiting)
}

// lockBase takes the base builds' lock (EnsureBase's) if it is free. While
// EnsureBase holds it, a build's directory may lack artifact.json or the
// store's row: the collection leaves base/ alone then.
func (c *collector) lockBase() (unlock func(), err error) {
	dir := filepath.Join(c.root, baseDir)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return func() {}, nil
	}
	unlock, ok, err := fslock.TryLock(filepath.Join(dir, lockFile))
	if err != nil {
		return nil, err
	}
	if !ok {
		c.opts.Log.Info("template gc: a base template build is being made or recorded; base builds are left for the next collection")
		return func() {}, nil
	}
	c.baseLocked = true
	return unlock, nil
}

// baseBuildName is the name of a base build's directory
// (BaseInputs.BuildID).
var baseBuildName = regexp.MustCompile(`^[0-9a-f]{16}$`)

// RetireBaseBuild marks the base build in dir retired by the store that
// recorded it: a collection may remove it once nothing reaches it. Call it
// in GCOptions.RetireBase, before the store drops the build (a crash in
// between leaves a listed build, retired again next time, rather than an
// unlisted one no collection removes). A missing dir is no error.
func RetireBaseBuild(dir string) error {
	err := os.WriteFile(filepath.Join(dir, retiredFile), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o600)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("mark base build %s retired: %w", dir, err)
	}
	return nil
}

// item is something a collection may remove: a layer or source file, or an
// artifact directory (a base build's too).
type item struct {
	kind  string // "layer", "source", "artifact", "base"
	path  string
	bytes int64 // -1 until measured
}

// entry is a cache entry: a layer's or a final snapshot's.
type entry struct {
	path   string
	target string // the layer file or artifact directory it names
	final  bool
	used   time.Time
}

type collector struct {
	root  string
	opts  GCOptions
	items map[string]*item    // by path
	refs  map[string][]string // what a path references, once read
	res   *GCResult

	entries  []*entry
	bad      []*entry // entries that cannot be read
	roots    []string
	emptyDir []string // template directories without builds
	temps    []string // leftovers of atomic writes
	// baseLocked says the collection holds the base builds' lock: only
	// then are they items.
	baseLocked bool
}

func newCollector(opts GCOptions) *collector {
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	// The paths the collection compares come from the store, qcow2 headers
	// and pins, spelled as warren up spells its data directory: the real
	// path of the directory finds them when it is given another way
	// (relative, or through a symlink; see owner).
	root := filepath.Join(opts.DataDir, "templates")
	if abs, err := filepath.Abs(root); err == nil {
		root = abs
	}
	if real, err := filepath.EvalSymlinks(root); err == nil {
		root = real
	}
	return &collector{
		root: root, opts: opts,
		items: map[string]*item{}, refs: map[string][]string{},
		res: &GCResult{Removed: map[string]int{}},
	}
}

// sweepStep is one removal of a collection: an entry file, or an item moved
// to the trash.
type sweepStep struct {
	entry string
	item  *item
}

// collect marks and sweeps under the cache lock; it returns the trash
// directory to delete once the lock is released.
func (c *collector) collect(ctx context.Context) (string, error) {
	steps, err := c.plan(ctx)
	if err != nil || c.opts.DryRun || ctx.Err() != nil {
		return "", cmp.Or(err, ctx.Err())
	}
	trash := ""
	for i, st := range steps {
		if st.item != nil && trash == "" {
			if err := os.MkdirAll(filepath.Join(c.root, trashDir), 0o700); err != nil {
				return "", err
			}
			if trash, err = os.MkdirTemp(filepath.Join(c.root, trashDir), "gc-"); err != nil {
				return "", err
			}
		}
		if err := c.do(st, trash, i); err != nil {
			return trash, err
		}
	}
	for _, d := range c.emptyDir {
		os.Remove(d) // only if still empty
	}
	for _, st := range steps {
		if st.item != nil && st.item.kind == "artifact" {
			os.Remove(filepath.Dir(st.item.path)) // the template's last build gone
		}
	}
	for _, p := range c.temps {
		os.Remove(p)
	}
	return trash, nil
}

// plan marks what the roots and the kept cache entries reach and returns
// what to remove, in a crash-safe order: the entries first, so that from
// then on no build trusts the items that go next, each by one rename.
func (c *collector) plan(ctx context.Context) ([]sweepStep, error) {
	if err := c.scan(); err != nil {
		return nil, err
	}
	if err := c.findRoots(ctx); err != nil {
		return nil, err
	}
	kept, missing, err := c.closure(c.roots)
	if err != nil {
		return nil, err
	}
	for _, p := range missing {
		c.opts.Log.Warn("template gc: a live build references a missing file", "path", p)
	}
	for it := range kept {
		c.res.LiveBytes += c.size(it)
	}
	drop, err := c.pickEntries(kept)
	if err != nil {
		return nil, err
	}
	var steps []sweepStep
	for _, p := range drop {
		steps = append(steps, sweepStep{entry: p})
	}
	var garbage []*item
	for _, it := range c.items {
		if !kept[it] {
			garbage = append(garbage, it)
		}
	}
	slices.SortFunc(garbage, func(a, b *item) int { return strings.Compare(a.path, b.path) })
	for _, it := range garbage {
		c.res.Removed[it.kind]++
		c.res.FreedBytes += c.size(it)
		steps = append(steps, sweepStep{item: it})
	}
	return steps, nil
}

// do takes step i of a sweep.
func (c *collector) do(st sweepStep, trash string, i int) error {
	if st.item == nil {
		if err := os.Remove(st.entry); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	return os.Rename(st.item.path, filepath.Join(trash, fmt.Sprintf("%d-%s", i, filepath.Base(st.item.path))))
}

// scan lists the items, entries and leftovers under the templates directory,
// and deletes the trash of an earlier collection that did not finish.
func (c *collector) scan() error {
	tops, err := os.ReadDir(c.root)
	if err != nil {
		return err
	}
	for _, top := range tops {
		name := top.Name()
		dir := filepath.Join(c.root, name)
		switch {
		case name == trashDir:
			if !c.opts.DryRun {
				if err := os.RemoveAll(dir); err != nil {
					return err
				}
			}
		case !top.IsDir() || strings.HasPrefix(name, ".") || name == baseDir:
			// base/: scanBase, once the store has retired what it retires.
		case name == layersDir, name == sourcesDir, name == finalsDir:
			if err := c.scanCache(dir, name); err != nil {
				return err
			}
		default:
			builds, err := os.ReadDir(dir)
			if err != nil {
				return err
			}
			if len(builds) == 0 {
				c.emptyDir = append(c.emptyDir, dir)
			}
			for _, b := range builds {
				if b.IsDir() {
					c.addItem("artifact", filepath.Join(dir, b.Name()))
				}
			}
		}
	}
	return nil
}

// scanCache lists layers/, sources/ or finals/.
func (c *collector) scanCache(dir, name string) error {
	files, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, f := range files {
		p := filepath.Join(dir, f.Name())
		if !f.Type().IsRegular() {
			continue
		}
		switch fn := f.Name(); {
		case strings.HasPrefix(fn, ".") && strings.Contains(fn, ".tmp-"):
			if fi, err := f.Info(); err == nil && time.Since(fi.ModTime()) > staleTempAge {
				c.temps = append(c.temps, p)
			}
		case name == layersDir && strings.HasSuffix(fn, ".qcow2"):
			c.addItem("layer", p)
		case name == sourcesDir && strings.HasSuffix(fn, ".ext4"):
			c.addItem("source", p)
		case strings.HasSuffix(fn, ".json") && name != sourcesDir:
			c.readEntry(p, name == finalsDir, f)
		}
	}
	return nil
}

// scanBase lists the base builds that may go: those marked retired, those
// named in retired (RetireBase's answer: in a dry run they are not marked)
// and dead ones, without artifact.json (under the base builds' lock no
// build is being made, and EnsureBase would redo such a one from scratch).
// Any other base build stays, with the base image and the lock files.
func (c *collector) scanBase(retired []string) error {
	dir := filepath.Join(c.root, baseDir)
	builds, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	named := map[string]bool{}
	for _, p := range retired {
		if rel, ok := c.rel(p); ok {
			named[rel] = true
		}
	}
	for _, b := range builds {
		if !b.IsDir() || !baseBuildName.MatchString(b.Name()) {
			continue
		}
		p := filepath.Join(dir, b.Name())
		_, markErr := os.Stat(filepath.Join(p, retiredFile))
		_, artErr := os.Stat(filepath.Join(p, artifactFile))
		if markErr == nil || named[filepath.Join(baseDir, b.Name())] || errors.Is(artErr, fs.ErrNotExist) {
			c.addItem("base", p)
		}
	}
	return nil
}

func (c *collector) addItem(kind, p string) {
	c.items[p] = &item{kind: kind, path: p, bytes: -1}
}

func (c *collector) readEntry(p string, final bool, f fs.DirEntry) {
	fi, ferr := f.Info()
	b, err := os.ReadFile(p)
	var target string
	if err == nil && ferr == nil {
		if final {
			var e finalEntry
			err = json.Unmarshal(b, &e)
			target = e.Artifact
		} else {
			var e layerEntry
			err = json.Unmarshal(b, &e)
			target = e.Layer
		}
	}
	e := &entry{path: p, target: target, final: final}
	if err != nil || ferr != nil || target == "" {
		c.bad = append(c.bad, e)
		return
	}
	e.used = fi.ModTime()
	c.entries = append(c.entries, e)
}

// findRoots gathers the live artifacts, what the InUse directories hold and
// what running builds use.
func (c *collector) findRoots(ctx context.Context) error {
	if c.baseLocked {
		var retired []string
		if c.opts.RetireBase != nil {
			var err error
			if retired, err = c.opts.RetireBase(ctx); err != nil {
				return fmt.Errorf("retire base builds: %w", err)
			}
		}
		if err := c.scanBase(retired); err != nil {
			return err
		}
	}
	if c.opts.Live != nil {
		live, err := c.opts.Live(ctx)
		if err != nil {
			return err
		}
		c.roots = append(c.roots, live...)
	}
	for _, dir := range c.opts.InUse {
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			switch {
			case errors.Is(err, fs.ErrNotExist):
				return nil // gone while walked (a VM that ended)
			case err != nil:
				return err
			case d.Type().IsRegular() && (strings.HasSuffix(p, ".qcow2") || d.Name() == artifactFile):
				c.roots = append(c.roots, p)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("find what %s uses: %w", dir, err)
		}
	}
	pins, err := os.ReadDir(filepath.Join(c.root, pinsDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, f := range pins {
		p := filepath.Join(c.root, pinsDir, f.Name())
		held, err := fslock.Held(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // the build just ended
		case err != nil:
			return err
		case !held:
			// A build that died: what it made is garbage now.
			if !c.opts.DryRun {
				os.Remove(p)
			}
			continue
		}
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		var pn buildPin
		if err == nil {
			err = json.Unmarshal(b, &pn)
		}
		if err != nil {
			return fmt.Errorf("running build's pin %s: %w", p, err)
		}
		c.roots = append(c.roots, pn.Uses...)
		// Its own layers, which no entry may name yet.
		for path, it := range c.items {
			if it.kind == "layer" && strings.HasSuffix(path, "-"+pn.Build+".qcow2") {
				c.roots = append(c.roots, path)
			}
		}
	}
	return nil
}

// pickEntries decides which cache entries stay: valid ones, most recently
// used first, while what they keep beyond kept fits CacheMax (adding what
// they keep to kept). It returns the entry files to remove.
func (c *collector) pickEntries(kept map[*item]bool) ([]string, error) {
	var drop []string
	for _, e := range c.bad {
		c.res.Stale++
		drop = append(drop, e.path)
	}
	slices.SortStableFunc(c.entries, func(a, b *entry) int { return b.used.Compare(a.used) })
	for _, e := range c.entries {
		reach, missing, err := c.closure([]string{e.target})
		if err != nil {
			return nil, err
		}
		if len(missing) > 0 || !c.valid(e) || supersededBase(reach, kept) {
			c.res.Stale++
			drop = append(drop, e.path)
			continue
		}
		var extra int64
		for it := range reach {
			if !kept[it] {
				extra += c.size(it)
			}
		}
		if c.opts.CacheMax != NoCacheLimit && c.res.CacheBytes+extra > c.opts.CacheMax {
			c.res.Evicted++
			drop = append(drop, e.path)
			continue
		}
		for it := range reach {
			kept[it] = true
		}
		c.res.CacheBytes += extra
		c.res.CacheEntries++
	}
	return drop, nil
}

// supersededBase reports whether what an entry reaches holds a base build
// that no root keeps. Such an entry can never be hit again: its key hashes
// what its build started from, and a build starts from the current base
// build (a root), from a live template (a root, which keeps its own base
// build) or from an image, whose boot files are the current base build's.
// Base builds are never a cached build's result, only its source.
func supersededBase(reach, kept map[*item]bool) bool {
	for it := range reach {
		if it.kind == "base" && !kept[it] {
			return true
		}
	}
	return false
}

// valid applies the builder's own checks of an entry (layerOf, cachedFinal).
func (c *collector) valid(e *entry) bool {
	if e.final {
		_, err := LoadArtifact(e.target)
		return err == nil
	}
	_, err := os.Stat(e.target)
	return err == nil
}

// closure returns the items the paths reach, and the paths among them (and
// along their chains) that are missing.
func (c *collector) closure(paths []string) (map[*item]bool, []string, error) {
	set := map[*item]bool{}
	seen := map[string]bool{}
	var missing []string
	stack := slices.Clone(paths)
	for len(stack) > 0 {
		p := filepath.Clean(stack[len(stack)-1])
		stack = stack[:len(stack)-1]
		if seen[p] || p == "." {
			continue
		}
		seen[p] = true
		if it := c.owner(p); it != nil {
			set[it] = true
			stack = append(stack, it.path)
		}
		refs, err := c.refsOf(p)
		if errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, p)
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		stack = append(stack, refs...)
	}
	return set, missing, nil
}

// owner is the item that holds path, if any.
func (c *collector) owner(p string) *item {
	rel, ok := c.rel(p)
	if !ok {
		return nil
	}
	parts := strings.SplitN(rel, string(filepath.Separator), 3)
	if len(parts) < 2 {
		return nil
	}
	return c.items[filepath.Join(c.root, parts[0], parts[1])]
}

// rel is p relative to the templates directory, if p is under it, maybe
// by another path (newCollector).
func (c *collector) rel(p string) (string, bool) {
	rel, err := filepath.Rel(c.root, p)
	if err == nil && filepath.IsLocal(rel) {
		return rel, true
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", false
	}
	if rel, err = filepath.Rel(c.root, real); err != nil || !filepath.IsLocal(rel) {
		return "", false
	}
	return rel, true
}

// refsOf is what the file or directory at p references: a qcow2 image's
// backing file; an artifact's root disk, snapshot disk and boot files.
func (c *collector) refsOf(p string) ([]string, error) {
	key := p
	if refs, ok := c.refs[key]; ok {
		return refs, nil
	}
	fi, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	var refs []string
	if fi.IsDir() {
		if fi, err := os.Stat(filepath.Join(p, artifactFile)); err == nil && fi.Mode().IsRegular() {
			p = filepath.Join(p, artifactFile)
		} else {
			c.refs[key] = nil // an unfinished build's, or not an artifact
			return nil, nil
		}
	}
	if filepath.Base(p) == artifactFile {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var a Artifact
		if err := json.Unmarshal(b, &a); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		for _, f := range []string{a.RootDisk, a.Kernel, a.Initramfs} {
			if f != "" {
				refs = append(refs, f)
			}
		}
		if a.Snapshot != "" {
			refs = append(refs, microvm.SnapshotDisk(a.Snapshot))
		}
	} else if backing, err := microvm.BackingFile(p); err != nil {
		return nil, err
	} else if backing != "" {
		refs = append(refs, backing)
	}
	c.refs[key] = refs
	return refs, nil
}

// size measures an item once: allocated blocks, a file with n hard links
// counting 1/n (its other links may be elsewhere: an image store's file, a
// snapshot that linkFinal shared).
func (c *collector) size(it *item) int64 {
	if it.bytes >= 0 {
		return it.bytes
	}
	var total int64
	filepath.WalkDir(it.path, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			total += st.Blocks * 512 / int64(max(st.Nlink, 1))
		} else {
			total += fi.Size()
		}
		return nil
	})
	it.bytes = total
	return total
}

// buildPin is a running build's pin file (.building/<build>).
type buildPin struct {
	Build string `json:"build"`
	// Uses are the files the build started from: its source disk, the
	// cached layer it boots, the cached snapshot it links.
	Uses []string `json:"uses"`
}

// pinBuild records that build runs and uses the files in uses, until the
// returned release. Call it under the cache lock.
func pinBuild(ctx context.Context, dataDir, build string, uses []string) (release func(), err error) {
	p := filepath.Join(dataDir, "templates", pinsDir, build)
	unlock, err := fslock.Lock(ctx, p, nil)
	if err != nil {
		return nil, err
	}
	b, _ := json.Marshal(buildPin{Build: build, Uses: slices.DeleteFunc(slices.Clone(uses), func(s string) bool { return s == "" })})
	if err := os.WriteFile(p, b, 0o600); err != nil {
		os.Remove(p)
		unlock()
		return nil, fmt.Errorf("pin build %s: %w", build, err)
	}
	return func() {
		os.Remove(p)
		unlock()
	}, nil
}

// markUsed records that a build used the cache entry at p: the collection
// evicts the least recently used entries first.
func markUsed(p string) {
	now := time.Now()
	os.Chtimes(p, now, now)
}
