package node

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/blob"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/template"
	"github.com/warren-sh/warren/internal/transfer"
)

// Config configures a Manager.
type Config struct {
	// ID names the node; the host name when empty.
	ID string
	// DataDir is warren's data directory; a relative SandboxSpec.Artifact is
	// resolved against it.
	DataDir string
	// Blobs keeps paused sandboxes and snapshots; DataDir/blobs when nil. It
	// must be on the file system of the Runtime's state root: a pause moves
	// the VM's memory file and disk there by rename, a resume moves them back.
	Blobs *blob.Local
	// Runtime runs the VMs. The Manager owns every VM in it: NewManager kills
	// the ones it finds (a crashed node's leftovers).
	Runtime runtime.Runtime
	// SlotRange is the network slots' address range; netns.DefaultRange when unset.
	SlotRange netip.Prefix
	// MaxSandboxes caps the sandboxes that run (or start) at once. Default:
	// the host's MemAvailable at start divided by the base template's memory
	// (template.DefaultBaseMemoryMiB), at least 1, at most the slots SlotRange
	// holds. A sandbox may use all the memory its VM has, so by default the
	// node never promises more memory than the host has free.
	MaxSandboxes int
	// MaxStarting caps the sandboxes restored or resumed at once (from the
	// VM's start to envd's /init); further creates wait their turn. A start
	// is CPU-bound, under TCG for most of a second of CPU: more at once than
	// the host has cores all finish late, where taking turns finishes most
	// of them early. Claims of warm pool VMs never wait. Default: the host's
	// CPUs (runtime.NumCPU).
	MaxStarting int
	// DNS lists the nameservers sandboxes use (their /etc/resolv.conf); none
	// leaves the template's file as it is.
	DNS []string
	// Log receives what the node does; nil discards it.
	Log *slog.Logger
	// OnStart, when set, is told of every sandbox start (Create past its
	// admission): how it started (StartWarm, StartRestore, StartResume), how
	// long it took and its error. For metrics; it must not block.
	OnStart func(kind string, took time.Duration, err error)
}

// How a sandbox started (Config.OnStart).
const (
	StartWarm    = "warm"    // claimed from its template's warm pool
	StartRestore = "restore" // restored from its template's snapshot
	StartResume  = "resume"  // a paused sandbox, resumed
)

// Manager runs the sandboxes of this host: one microVM each, restored from
// its template's snapshot inside a network slot. It implements Node and is
// safe for concurrent use.
type Manager struct {
	id      string
	dataDir string
	rt      runtime.Runtime
	blobs   *blob.Local
	slots   *netns.Pool
	max     int
	log     *slog.Logger
	dns     []string
	onStart func(kind string, took time.Duration, err error)

	starting chan struct{} // a token per start in progress (Config.MaxStarting)

	mu        sync.Mutex
	sandboxes map[string]*sandbox // starting, running and being killed
	artifacts map[string]*template.Artifact
	closed    bool
	watchers  sync.WaitGroup // one per running sandbox: reaps a VM that exits by itself; and the refill loop

	// Warm pools (warm.go), by artifact directory; guarded by mu.
	poolSize  map[string]int
	pools     map[string][]*warmVM
	lastClaim time.Time     // refills wait until claims have been quiet for refillQuiet
	refill    chan struct{} // wakes the refill loop
	closing   chan struct{} // closed by Close

	syncs *syncs // paused sandboxes' states on their way to the disk (syncs.go)
}

var _ Node = (*Manager)(nil)

// sandbox is one sandbox the Manager tracks, from the start of Create until
// Kill has freed everything it held.
type sandbox struct {
	info  SandboxInfo
	token string

	// Set by Create before ready closes; read only after.
	vm       runtime.VM
	slot     *netns.Slot
	artifact *template.Artifact // what the sandbox started from (with its init secret)
	agent    *agent             // the connections into its envd
	boot     []LogLine          // the node's own account of the start
	// startKind is how it started (StartWarm...), set by start before
	// anything can fail.
	startKind string
	ready     chan struct{}

	cancel context.CancelFunc // stops an unfinished Create

	// Guarded by Manager.mu.
	killing bool          // one Kill or Pause owns the teardown
	pausing bool          // ... and it is a Pause
	gone    chan struct{} // closed when a Kill or Pause ends; then killErr is a Kill's result
	killErr error

	forgotten chan struct{} // closed once the sandbox is freed: stops its watcher
}

