// Package bench is `warren bench`: warren's speed and density measured with
// the official npm e2b SDK, each number beside its floor measured in the
// same run.
//
// A run owns the host's network slots throughout (one slot pool per host),
// so it runs everything itself, in order:
//
//  1. the floors: with its own microVM runtime and slot pool, raw clone
//     restores of the base template's snapshot until envd first answers
//     (the floor of time to interactive); then it closes the pool;
//  2. warren itself: server.Run in this process on a free 127.0.0.1 port,
//     with a fresh store and an API key of its own, in the bench's data dir;
//  3. the SDK side (test/compat/warren-bench.mjs, run with node, the npm
//     e2b SDK installed from test/compat's package-lock.json into the data
//     dir): time to interactive, command round trips beside envd's /health
//     through the same proxy and the command's run time in the guest, file
//     transfers beside a loopback HTTP copy of the same bytes, pause and
//     resume, idle sandboxes until a count (the bench reads host memory);
//  4. the report: markdown, a PNG of the TTI distribution, the raw samples.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/fslock"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/server"
	"github.com/warren-sh/warren/internal/template"
)

// Options configures a run. Counts of zero skip a part where noted.
type Options struct {
	// DataDir is the bench's own warren data dir: its store is reset every
	// run; the guest kernel, base image and base build stay for the next.
	DataDir string
	// SeedFrom, if set, is another warren data dir whose guest kernel and
	// base root image are hard-linked into DataDir when it has none, so the
	// bench does not download and build them again.
	SeedFrom string
	// SDKDir holds warren-bench.mjs and the pinned package files (FindSDKDir).
	SDKDir string
	// Envd is the static envd binary for the guests; VMAccel auto, kvm or tcg.
	Envd, VMAccel string
	// TTI sandboxes are created one after the other after Warmup; Burst at
	// once. TTI is also the number of raw restores of the floor.
	Warmup, TTI, Burst int
	// RTT commands are timed (and as many /health round trips).
	RTT int
	// Density idle sandboxes are started, one after the other; 0 skips.
	Density int
	// Idle is how long the density sandboxes idle before memory is read.
	Idle time.Duration
	// Pause rounds of pause and resume; 0 skips.
	Pause int
	// LargeFiles adds 100 MiB transfers to the 1 MiB ones.
	LargeFiles bool
	// Progress receives what the run is doing (and npm's, node's and
	// warren's output); nil discards it.
	Progress io.Writer
}

// Validate checks the counts.
func (o *Options) Validate() error {
	if o.DataDir == "" {
		return errors.New("--data-dir is empty")
	}
	for _, c := range []struct {
		name string
		v    int
		min  int
	}{{"--warmup", o.Warmup, 0}, {"--tti", o.TTI, 1}, {"--burst", o.Burst, 1}, {"--rtt", o.RTT, 1}, {"--density", o.Density, 0}, {"--pause", o.Pause, 0}} {
		if c.v < c.min {
			return fmt.Errorf("%s %d: must be at least %d", c.name, c.v, c.min)
		}
	}
	if o.Idle < 0 {
		return fmt.Errorf("--idle %s is negative", o.Idle)
	}
	return nil
}

// Results is everything a run measured; times in milliseconds.
type Results struct {
	Started  time.Time
	Duration time.Duration
	Machine  Machine
	// Base is the base template build every sandbox and floor restore used.
	Base struct {
		BuildID         string
		CPUs, MemoryMiB int
	}
	Counts struct{ Warmup, TTI, Burst, RTT, Density, Pause int }
	// RestoreFloor is runtime Start of a clone → envd's first /health: the
	// first RestoreFloorBefore before warren started, the rest after it
	// stopped.
	RestoreFloor       []float64
	RestoreFloorBefore int
	// FirstCommand is, in each raw clone of RestoreFloor, envd's first
	// command (a login shell's echo, as commands.run sends it) right
	// after /health answered.
	FirstCommand []float64
	SDK          *SDKResults
	Density      *DensityResult
}