// running reports whether Create finished with a VM. Call after ready closed.
func (s *sandbox) running() bool { return s.vm != nil }

// envdPort is envd's port in every guest.
const envdPort = 49983

// defaultUser is the user commands run as unless a spec says otherwise, as under E2B.
const defaultUser = "user"

// NewManager cleans up what an earlier node process left on this host, then
// returns a Manager with no sandboxes: it kills every VM the runtime still
// has (rt.List, Adopt, Kill: QEMU processes and state directories), removes
// unfinished saves from the blob storage and opens the slot pool, which
// removes every slot namespace, veth and nftables table (see the package
// comment: a restarted node starts empty). Paused sandboxes and snapshots in
// the blob storage are kept: they resume on the new node.
func NewManager(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Runtime == nil {
		return nil, errors.New("node: Config.Runtime is required")
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	id := cfg.ID
	if id == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("node: no Config.ID and no host name: %w", err)
		}
		id = h
	}
	max := cfg.MaxSandboxes
	if max < 0 {
		return nil, fmt.Errorf("node: MaxSandboxes %d is negative", max)
	}
	if cfg.MaxStarting < 0 {
		return nil, fmt.Errorf("node: MaxStarting %d is negative", cfg.MaxStarting)
	}
	slotRange := cfg.SlotRange
	if !slotRange.IsValid() {
		slotRange = netns.DefaultRange
	}
	if max == 0 {
		var err error
		if max, err = defaultMaxSandboxes(slotRange); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
	}
	if err := reapLeftovers(ctx, cfg.Runtime, log); err != nil {
		return nil, fmt.Errorf("node: clean up after the last node process: %w", err)
	}
	blobs := cfg.Blobs
	if blobs == nil {
		if cfg.DataDir == "" {
			return nil, errors.New("node: Config needs a DataDir or Blobs")
		}
		blobs = &blob.Local{Root: filepath.Join(cfg.DataDir, "blobs")}
	}
	if err := blobs.Clean(ctx); err != nil {
		return nil, fmt.Errorf("node: clean up after the last node process: %w", err)
	}
	pool, err := netns.NewPool(ctx, netns.Config{Range: cfg.SlotRange})
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	m := &Manager{
		id: id, dataDir: cfg.DataDir, rt: cfg.Runtime, blobs: blobs, slots: pool, max: max, log: log, dns: cfg.DNS,
		onStart:   cfg.OnStart,
		sandboxes: map[string]*sandbox{},
		artifacts: map[string]*template.Artifact{},
		starting:  make(chan struct{}, cmp.Or(cfg.MaxStarting, goruntime.NumCPU())),
		closing:   make(chan struct{}),
		syncs:     newSyncs(),
	}
	if err := m.resumeSyncs(); err != nil {
		log.Warn("sync the paused sandboxes an earlier node process saved", "err", err)
	}
	log.Info("node ready", "id", id, "max_sandboxes", max, "slot_range", slotRange)
	return m, nil
}

// defaultMaxSandboxes is MemAvailable / the base template's memory, within
// [1, slots in r].
func defaultMaxSandboxes(r netip.Prefix) (int, error) {
	avail, err := memAvailable()
	if err != nil {
		return 0, err
	}
	n := int(avail / (template.DefaultBaseMemoryMiB << 20))
	if slots := 1 << (30 - r.Bits()); r.Bits() <= 30 && n > slots {
		n = slots
	}
	return max(n, 1), nil
}

// memAvailable reads MemAvailable from /proc/meminfo, in bytes.
func memAvailable() (uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: MemAvailable %q: %w", rest, err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("/proc/meminfo has no MemAvailable line")
}