// DensityResult is the host's memory and CPU with the density sandboxes
// running idle.
type DensityResult struct {
	Asked, Started int
	Stop           string // why fewer than Asked started
	Idle           time.Duration
	// MemAvailable before the first create and after the idle time.
	MemAvailableBeforeMiB, MemAvailableAfterMiB float64
	// Per sandbox (its QEMU process), after the idle time.
	PSS, RSS []float64 // MiB
	IdleCPU  []float64 // ms of CPU per second during the idle time
	CreateMs []float64
	// WarmFrozen counts the warm pool's VMs waiting frozen, left out of
	// the per-sandbox numbers (the MemAvailable drop includes them).
	WarmFrozen int
}

// DropPerSandboxMiB is the MemAvailable drop divided among the sandboxes.
func (d *DensityResult) DropPerSandboxMiB() float64 {
	if d.Started == 0 {
		return 0
	}
	return (d.MemAvailableBeforeMiB - d.MemAvailableAfterMiB) / float64(d.Started)
}

// marker marks a data dir as the bench's: the bench resets its store.
const marker = ".warren-bench"

// Run measures everything Options asks for and returns the results.
func Run(ctx context.Context, o Options) (*Results, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	say := func(format string, args ...any) { fmt.Fprintf(progress, "bench: "+format+"\n", args...) }
	res := &Results{Started: time.Now().UTC(), Machine: describeMachine()}
	res.Counts.Warmup, res.Counts.TTI, res.Counts.Burst, res.Counts.RTT = o.Warmup, o.TTI, o.Burst, o.RTT
	res.Counts.Density, res.Counts.Pause = o.Density, o.Pause
	if v, err := nodeVersion(ctx); err == nil {
		res.Machine.Node = v
	}

	if err := claimDataDir(o.DataDir); err != nil {
		return nil, err
	}
	// A run owns its data dir throughout (its store, its VM states): a
	// second run on the same one waits, rather than reset the first's store
	// or remove its VMs' directories between the first's phases.
	unlock, err := fslock.Lock(ctx, filepath.Join(o.DataDir, runLockFile), func() {
		say("waiting for another bench run on %s to end", o.DataDir)
	})
	if err != nil {
		return nil, err
	}
	defer unlock()
	script, err := installSDK(ctx, o.SDKDir, filepath.Join(o.DataDir, "sdk"), progress)
	if err != nil {
		return nil, err
	}
	if o.SeedFrom != "" {
		if err := seed(o.SeedFrom, o.DataDir, say); err != nil {
			return nil, err
		}
	}

	// 1. The floor, with the bench's own runtime and slots: half of the
	// restores now, half once warren has stopped, so that load from other
	// work on the host falls on the floor and on warren alike.
	before := (o.TTI + 1) / 2
	art, err := prepare(ctx, o, before, res, say, progress)
	if err != nil {
		return nil, err
	}
	res.RestoreFloorBefore = before
	res.Base.BuildID, res.Base.CPUs, res.Base.MemoryMiB = art.BuildID, art.CPUs, art.MemoryMiB

	// 2. warren, in this process.
	srv, err := startServer(ctx, o, progress)
	if err != nil {
		return nil, err
	}
	defer srv.stop(say)
	say("warren ready on %s", srv.url)

	// 3. The SDK side.
	loop, err := startLoopback()
	if err != nil {
		return nil, err
	}
	defer loop.Close()
	cfg := sdkConfig{
		Warmup: o.Warmup, TTI: o.TTI, Burst: o.Burst, RTT: o.RTT, Density: o.Density, Pause: o.Pause,
		LargeFiles: o.LargeFiles, LoopbackURL: loop.URL, RefillMs: 3000, WarmPool: defaultWarmPool,
	}
	cfgJSON, _ := jsonString(cfg)
	env := []string{
		"E2B_API_URL=" + srv.url, "E2B_SANDBOX_URL=" + srv.url, "E2B_API_KEY=" + srv.key,
		"WARREN_BENCH=" + cfgJSON,
	}
	d := &DensityResult{Asked: o.Density, Idle: o.Idle}
	answer := func(ev sdkEvent) (any, error) {
		switch ev.Event {
		case "density-start":
			// Earlier sandboxes are killed by now; the warm pool's VMs stay.
			if n := sandboxVMs(srv.vmRoot); n > 0 {
				say("density: %d VMs still run before the first create; waiting for them to go", n)
				waitNoVMs(ctx, srv.vmRoot, 30*time.Second)
			}
			var err error
			d.MemAvailableBeforeMiB, err = memAvailableMiB()
			return map[string]bool{"ok": true}, err
		case "warm-pool":
			// Pool misses are measured with the pool emptied, hits with it
			// full again: the answer waits until it is.
			if ev.Size == nil || *ev.Size < 0 {
				return nil, errors.New("warm-pool: the script sent no size")
			}
			if err := resizePool(ctx, srv.pool, *ev.Size, say); err != nil {
				return nil, err
			}
			return map[string]bool{"ok": true}, nil
		case "density-ready":
			d.Started = ev.Started
			say("density: %d sandboxes up; idling %s", ev.Started, o.Idle)
			if err := measureIdle(ctx, srv.vmRoot, d); err != nil {
				return nil, err
			}
			return map[string]bool{"ok": true}, nil
		}
		return nil, fmt.Errorf("the SDK script asked %q, which the bench does not know", ev.Event)
	}
	say("running %s with node %s", script, res.Machine.Node)
	sdk, err := runSDK(ctx, script, env, answer, &lineWriter{fn: func(line string) { fmt.Fprintf(progress, "  %s\n", line) }})
	if err != nil {
		return nil, err
	}
	res.SDK = sdk
	if sdk.Density != nil {
		d.CreateMs, d.Stop = sdk.Density.CreateMs, sdk.Density.Stop
		res.Density = d
	}
	res.Machine.LoadAfter = loadAvg()

	// 4. The rest of the floor.
	srv.stop(say)
	if after := o.TTI - before; after > 0 {
		err := withSlots(ctx, o, say, func(rt *microvm.Runtime, pool *netns.Pool) error {
			say("restore floor: %d more raw clone restores after one warm-up", after)
			more, first, err := restoreFloor(ctx, rt, pool, art, after)
			res.RestoreFloor, res.FirstCommand = append(res.RestoreFloor, more...), append(res.FirstCommand, first...)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	res.Duration = time.Since(res.Started).Round(time.Second)
	return res, nil
}

// runLockFile, in the data dir, is held by the bench run using it.
const runLockFile = "bench.lock"

// claimDataDir makes dir the bench's, refusing a warren data dir that is not:
// the bench resets the store in it.
func claimDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, marker)); err == nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, "warren.db")); err == nil {
		return fmt.Errorf("%s holds a warren store but is not a bench data dir (no %s): the bench resets the store of its data dir, so give it its own --data-dir (--seed-from %s reuses that one's kernel and base image)", dir, marker, dir)
	}
	return os.WriteFile(filepath.Join(dir, marker), []byte("warren bench data dir: its store is reset every run\n"), 0o644)
}

// seed hard-links the guest kernels and the base root image of another data
// dir into dir when dir has none. Both are only ever replaced by rename,
// never written in place, so sharing the files is safe.
func seed(from, dir string, say func(string, ...any)) error {
	if _, err := os.Stat(filepath.Join(dir, "templates", "base", "manifest.json")); err == nil {
		return nil
	}
	say("linking the guest kernel and base image from %s", from)
	for _, rel := range []string{"kernels", "templates/base/rootfs.ext4", "templates/base/manifest.json"} {
		src := filepath.Join(from, rel)
		if _, err := os.Stat(src); err != nil {
			return fmt.Errorf("--seed-from %s: %w (not a warren data dir with a built base image?)", from, err)
		}
		err := filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rp, _ := filepath.Rel(from, p)
			dst := filepath.Join(dir, rp)
			if e.IsDir() {
				return os.MkdirAll(dst, 0o755)
			}
			if _, err := os.Lstat(dst); err == nil {
				return nil
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if e.Type()&fs.ModeSymlink != 0 {
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				return os.Symlink(target, dst)
			}
			return os.Link(p, dst)
		})
		if err != nil {
			return fmt.Errorf("--seed-from %s: link %s: %w (it must be on the same file system as --data-dir)", from, rel, err)
		}
	}
	return nil
}