// reapLeftovers kills every VM rt knows: a node that just started runs none.
func reapLeftovers(ctx context.Context, rt runtime.Runtime, log *slog.Logger) error {
	ids, err := rt.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range ids {
		vm, err := rt.Adopt(ctx, id)
		if err != nil {
			errs = append(errs, fmt.Errorf("adopt leftover VM %s: %w", id, err))
			continue
		}
		if err := rt.Kill(ctx, vm); err != nil {
			errs = append(errs, fmt.Errorf("kill leftover VM %s: %w", id, err))
			continue
		}
		log.Info("removed a VM left by an earlier node process", "sandbox", id, "pid", vm.Pid())
	}
	return errors.Join(errs...)
}

// ID names the node.
func (m *Manager) ID() string { return m.id }

// Slots is the node's network slot pool. Template builds on this host borrow
// slots from it: there is one pool per host.
func (m *Manager) Slots() *netns.Pool { return m.slots }

// Create starts the sandbox spec.ID from the template build at spec.Artifact
// (or resumes the paused sandbox spec.Resume) and returns once its envd has
// accepted /init. It fails with ErrFull when
// MaxSandboxes sandboxes run (or start) or no network slot is left. On any
// error, or when Kill or Close stop it midway, nothing of the sandbox is left.
// The build fixes the VM's size: spec.CPUCount and spec.MemoryMB are the
// control plane's record of it.
func (m *Manager) Create(ctx context.Context, spec SandboxSpec) (*SandboxInfo, error) {
	if spec.ID == "" {
		return nil, errors.New("node: create: the sandbox has no ID")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sb := &sandbox{
		info:  SandboxInfo{ID: spec.ID, TemplateID: spec.TemplateID},
		token: spec.AccessToken,
		ready: make(chan struct{}), gone: make(chan struct{}), forgotten: make(chan struct{}),
		cancel: cancel,
	}
	m.mu.Lock()
	switch {
	case m.closed:
		m.mu.Unlock()
		return nil, fmt.Errorf("node: create %s: the node is shutting down", spec.ID)
	case m.sandboxes[spec.ID] != nil:
		m.mu.Unlock()
		return nil, fmt.Errorf("node: create %s: a sandbox with this ID already runs here", spec.ID)
	case len(m.sandboxes) >= m.max:
		n := len(m.sandboxes)
		m.mu.Unlock()
		return nil, fmt.Errorf("%w: %d sandboxes run or start on node %s, its limit (MaxSandboxes) is %d", ErrFull, n, m.id, m.max)
	}
	m.sandboxes[spec.ID] = sb
	m.mu.Unlock()

	began := time.Now()
	err := m.start(ctx, sb, spec)
	if m.onStart != nil {
		m.onStart(sb.startKind, time.Since(began), err)
	}
	m.mu.Lock()
	close(sb.ready)
	killed := sb.killing
	if err != nil && !killed {
		delete(m.sandboxes, spec.ID)
	}
	if err == nil && !killed {
		m.watchers.Add(1)
		go m.watch(sb)
	}
	m.mu.Unlock()
	switch {
	case killed:
		// The Kill waiting on ready tears down what start left running.
		return nil, fmt.Errorf("node: create %s: killed while it started", spec.ID)
	case err != nil:
		return nil, fmt.Errorf("node: create %s: %w", spec.ID, err)
	}
	info := sb.info
	return &info, nil
}

// start takes a slot, restores the VM and initializes its envd. On error it
// undoes all of it, and sb.vm stays nil; a resume puts the sandbox's saved
// state back.
func (m *Manager) start(ctx context.Context, sb *sandbox, spec SandboxSpec) (err error) {
	began := time.Now()
	var (
		a      *template.Artifact
		paused *pausedRecord
		vmDir  string // a resume's runtime snapshot
	)
	sb.startKind = StartRestore
	if spec.Resume != "" {
		sb.startKind = StartResume
		if paused, vmDir, err = m.readPaused(spec.Resume, spec.ID); err != nil {
			return err
		}
		if err := m.checkSynced(paused, filepath.Dir(vmDir)); err != nil {
			return err
		}
		a = paused.Artifact
		if sb.info.TemplateID == "" {
			sb.info.TemplateID = paused.TemplateID
		}
	} else if a, err = m.artifact(spec.Artifact); err != nil {
		return err
	}
	// A warm pool's VM waits without internet access; the claim gives its
	// slot the create's policy, then lets it run.
	var warm *warmVM
	if paused == nil {
		if warm = m.takeWarm(a); warm != nil {
			err := m.slots.SetPolicy(warm.slot, netns.Policy{AllowInternet: spec.AllowInternet})
			if err == nil {
				err = m.rt.Thaw(ctx, warm.vm)
			}
			if err != nil {
				m.log.Warn("warm pool: claim failed; restoring instead", "vm", warm.vm.ID(), "err", err)
				m.discardWarm(context.WithoutCancel(ctx), warm)
				warm = nil
			}
		}
	}
	var (
		slot *netns.Slot
		ag   *agent
	)
	if warm != nil {
		sb.startKind = StartWarm
		slot, ag = warm.slot, warm.agent
	} else {
		done, err := m.startTurn(ctx, spec.ID)
		if err != nil {
			return err
		}
		defer done()
		slot, err = m.slots.Acquire(ctx, netns.Policy{AllowInternet: spec.AllowInternet})
		if errors.Is(err, netns.ErrExhausted) {
			return fmt.Errorf("%w: %v", ErrFull, err)
		}
		if err != nil {
			return err
		}
		ag = newAgent(slot.SlotIP)
	}
	var vm runtime.VM
	defer func() {
		if err == nil {
			return
		}
		ag.close()
		// Undo with a context of our own: the caller's may be what failed.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if vm != nil && paused != nil {
			// The resumed VM owns the saved state now: save it again.
			if serr := m.resave(undo, vm, vmDir, paused.Memory); serr != nil {
				m.log.Error("save a sandbox whose resume failed again; its paused state is lost", "sandbox", spec.ID, "key", spec.Resume, "err", serr)
				err = errors.Join(err, fmt.Errorf("save it again (its paused state is lost): %w", serr))
			} else {
				m.syncLater(spec.Resume, filepath.Dir(vmDir))
			}
		} else if paused != nil {
			m.syncLater(spec.Resume, filepath.Dir(vmDir)) // the runtime left the state in place
		}
		if vm != nil {
			if kerr := m.rt.Kill(undo, vm); kerr != nil {
				// The VM may still run in the slot: keep the slot out of the pool.
				m.log.Error("kill a sandbox VM that failed to start; its slot stays taken", "sandbox", spec.ID, "slot", slot.Name, "err", kerr)
				err = errors.Join(err, kerr)
				return
			}
		}
		if rerr := m.slots.Release(slot); rerr != nil {
			m.log.Error("release the slot of a sandbox that failed to start", "sandbox", spec.ID, "err", rerr)
		}
	}()
	rtSpec := a.Spec(spec.ID, slot)
	if paused != nil {
		rtSpec = runtime.Spec{ID: spec.ID, Slot: slot, Snapshot: vmDir, Resume: true}
		// The runtime takes the saved files, and a failed resume saves them
		// anew: the mark no longer vouches for them.
		if err := m.unmark(spec.Resume); err != nil {
			return err
		}
	}
	if warm != nil {
		vm = warm.vm
	} else if vm, err = m.rt.Start(ctx, rtSpec); err != nil {
		return err
	}
	restored := time.Now().UTC()
	// A warm VM's envd listened before it was frozen, and its transfer disk
	// is open.
	if warm == nil {
		if err := ag.openTransfer(vm); err != nil {
			return err
		}
		if err := ag.waitListening(ctx, vm); err != nil {
			return withConsole(err, vm)
		}
	}
	listening := time.Now().UTC()
	version, err := m.initEnvd(ctx, ag, a.InitSecret, withTemplateDefaults(spec, a))
	if err != nil {
		return withConsole(err, vm)
	}
	if paused != nil {
		// The sandbox runs again: its saved state is used up.
		if derr := m.blobs.Delete(ctx, spec.Resume); derr != nil {
			m.log.Warn("remove a resumed sandbox's paused state", "sandbox", spec.ID, "key", spec.Resume, "err", derr)
		}
	}
	sb.vm, sb.slot, sb.artifact, sb.agent = vm, slot, a, ag
	sb.info.Host = slot.SlotIP.String()
	sb.info.EnvdVersion = version
	sb.info.StartedAt = time.Now().UTC()
	what := fmt.Sprintf("restored template build %s", a.BuildID)
	switch {
	case warm != nil:
		what = fmt.Sprintf("claimed a warm VM of template build %s (%s, ready for %s)", a.BuildID, warm.vm.ID(), restored.Sub(warm.at).Round(time.Millisecond))
	case paused != nil:
		what = fmt.Sprintf("resumed the sandbox paused at %s (memory: %v)", paused.PausedAt.Format(time.RFC3339), paused.Memory)
	}
	listened := fmt.Sprintf("envd listened %s after the restore", listening.Sub(restored).Round(time.Millisecond))
	if warm != nil {
		listened = "envd listened (the warm VM's, since before it was frozen)"
	}
	sb.boot = []LogLine{
		{Time: restored, Source: "boot", Message: fmt.Sprintf("%s (%d vCPUs, %d MiB) in slot %s (%s) in %s",
			what, a.CPUs, a.MemoryMiB, slot.Name, slot.SlotIP, restored.Sub(began).Round(time.Millisecond))},
		{Time: listening, Source: "boot", Message: listened},
		{Time: sb.info.StartedAt, Source: "boot", Message: fmt.Sprintf("envd %s accepted /init (clock, entropy, %d env vars, default user %s) in %s",
			version, len(spec.EnvVars), cmp.Or(spec.DefaultUser, defaultUser), sb.info.StartedAt.Sub(listening).Round(time.Millisecond))},
	}
	m.log.Info("sandbox started", "sandbox", spec.ID, "slot", slot.Name, "host", sb.info.Host, "resumed", paused != nil, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// startTurn waits until fewer than Config.MaxStarting starts are in
// progress; done ends this one's turn.
func (m *Manager) startTurn(ctx context.Context, id string) (done func(), err error) {
	select {
	case m.starting <- struct{}{}:
	default:
		m.log.Debug("create waits for its turn to start", "sandbox", id, "starting", cap(m.starting))
		select {
		case m.starting <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a turn to start (%d start at once): %w", cap(m.starting), ctx.Err())
		}
	}
	return func() { <-m.starting }, nil
}

// withTemplateDefaults fills what spec leaves unset from the template's
// build: its ENV (the sandbox's own env vars win), USER and WORKDIR.
func withTemplateDefaults(spec SandboxSpec, a *template.Artifact) SandboxSpec {
	if len(a.Env) > 0 {
		env := make(map[string]string, len(a.Env)+len(spec.EnvVars))
		maps.Copy(env, a.Env)
		maps.Copy(env, spec.EnvVars)
		spec.EnvVars = env
	}
	spec.DefaultUser = cmp.Or(spec.DefaultUser, a.User)
	spec.DefaultWorkdir = cmp.Or(spec.DefaultWorkdir, a.Workdir)
	return spec
}

// resave saves a resumed VM that failed to come up back where its resume
// took it from (a resume must not lose the sandbox).
func (m *Manager) resave(ctx context.Context, vm runtime.VM, dir string, memory bool) error {
	select {
	case <-vm.Done():
		return errors.New("its VM exited")
	default:
	}
	if memory {
		return m.rt.Snapshot(ctx, vm, dir)
	}
	return m.rt.SaveDisk(ctx, vm, dir)
}

// artifact loads (once) the template build in dir, relative to the data dir.
func (m *Manager) artifact(dir string) (*template.Artifact, error) {
	if dir == "" {
		return nil, errors.New("the sandbox names no template artifact")
	}
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(m.dataDir, dir)
	}
	m.mu.Lock()
	a := m.artifacts[dir]
	m.mu.Unlock()
	if a != nil {
		return a, nil
	}
	a, err := template.LoadArtifact(dir)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.artifacts[dir] = a
	m.mu.Unlock()
	return a, nil
}

// initRequest is envd's /init body (internal/envd).
type initRequest struct {
	EnvVars        map[string]string `json:"envVars,omitempty"`
	AccessToken    string            `json:"accessToken"`
	Timestamp      time.Time         `json:"timestamp"`
	DefaultUser    string            `json:"defaultUser"`
	DefaultWorkdir *string           `json:"defaultWorkdir,omitempty"`
	Entropy        []byte            `json:"entropy"`
	DNS            []string          `json:"dns,omitempty"`
}

// initEnvd hands the restored guest its sandbox: token, env vars, default
// user and workdir, the host's clock (a restored clock lags by the
// snapshot's age) and fresh entropy (every clone resumes the snapshot's RNG
// state). It returns envd's version.
func (m *Manager) initEnvd(ctx context.Context, ag *agent, secret string, spec SandboxSpec) (string, error) {
	body := initRequest{
		EnvVars: spec.EnvVars, AccessToken: spec.AccessToken,
		DefaultUser: cmp.Or(spec.DefaultUser, defaultUser),
		Entropy:     make([]byte, 64),
		DNS:         m.dns,
	}
	if spec.DefaultWorkdir != "" {
		body.DefaultWorkdir = &spec.DefaultWorkdir
	}
	rand.Read(body.Entropy)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	body.Timestamp = time.Now().UTC() // last, so the guest's clock is off by the request's trip only
	b, err := json.Marshal(body)
	if err != nil {
		return "", err
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ag.base+"/init", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(envd.InitSecretHeader, secret)
	sent := time.Now()
	resp, err := ag.client.Do(req)
	if err != nil {
		return "", fmt.Errorf("envd /init: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return "", fmt.Errorf("envd /init answered %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	m.log.Debug("envd /init", "url", ag.base, "took", time.Since(sent).Round(time.Microsecond), "guest", resp.Header.Get("Server-Timing"))
	return resp.Header.Get("X-Envd-Version"), nil
}

// watch reaps a sandbox whose VM exits by itself (the guest powered off or
// QEMU died): its slot and state are freed and it leaves List.
func (m *Manager) watch(sb *sandbox) {
	defer m.watchers.Done()
	select {
	case <-sb.vm.Done():
	case <-sb.forgotten:
		return
	}
	m.mu.Lock()
	mine := !sb.killing
	if mine {
		sb.killing = true
	}
	m.mu.Unlock()
	if !mine {
		return
	}
	m.log.Warn("sandbox VM exited by itself; freeing its slot", "sandbox", sb.info.ID)
	m.finishKill(sb, m.teardown(context.Background(), sb))
}

// Kill stops the sandbox and frees its VM, state and slot. A sandbox still
// starting is stopped midway (its Create fails). ErrNotFound if the node does
// not have it. Concurrent Kills of one sandbox share one teardown.
func (m *Manager) Kill(ctx context.Context, id string) error {
	m.mu.Lock()
	sb := m.sandboxes[id]
	for sb != nil && sb.killing {
		gone, pausing := sb.gone, sb.pausing
		m.mu.Unlock()
		select {
		case <-gone:
		case <-ctx.Done():
			return fmt.Errorf("node: kill %s: %w", id, ctx.Err())
		}
		if !pausing {
			m.mu.Lock()
			err := sb.killErr
			m.mu.Unlock()
			return err
		}
		// A Pause ended: the sandbox is gone (paused) or runs on.
		m.mu.Lock()
		sb = m.sandboxes[id]
	}
	if sb == nil {
		m.mu.Unlock()
		return fmt.Errorf("node: kill %s: %w", id, ErrNotFound)
	}
	sb.killing = true
	m.mu.Unlock()

	sb.cancel() // a Create in progress gives up and undoes its work
	<-sb.ready
	var err error
	if sb.running() {
		err = m.teardown(ctx, sb)
	}
	m.finishKill(sb, err)
	return err
}

// teardown kills the VM and releases the slot.
func (m *Manager) teardown(ctx context.Context, sb *sandbox) error {
	// A caller's short deadline must not leave a half-killed VM: killing takes
	// at most a second or two.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	sb.agent.close()
	if err := m.rt.Kill(ctx, sb.vm); err != nil {
		return fmt.Errorf("node: kill %s: %w", sb.info.ID, err)
	}
	if err := m.slots.Release(sb.slot); err != nil {
		// The slot pool destroyed the slot instead; the sandbox is gone either way.
		m.log.Error("release slot", "sandbox", sb.info.ID, "slot", sb.slot.Name, "err", err)
	}
	m.log.Info("sandbox killed", "sandbox", sb.info.ID)
	return nil
}

// finishKill ends a teardown: on success the sandbox is forgotten; on failure
// it stays (its VM may run) so that a later Kill or Close tries again.
func (m *Manager) finishKill(sb *sandbox, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	sb.killErr = err
	close(sb.gone)
	if err == nil {
		delete(m.sandboxes, sb.info.ID)
		close(sb.forgotten)
		return
	}
	sb.killing, sb.pausing = false, false
	sb.gone = make(chan struct{})
}

// List returns the sandboxes that run on the node, oldest first; sandboxes
// still starting or being killed are not listed.
func (m *Manager) List(ctx context.Context) ([]*SandboxInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []*SandboxInfo{}
	for _, sb := range m.sandboxes {
		if sb.killing || !isClosed(sb.ready) || !sb.running() {
			continue
		}
		info := sb.info
		out = append(out, &info)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].StartedAt.Equal(out[j].StartedAt) {
			return out[i].StartedAt.Before(out[j].StartedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// running returns the running sandbox id, or ErrNotFound.
func (m *Manager) running(id string) (*sandbox, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	sb := m.sandboxes[id]
	if sb == nil || sb.killing || !isClosed(sb.ready) || !sb.running() {
		return nil, ErrNotFound
	}
	return sb, nil
}

// AgentTransport returns the pool of connections into the envd of running
// sandbox id, for the proxy to forward the sandbox's agent traffic over
// (see agent); nil when the sandbox does not run here. Requests through it
// fail once the sandbox's VM is gone.
func (m *Manager) AgentTransport(id string) http.RoundTripper {
	sb, err := m.running(id)
	if err != nil {
		return nil
	}
	return sb.agent.transport
}

// TransferDisk returns the transfer disk of running sandbox id, for the
// proxy to send upload bodies through (internal/transfer); nil when the
// sandbox does not run here or its VM has none (restored from a snapshot
// older than the disk). Puts fail with transfer.ErrClosed once the
// sandbox's VM is gone.
func (m *Manager) TransferDisk(id string) *transfer.Disk {
	sb, err := m.running(id)
	if err != nil {
		return nil
	}
	return sb.agent.transfer
}

// metrics is envd's GET /metrics body (E2B's names; bytes and percent).
type metrics struct {
	Timestamp  int64   `json:"ts"`
	CPUCount   int     `json:"cpu_count"`
	CPUUsedPct float64 `json:"cpu_used_pct"`
	MemTotal   uint64  `json:"mem_total"`
	MemUsed    uint64  `json:"mem_used"`
	MemCache   uint64  `json:"mem_cache"`
	DiskUsed   uint64  `json:"disk_used"`
	DiskTotal  uint64  `json:"disk_total"`
}

// Stats asks the sandbox's envd for its resource use (GET /metrics), as the
// guest sees it.
func (m *Manager) Stats(ctx context.Context, id string) (*Stats, error) {
	sb, err := m.running(id)
	if err != nil {
		return nil, fmt.Errorf("node: stats of %s: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, sb.agent.base+"/metrics", nil)
	req.Header.Set("X-Access-Token", sb.token)
	resp, err := sb.agent.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("node: stats of %s: %w", id, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("node: stats of %s: envd /metrics answered %s: %s", id, resp.Status, bytes.TrimSpace(msg))
	}
	var mt metrics
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&mt); err != nil {
		return nil, fmt.Errorf("node: stats of %s: decode envd /metrics: %w", id, err)
	}
	return &Stats{
		Timestamp: time.Unix(mt.Timestamp, 0).UTC(), CPUCount: mt.CPUCount, CPUUsedPct: mt.CPUUsedPct,
		MemUsed: mt.MemUsed, MemTotal: mt.MemTotal, MemCache: mt.MemCache,
		DiskUsed: mt.DiskUsed, DiskTotal: mt.DiskTotal,
	}, nil
}

// consoleLogger is a VM whose guest console is kept in a file (microvm.VM).
type consoleLogger interface {
	ConsoleLog() string
}

// maxConsole bounds how much of a console log Logs reads: its end.
const maxConsole = 1 << 20

// Logs returns the node's account of the sandbox's start ("boot"), then its
// guest console since the restore: envd's log lines ("envd") and the
// kernel's and init's ("boot"). Console lines without a time of their own
// carry the sandbox's start time.
func (m *Manager) Logs(ctx context.Context, id string) ([]LogLine, error) {
	sb, err := m.running(id)
	if err != nil {
		return nil, fmt.Errorf("node: logs of %s: %w", id, err)
	}
	lines := append([]LogLine(nil), sb.boot...)
	cl, ok := sb.vm.(consoleLogger)
	if !ok {
		return lines, nil
	}
	b, err := readTail(cl.ConsoleLog(), maxConsole)
	if err != nil {
		return nil, fmt.Errorf("node: logs of %s: %w", id, err)
	}
	return append(lines, parseConsole(b, sb.info.StartedAt)...), nil
}

// readTail reads at most the last n bytes of path.
func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if off := fi.Size() - n; off > 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			return nil, err
		}
	}
	return io.ReadAll(io.LimitReader(f, n))
}

// parseConsole splits a guest console into log lines. envd logs with slog's
// text handler ("time=... level=... msg=..."); everything else is the
// kernel's or init's.
func parseConsole(b []byte, started time.Time) []LogLine {
	var out []LogLine
	for _, raw := range strings.Split(string(b), "\n") {
		line := strings.TrimRight(raw, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		l := LogLine{Time: started, Source: "boot", Message: line}
		if rest, ok := strings.CutPrefix(line, "time="); ok {
			l.Source = "envd"
			stamp, _, _ := strings.Cut(rest, " ")
			if t, err := time.Parse(time.RFC3339Nano, stamp); err == nil {
				l.Time = t.UTC()
			}
		}
		out = append(out, l)
	}
	return out
}

// Close kills every sandbox (stopping those still starting) and removes the
// network slots. The node is unusable afterwards.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	close(m.closing)
	ids := make([]string, 0, len(m.sandboxes))
	for id := range m.sandboxes {
		ids = append(ids, id)
	}
	m.mu.Unlock()

	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.Kill(context.Background(), id); err != nil && !errors.Is(err, ErrNotFound) {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	m.watchers.Wait()
	m.waitSyncs()
	m.closeWarm()
	errs = append(errs, m.slots.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("node: close: %w", err)
	}
	return nil
}

// withConsole adds the end of the VM's console to err: the guest says there
// why envd did not come up.
func withConsole(err error, vm runtime.VM) error {
	cl, ok := vm.(consoleLogger)
	if !ok {
		return err
	}
	b, rerr := readTail(cl.ConsoleLog(), 3000)
	if rerr != nil || len(bytes.TrimSpace(b)) == 0 {
		return err
	}
	return fmt.Errorf("%w; guest console ends:\n%s", err, b)
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