// withSlots runs fn with a microVM runtime and a slot pool of the bench's
// own, which it closes before it returns (warren's node takes the host's
// slots next).
func withSlots(ctx context.Context, o Options, say func(string, ...any), fn func(*microvm.Runtime, *netns.Pool) error) (err error) {
	root := filepath.Join(o.DataDir, "bench-vms")
	rt, err := microvm.New(microvm.Config{Root: root, Accel: o.VMAccel})
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	say("taking the host's network slots (%s; waits while another warren or VM test holds them)", "/run/warren/netns.lock")
	pool, err := netns.NewPool(ctx, netns.Config{})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := pool.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close the slot pool: %w", cerr)
		}
	}()
	return fn(rt, pool)
}

// prepare makes sure the base template exists and measures the first n raw
// restores of its snapshot.
func prepare(ctx context.Context, o Options, n int, res *Results, say func(string, ...any), progress io.Writer) (art *template.Artifact, err error) {
	err = withSlots(ctx, o, say, func(rt *microvm.Runtime, pool *netns.Pool) error {
		res.Machine.Accel, res.Machine.QEMU = string(rt.Accel()), rt.Version()
		if a, why := microvm.DetectAccel(); rt.Accel() == microvm.TCG {
			if a == microvm.KVM {
				why = "asked for (--vm-accel tcg)"
			}
			res.Machine.AccelWhy = why
		}
		say("making sure the base template exists in %s (the first time takes several minutes)", o.DataDir)
		if art, err = template.EnsureBase(ctx, o.DataDir, template.BaseOptions{
			Envd: o.Envd, Runtime: rt, Slots: pool, Progress: server.PrefixWriter{W: progress, Prefix: "bench: base: "},
		}); err != nil {
			return err
		}
		pruneBuilds(o.DataDir, art.BuildID, say)
		say("restore floor: %d raw clone restores of base build %s after one warm-up", n, art.BuildID)
		res.RestoreFloor, res.FirstCommand, err = restoreFloor(ctx, rt, pool, art, n)
		return err
	})
	return art, err
}

// pruneBuilds removes the bench data dir's base builds other than keep:
// every envd change makes a new one of a few hundred MiB, and the bench's
// data dir runs nothing else. Its warren's collection of template storage
// does not: the store is new each run, and a collection removes only the
// base builds its own store retired.
func pruneBuilds(dataDir, keep string, say func(string, ...any)) {
	dirs, _ := filepath.Glob(filepath.Join(dataDir, "templates", "base", "*"))
	for _, d := range dirs {
		id := filepath.Base(d)
		if id == keep || len(id) != 16 || strings.Trim(id, "0123456789abcdef") != "" {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			say("remove old base build %s: %v", d, err)
		}
	}
}

// benchServer is warren running in this process.
type benchServer struct {
	url, key string
	vmRoot   string // the node's microVM state root
	cancel   context.CancelFunc
	done     chan error
	logFile  *os.File
	stopped  sync.Once
	pool     *server.BasePool // set before warren prints "ready"
}

// startServer resets the store, starts server.Run on a free loopback port
// and waits until it prints "ready".
func startServer(ctx context.Context, o Options, progress io.Writer) (*benchServer, error) {
	for _, f := range []string{"warren.db", "warren.db-wal", "warren.db-shm", "warren.db-journal", "api-key"} {
		if err := os.Remove(filepath.Join(o.DataDir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("reset the bench store: %w", err)
		}
	}
	key, err := apikey.New()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(o.DataDir, "bench-warren.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cfg := server.Config{
		Listen: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), DataDir: o.DataDir, TLS: "off",
		VMAccel: o.VMAccel, Envd: o.Envd, SlotRange: netns.DefaultRange,
		// No team limit, and the node's memory-derived cap lifted to the
		// counts asked for: density measures memory, not a configured cap.
		MaxSandboxes: 0, MaxLifetime: 24 * time.Hour, NodeMaxSandboxes: max(o.Density, o.Burst) + 2,
		BootstrapAPIKey: key,
		// The warm pool and template cache as `warren up` has them by default.
		WarmPool: defaultWarmPool, TemplateCacheMax: template.DefaultCacheMax,
	}
	runCtx, cancel := context.WithCancel(ctx)
	s := &benchServer{
		url: "http://" + cfg.Listen, key: key, vmRoot: filepath.Join(o.DataDir, "vms"),
		cancel: cancel, done: make(chan error, 1), logFile: logFile,
	}
	cfg.OnBasePool = func(p *server.BasePool) { s.pool = p }
	ready := make(chan struct{})
	var once sync.Once
	out := &lineWriter{fn: func(line string) {
		fmt.Fprintf(progress, "  warren| %s\n", line)
		if line == "ready" {
			once.Do(func() { close(ready) })
		}
	}}
	log := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo}))
	go func() { s.done <- server.Run(runCtx, cfg, out, log) }()
	select {
	case <-ready:
		return s, nil
	case err := <-s.done:
		cancel()
		logFile.Close()
		if err == nil {
			err = errors.New("it stopped")
		}
		return nil, fmt.Errorf("warren did not start (log %s): %w", logPath, err)
	case <-ctx.Done():
		cancel()
		<-s.done
		logFile.Close()
		return nil, ctx.Err()
	}
}

// stop shuts warren down: it kills its sandboxes on the way out.
// Safe to call twice.
func (s *benchServer) stop(say func(string, ...any)) {
	s.stopped.Do(func() {
		s.cancel()
		if err := <-s.done; err != nil {
			say("warren stopped with an error: %v (log %s)", err, s.logFile.Name())
		}
		s.logFile.Close()
	})
}

// defaultWarmPool is `warren up`'s --warm-pool default, which the bench
// runs with.
const defaultWarmPool = 2

// resizePool sets the base warm pool's size and waits until that many VMs
// are ready.
func resizePool(ctx context.Context, pool *server.BasePool, size int, say func(string, ...any)) error {
	if err := pool.Resize(size); err != nil {
		return err
	}
	say("warm pool: size %d; waiting until it is full", size)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		if ready, _ := pool.Ready(); ready == size {
			return nil
		}
		select {
		case <-ctx.Done():
			ready, _ := pool.Ready()
			return fmt.Errorf("warm pool: %d of %d VMs ready after 3 min", ready, size)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// frozenMsPerSec is the CPU below which a warm VM counts as frozen: an idle
// running guest under TCG takes ~35 ms a second (~130 before its CPU model
// had ARAT and its tick stopped in idle).
const frozenMsPerSec = 5

// measureIdle waits d.Idle with the sandboxes running, then reads their
// QEMU processes' memory, their CPU over the idle time and MemAvailable.
func measureIdle(ctx context.Context, vmRoot string, d *DensityResult) error {
	first, err := vmProcesses(vmRoot)
	if err != nil {
		return err
	}
	began := time.Now()
	select {
	case <-time.After(d.Idle):
	case <-ctx.Done():
		return ctx.Err()
	}
	last, err := vmProcesses(vmRoot)
	if err != nil {
		return err
	}
	elapsed := time.Since(began)
	if d.MemAvailableAfterMiB, err = memAvailableMiB(); err != nil {
		return err
	}
	cpu0 := map[int]time.Duration{}
	for _, p := range first {
		cpu0[p.Pid] = p.CPU
	}
	sandboxes := 0
	for _, p := range last {
		c, ok := cpu0[p.Pid]
		cpu := float64((p.CPU - c).Milliseconds()) / elapsed.Seconds()
		// The warm pool's VMs wait frozen (no CPU at all); a sandbox that
		// claimed one runs like any other.
		if p.Warm && ok && cpu < frozenMsPerSec {
			d.WarmFrozen++
			continue
		}
		sandboxes++
		d.PSS = append(d.PSS, p.PSS)
		d.RSS = append(d.RSS, p.RSS)
		if ok {
			d.IdleCPU = append(d.IdleCPU, cpu)
		}
	}
	if sandboxes != d.Started {
		return fmt.Errorf("density: %d sandboxes started but %d QEMU processes run under %s (and %d frozen warm VMs)", d.Started, sandboxes, vmRoot, d.WarmFrozen)
	}
	return nil
}

func waitNoVMs(ctx context.Context, root string, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if sandboxVMs(root) == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// sandboxVMs counts the VMs under root that are not the warm pool's. With
// no sandbox left, every warm-* VM is the pool's (frozen, waiting).
func sandboxVMs(root string) int {
	procs, _ := vmProcesses(root)
	n := 0
	for _, p := range procs {
		if !p.Warm {
			n++
		}
	}
	return n
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// lineWriter calls fn with every complete line written to it.
type lineWriter struct {
	mu  sync.Mutex
	buf []byte
	fn  func(string)
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			return len(b), nil
		}
		w.fn(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}
