package template

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/durable"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// Template build layout under the data directory:
//
//	templates/layers/<hash>-<build>.qcow2  one disk layer per build step: a
//	                                       qcow2 overlay over the layer
//	                                       before it (the first over the
//	                                       source's disk), never written once
//	                                       the step is done
//	templates/layers/<hash>.json           the cache entry: the layer that
//	                                       holds step <hash> (a hash of the
//	                                       source and every step up to it)
//	templates/finals/<hash>.json           a finished build for a layer
//	                                       chain, start and ready command
//	templates/sources/<hash>.ext4          a link to a root image builds start
//	                                       from (internal/oci's, which may go)
//	templates/<template>/<build>/          the build's artifact: artifact.json
//	                                       and snapshot/ (microvm layout)
//
// A build whose steps are all cached and whose final snapshot is cached too
// hard-links that snapshot into its own artifact: no VM runs.
//
// Nothing here is removed by the builder once cached; CollectGarbage (gc.go)
// removes what no build, sandbox or cache entry within its budget uses, and
// describes the locks and pins a build holds against it.
const (
	layersDir  = "layers"
	finalsDir  = "finals"
	sourcesDir = "sources"
	// buildRecipe versions how steps run: bump it when that changes, so
	// cached layers made the old way are not reused.
	buildRecipe = 1
)

// Defaults of a build (TEMPLATES.md §1): E2B's template sizes, the ready
// check's period and overall limit.
const (
	DefaultBuildCPUs      = 2
	DefaultBuildMemoryMiB = 1024
	readyPeriod           = 2 * time.Second
	readyLimit            = 10 * time.Minute
	// defaultStepUser runs steps before any USER step: E2B runs them as
	// `user` (its SDK passes root explicitly where it needs it).
	defaultStepUser = "user"
)

// BuilderConfig configures a LocalBuilder.
type BuilderConfig struct {
	// DataDir is warren's data directory: layers and artifacts go under
	// DataDir/templates. It must be on the file system of Runtime's root.
	DataDir string
	// Runtime runs the build VMs (cold boots: their RAM file becomes the
	// template snapshot's by rename).
	Runtime *microvm.Runtime
	// Slots lends each build VM a network slot with internet access.
	Slots *netns.Pool
	// Base is the base template's artifact: builds from a root image boot
	// its kernel and initramfs.
	Base *Artifact
	// DNS lists the nameservers build VMs use; none keeps the image's.
	DNS []string
	// Log receives what the builder does; nil discards it.
	Log *slog.Logger
}

// LocalBuilder runs template builds in microVMs on this host: it boots the
// source's disk, runs the steps through the VM's envd, cuts a disk layer
// after each step (cached by a hash of everything up to the step), starts the
// start command, waits for the ready command and snapshots the VM. It
// implements Builder and is safe for concurrent use.
type LocalBuilder struct {
	cfg BuilderConfig
	log *slog.Logger
	// cache serializes reading and writing cache entries (the entries are
	// small files written atomically; the mutex keeps a lookup and the
	// layer it names consistent within the process).
	cache sync.Mutex
}

var _ Builder = (*LocalBuilder)(nil)

// NewBuilder checks cfg and returns a builder.
func NewBuilder(cfg BuilderConfig) (*LocalBuilder, error) {
	if cfg.DataDir == "" || cfg.Runtime == nil || cfg.Slots == nil || cfg.Base == nil {
		return nil, errors.New("template builder: BuilderConfig needs DataDir, Runtime, Slots and Base")
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	for _, d := range []string{layersDir, finalsDir, sourcesDir} {
		if err := os.MkdirAll(filepath.Join(cfg.DataDir, "templates", d), 0o700); err != nil {
			return nil, fmt.Errorf("template builder: %w", err)
		}
	}
	return &LocalBuilder{cfg: cfg, log: log}, nil
}

// stepState is the build context a step runs in and leaves behind: the
// environment, the user and the working directory ("" is the user's home).
type stepState struct {
	Env     map[string]string
	User    string
	Workdir string
}

func (s stepState) clone() stepState {
	s.Env = maps.Clone(s.Env)
	if s.Env == nil {
		s.Env = map[string]string{}
	}
	return s
}

// build is one Build call in progress.
type build struct {
	b    *LocalBuilder
	req  BuildRequest
	dir  string   // the artifact directory
	mine []string // layer files this build made that no cache entry names yet

	kernel, initramfs, disk string // what the VM boots
	image                   string // a root image source, which disk links
	sourceKey               string
	states                  []stepState // states[i]: before step i+1; states[n]: after the last
	hashes                  []string    // hashes[i]: of the source and steps 1..i

	// Settled by start: how many leading steps are cached, the disk the VM
	// boots (the last cached layer, or the source's disk), the final
	// snapshot's cache key and the cached snapshot, if any.
	cached int
	root   string
	final  string
	hit    *Artifact
}

func (bd *build) logf(step, level, format string, args ...any) {
	e := LogEntry{Time: time.Now().UTC(), Level: level, Message: fmt.Sprintf(format, args...), Step: step}
	if bd.req.Log != nil {
		bd.req.Log(e)
	}
	bd.b.log.Debug("template build", "build", bd.req.BuildID, "step", step, "msg", e.Message)
}

func stepName(i int) string { return strconv.Itoa(i) }

// Build runs req and returns its artifact, or a *BuildError.
func (b *LocalBuilder) Build(ctx context.Context, req BuildRequest) (a *Artifact, err error) {
	if req.CPUs == 0 {
		req.CPUs = DefaultBuildCPUs
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = DefaultBuildMemoryMiB
	}
	bd := &build{b: b, req: req, dir: ArtifactDir(b.cfg.DataDir, req.TemplateID, req.BuildID)}
	if !validID.MatchString(req.TemplateID) || !validID.MatchString(req.BuildID) {
		return nil, &BuildError{Step: "base", Message: fmt.Sprintf("template %q or build %q is not a valid ID", req.TemplateID, req.BuildID)}
	}
	defer func() {
		if err == nil {
			return
		}
		// A failed build leaves nothing but the cache entries of the
		// steps that succeeded.
		os.RemoveAll(bd.dir)
		for _, f := range bd.mine {
			os.Remove(f)
		}
		var be *BuildError
		if !errors.As(err, &be) {
			be = &BuildError{Step: "finalize", Message: err.Error()}
			err = be
		}
		bd.logf(be.Step, "error", "build failed: %s", be.Message)
	}()
	if err := bd.prepare(); err != nil {
		return nil, err
	}
	release, err := bd.start(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	if bd.hit != nil {
		bd.logCached(bd.cached)
		bd.logf("finalize", "info", "every step and the snapshot are cached (build %s)", bd.hit.BuildID)
		return bd.linkFinal(bd.hit)
	}
	return bd.run(ctx)
}

// start settles, under the cache lock (CollectGarbage), what the build
// starts from: the source's disk (linked into sources/), the cached layers
// and the cached final snapshot. It pins them, with the artifact directory it
// makes, until release: a collection keeps what a running build uses.
func (bd *build) start(ctx context.Context) (release func(), err error) {
	dataDir := bd.b.cfg.DataDir
	unlock, err := lockCache(ctx, dataDir, func() {
		bd.logf("base", "info", "waiting for a garbage collection of the template cache")
	})
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := bd.linkSource(); err != nil {
		return nil, err
	}
	bd.cached, bd.root = bd.cachedSteps()
	bd.final = bd.finalKey()
	if bd.cached == len(bd.req.Steps) && !bd.req.Force {
		bd.hit, _ = bd.cachedFinal(bd.final)
	}
	uses := []string{bd.disk, bd.root, bd.dir}
	if bd.hit != nil {
		uses = append(uses, bd.hit.Dir)
	}
	release, err = pinBuild(ctx, dataDir, bd.req.BuildID, uses)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(bd.dir), 0o700); err != nil {
		release()
		return nil, err
	}
	if err := os.Mkdir(bd.dir, 0o700); err != nil {
		release()
		return nil, fmt.Errorf("artifact directory: %w", err)
	}
	return release, nil
}

// linkSource makes the source's disk of a root image source: a link of the
// image of our own, as layers name their backing file by path and the image
// store may prune its file.
func (bd *build) linkSource() error {
	if bd.image == "" {
		return nil
	}
	if _, err := os.Stat(bd.disk); err == nil {
		return nil
	}
	if err := linkOrCopy(bd.image, bd.disk); err != nil {
		return &BuildError{Step: "base", Message: fmt.Sprintf("source image: %v", err)}
	}
	return nil
}

// ArtifactDir is where LocalBuilder puts the artifact of a build of a
// template: a build in progress has it already.
func ArtifactDir(dataDir, templateID, buildID string) string {
	return filepath.Join(dataDir, "templates", templateID, buildID)
}

// validID keeps template and build IDs usable as one path element.
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// prepare resolves the source and computes every step's state and hash.
func (bd *build) prepare() error {
	req, from := bd.req, bd.req.From
	start := stepState{Env: map[string]string{}, User: defaultStepUser}
	switch {
	case from.Template != nil && from.RootImage == "":
		t := from.Template
		bd.kernel, bd.initramfs, bd.disk = t.Kernel, t.Initramfs, microvm.SnapshotDisk(t.Snapshot)
		m, err := microvm.ReadManifest(t.Snapshot)
		if err != nil {
			return &BuildError{Step: "base", Message: fmt.Sprintf("source template: %v", err)}
		}
		bd.sourceKey = fmt.Sprintf("template %s %s %s", t.Dir, t.BuildID, m.CreatedAt.Format(time.RFC3339Nano))
		start.Env = maps.Clone(t.Env)
		start.User = cmpOr(t.User, defaultStepUser)
		start.Workdir = t.Workdir
	case from.RootImage != "" && from.Template == nil:
		base := bd.b.cfg.Base
		fi, err := os.Stat(from.RootImage)
		if err != nil {
			return &BuildError{Step: "base", Message: fmt.Sprintf("source image: %v", err)}
		}
		bd.sourceKey = fmt.Sprintf("image %s %d %s", from.RootImage, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano))
		bd.image = from.RootImage
		disk := filepath.Join(bd.b.cfg.DataDir, "templates", sourcesDir, hashOf(bd.sourceKey)+".ext4")
		bd.kernel, bd.initramfs, bd.disk = base.Kernel, base.Initramfs, disk
		start.Env = maps.Clone(from.Env)
		start.User = cmpOr(from.User, defaultStepUser)
		start.Workdir = from.Workdir
	default:
		return &BuildError{Step: "base", Message: "a build starts from exactly one of a template and an image"}
	}
	for _, f := range []string{bd.kernel, bd.initramfs} {
		fi, err := os.Stat(f)
		if err != nil {
			return &BuildError{Step: "base", Message: fmt.Sprintf("boot file: %v", err)}
		}
		bd.sourceKey += fmt.Sprintf(" %s %d %s", f, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano))
	}
	bd.states = []stepState{start.clone()}
	bd.hashes = []string{hashOf(buildRecipe, bd.sourceKey)}
	st := start.clone()
	for i, s := range req.Steps {
		step := stepName(i + 1)
		if err := checkStep(s); err != nil {
			return &BuildError{Step: step, Message: err.Error()}
		}
		if (s.Type == "COPY" || s.Type == "ADD") && req.Files == nil {
			return &BuildError{Step: step, Message: "COPY needs uploaded files, and this build has no file store"}
		}
		st = st.clone()
		switch s.Type {
		case "ENV", "ARG":
			for j := 0; j+1 < len(s.Args); j += 2 {
				st.Env[s.Args[j]] = s.Args[j+1]
			}
		case "WORKDIR":
			st.Workdir = joinWorkdir(st.Workdir, s.Args[0])
		case "USER":
			st.User = s.Args[0]
		}
		bd.states = append(bd.states, st)
		// A step's hash covers what it is and everything before it; the
		// state it runs in follows from the earlier steps.
		key := struct {
			Type      string
			Args      []string
			FilesHash string
		}{s.Type, s.Args, s.FilesHash}
		bd.hashes = append(bd.hashes, hashOf(bd.hashes[i], key))
	}
	return nil
}

// checkStep validates a step's type and arguments.
func checkStep(s Step) error {
	switch s.Type {
	case "RUN":
		if len(s.Args) < 1 || strings.TrimSpace(s.Args[0]) == "" {
			return errors.New("RUN needs a command")
		}
	case "COPY", "ADD":
		if len(s.Args) < 2 || s.Args[0] == "" || s.Args[1] == "" {
			return fmt.Errorf("%s needs a source and a destination", s.Type)
		}
		if s.FilesHash == "" {
			return fmt.Errorf("%s %s has no filesHash: its files were not uploaded", s.Type, s.Args[0])
		}
		if len(s.Args) > 3 && s.Args[3] != "" {
			if _, err := strconv.ParseUint(s.Args[3], 8, 32); err != nil {
				return fmt.Errorf("%s mode %q is not an octal number", s.Type, s.Args[3])
			}
		}
	case "ENV", "ARG":
		if len(s.Args) == 0 || len(s.Args)%2 != 0 && s.Type == "ENV" {
			return fmt.Errorf("%s needs name and value pairs", s.Type)
		}
		for j := 0; j < len(s.Args); j += 2 {
			if s.Args[j] == "" || strings.ContainsAny(s.Args[j], "=\x00") {
				return fmt.Errorf("%s name %q is not a variable name", s.Type, s.Args[j])
			}
		}
	case "WORKDIR":
		if len(s.Args) != 1 || s.Args[0] == "" {
			return errors.New("WORKDIR needs one path")
		}
	case "USER":
		if len(s.Args) < 1 || !userPattern.MatchString(s.Args[0]) {
			return fmt.Errorf("USER %q is not a user name", strings.Join(s.Args, " "))
		}
	default:
		return fmt.Errorf("unknown step type %q (want RUN, COPY, ADD, ENV, ARG, WORKDIR or USER)", s.Type)
	}
	return nil
}

var userPattern = regexp.MustCompile(`^[a-z_][a-z0-9_-]*[$]?$`)

// joinWorkdir resolves a WORKDIR argument against the current one (which
// starts at /).
func joinWorkdir(cur, p string) string {
	if path.IsAbs(p) {
		return path.Clean(p)
	}
	return path.Join("/", cur, p)
}

// hashOf hashes a JSON rendering of parts: 32 hex digits.
func hashOf(parts ...any) string {
	b, _ := json.Marshal(parts)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// layerEntry is a cache entry: the layer file that holds a step's disk.
type layerEntry struct {
	Layer     string    `json:"layer"`
	Step      string    `json:"step"`
	CreatedAt time.Time `json:"createdAt"`
}

func (bd *build) layersPath(name string) string {
	return filepath.Join(bd.b.cfg.DataDir, "templates", layersDir, name)
}

// layerOf returns the cached layer of hash, or "".
func (bd *build) layerOf(hash string) string {
	b, err := os.ReadFile(bd.layersPath(hash + ".json"))
	if err != nil {
		return ""
	}
	var e layerEntry
	if json.Unmarshal(b, &e) != nil {
		return ""
	}
	if _, err := os.Stat(e.Layer); err != nil {
		return ""
	}
	return e.Layer
}

// cachedSteps counts the leading steps whose layers are cached (and not
// forced), marks their entries used, and returns the disk the build VM
// boots: the last cached step's layer, or the source's disk.
func (bd *build) cachedSteps() (int, string) {
	if bd.req.Force {
		return 0, bd.disk
	}
	bd.b.cache.Lock()
	defer bd.b.cache.Unlock()
	k, root := 0, bd.disk
	for i, s := range bd.req.Steps {
		layer := ""
		if !s.Force {
			layer = bd.layerOf(bd.hashes[i+1])
		}
		if layer == "" {
			break
		}
		markUsed(bd.layersPath(bd.hashes[i+1] + ".json"))
		k, root = i+1, layer
	}
	return k, root
}

// finalKey hashes what the snapshot depends on beyond the layers: the
// runtime's part is what the snapshot's guest keeps (its CPU, its devices).
func (bd *build) finalKey() string {
	r, rt := bd.req, bd.b.cfg.Runtime
	last := bd.states[len(bd.states)-1]
	return hashOf(bd.hashes[len(bd.hashes)-1], r.StartCmd, r.ReadyCmd, r.CPUs, r.MemoryMiB, r.MinFreeDiskMiB,
		rt.Version(), rt.Accel(), rt.CPUModel(), rt.TransferDiskSize(), last)
}

// finalEntry is a cached build result.
type finalEntry struct {
	Artifact string `json:"artifact"`
}

func (bd *build) cachedFinal(key string) (*Artifact, bool) {
	p := filepath.Join(bd.b.cfg.DataDir, "templates", finalsDir, key+".json")
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, false
	}
	var e finalEntry
	if json.Unmarshal(b, &e) != nil {
		return nil, false
	}
	a, err := LoadArtifact(e.Artifact)
	if err != nil {
		return nil, false
	}
	markUsed(p)
	return a, true
}

// linkFinal makes this build's artifact out of an earlier identical build:
// the snapshot's files are immutable, so hard links serve.
func (bd *build) linkFinal(src *Artifact) (*Artifact, error) {
	a := *src
	a.BuildID, a.Dir = bd.req.BuildID, bd.dir
	a.Snapshot = filepath.Join(bd.dir, snapshotDir)
	if err := os.Mkdir(a.Snapshot, 0o700); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(src.Snapshot)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if err := os.Link(filepath.Join(src.Snapshot, e.Name()), filepath.Join(a.Snapshot, e.Name())); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(bd.dir, initSecretFile), []byte(a.InitSecret+"\n"), 0o600); err != nil {
		return nil, err
	}
	a.BuiltAt = time.Now().UTC()
	return &a, writeArtifact(&a)
}

// writeArtifact commits the build a: its snapshot's files and the disk
// layers under them are synced first, since artifact.json vouches for them
// (a torn snapshot or layer would break every sandbox of the template after
// a host crash).
func writeArtifact(a *Artifact) error {
	if err := durable.SyncTree(context.Background(), a.Snapshot); err != nil {
		return err
	}
	if err := syncChain(a.RootDisk); err != nil {
		return err
	}
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(a.Dir, artifactFile), append(b, '\n'), 0o644)
}

// syncChain syncs the disk at path and every qcow2 backing file under it
// (layers are immutable once cut, so the syncs of cached ones cost nothing).
func syncChain(path string) error {
	for n := 0; path != ""; n++ {
		if n > 4096 {
			return fmt.Errorf("sync the disk chain: %s: more than 4096 backing files", path)
		}
		if err := durable.Sync(path); err != nil {
			return err
		}
		next, err := microvm.BackingFile(path)
		if err != nil {
			return err
		}
		path = next
	}
	return nil
}

// run boots the VM on the first uncached step's layer, runs the rest of the
// steps and the start command, and snapshots the VM.
func (bd *build) run(ctx context.Context) (*Artifact, error) {
	b, req := bd.b, bd.req
	n := len(req.Steps)
	cached, root := bd.cached, bd.root
	bd.logCached(cached)
	secret := make([]byte, 24)
	rand.Read(secret)
	a := &Artifact{
		BuildID: req.BuildID, Dir: bd.dir,
		Kernel: bd.kernel, Initramfs: bd.initramfs, RootDisk: root,
		Snapshot:   filepath.Join(bd.dir, snapshotDir),
		InitSecret: hex.EncodeToString(secret),
		CPUs:       req.CPUs, MemoryMiB: req.MemoryMiB,
	}
	last := bd.states[n]
	a.Env, a.User, a.Workdir, a.StartCmd = last.Env, last.User, last.Workdir, req.StartCmd
	if len(a.Env) == 0 {
		a.Env = nil
	}
	if err := os.WriteFile(filepath.Join(bd.dir, initSecretFile), []byte(a.InitSecret+"\n"), 0o600); err != nil {
		return nil, err
	}

	slot, err := b.cfg.Slots.Acquire(ctx, netns.Policy{AllowInternet: true})
	if err != nil {
		return nil, &BuildError{Step: "base", Message: fmt.Sprintf("no network slot for the build VM: %v", err)}
	}
	defer b.cfg.Slots.Release(slot)
	spec := runtime.Spec{
		ID:   "build-" + req.BuildID,
		CPUs: a.CPUs, MemoryMiB: a.MemoryMiB,
		Kernel: a.Kernel, Initramfs: a.Initramfs, RootDisk: root,
		Slot: slot, Hostname: baseHostname, InitSecret: a.InitSecret,
	}
	if cached < n {
		spec.Overlay = bd.newLayer(cached + 1)
	}
	bd.logf("base", "info", "booting the build VM (%d vCPUs, %d MiB, %s) from %s", a.CPUs, a.MemoryMiB, b.cfg.Runtime.Accel(), filepath.Base(root))
	g := &guestClient{base: "http://" + net.JoinHostPort(slot.SlotIP.String(), strconv.Itoa(envdPort))}
	vm, started, err := coldBoot(ctx, b.cfg.Runtime, spec, g.base, func(msg string) { bd.logf("base", "warn", "%s", msg) })
	if err != nil {
		return nil, &BuildError{Step: "base", Message: fmt.Sprintf("boot the build VM: %v", err)}
	}
	defer b.cfg.Runtime.Kill(context.WithoutCancel(ctx), vm)
	if err := g.init(ctx, a.InitSecret, b.cfg.DNS); err != nil {
		return nil, &BuildError{Step: "base", Message: withConsole(err, vm).Error()}
	}
	bd.logf("base", "info", "build VM ready in %s", time.Since(started).Round(time.Millisecond))

	for i := cached + 1; i <= n; i++ {
		s := req.Steps[i-1]
		step := stepName(i)
		t0 := time.Now()
		bd.logf(step, "info", "[%d/%d] %s %s", i, n, s.Type, strings.Join(s.Args, " "))
		if err := bd.runStep(ctx, g, i); err != nil {
			var be *BuildError
			if errors.As(err, &be) {
				return nil, err
			}
			return nil, &BuildError{Step: step, Message: err.Error()}
		}
		// The layer must hold the step's writes: flush the guest's page
		// cache, then freeze the layer and move on to the next one.
		if _, err := g.run(ctx, "root", "", nil, "sync", nil); err != nil {
			return nil, &BuildError{Step: step, Message: fmt.Sprintf("sync the disk: %v", err)}
		}
		next := ""
		if i < n {
			next = bd.newLayer(i + 1)
		}
		layer := spec.Overlay
		if err := b.cfg.Runtime.SwitchDisk(ctx, vm, next); err != nil {
			return nil, &BuildError{Step: step, Message: err.Error()}
		}
		spec.Overlay = next
		if err := bd.cacheLayer(bd.hashes[i], layer, step); err != nil {
			return nil, &BuildError{Step: step, Message: err.Error()}
		}
		bd.logf(step, "info", "done in %s", time.Since(t0).Round(time.Millisecond))
	}
	if err := bd.ensureFreeDisk(ctx, g, vm); err != nil {
		return nil, err
	}
	if err := bd.finalize(ctx, g, vm); err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := b.cfg.Runtime.Snapshot(ctx, vm, a.Snapshot); err != nil {
		return nil, &BuildError{Step: "finalize", Message: fmt.Sprintf("snapshot: %v", err)}
	}
	a.SnapshotTime = time.Since(t0).Round(time.Microsecond).String()
	a.BootToHealth = ""
	a.BuiltAt = time.Now().UTC()
	if err := writeArtifact(a); err != nil {
		return nil, err
	}
	if b, err := json.Marshal(finalEntry{Artifact: bd.dir}); err == nil {
		writeFileAtomic(filepath.Join(bd.b.cfg.DataDir, "templates", finalsDir, bd.final+".json"), b, 0o600)
	}
	bd.logf("finalize", "info", "snapshot saved in %s", a.SnapshotTime)
	return a, nil
}

// logCached logs the first cached steps as cached.
func (bd *build) logCached(cached int) {
	n := len(bd.req.Steps)
	for i := 1; i <= cached; i++ {
		s := bd.req.Steps[i-1]
		bd.logf(stepName(i), "info", "[%d/%d] %s %s: cached", i, n, s.Type, strings.Join(s.Args, " "))
	}
}

// newLayer names the layer file step i's writes go to: unique to the build,
// so concurrent builds of the same step never share a file.
func (bd *build) newLayer(i int) string {
	p := bd.layersPath(bd.hashes[i] + "-" + bd.req.BuildID + ".qcow2")
	bd.mine = append(bd.mine, p)
	return p
}

// cacheLayer records layer as the disk of hash: from now on it is the
// cache's, not this build's to remove.
func (bd *build) cacheLayer(hash, layer, step string) error {
	b, _ := json.Marshal(layerEntry{Layer: layer, Step: step, CreatedAt: time.Now().UTC()})
	bd.b.cache.Lock()
	defer bd.b.cache.Unlock()
	if err := writeFileAtomic(bd.layersPath(hash+".json"), b, 0o600); err != nil {
		return err
	}
	for i, f := range bd.mine {
		if f == layer {
			bd.mine = append(bd.mine[:i], bd.mine[i+1:]...)
			break
		}
	}
	return nil
}

// runStep runs step i (1-based) in the build VM.
func (bd *build) runStep(ctx context.Context, g *guestClient, i int) error {
	s := bd.req.Steps[i-1]
	st := bd.states[i-1]
	step := stepName(i)
	out := func(line string) { bd.logf(step, "info", "%s", line) }
	switch s.Type {
	case "ENV", "ARG":
		return nil // the state carries it
	case "RUN":
		user := st.User
		if len(s.Args) > 1 && s.Args[1] != "" {
			user = s.Args[1]
		}
		code, err := g.run(ctx, user, st.Workdir, st.Env, s.Args[0], out)
		if err != nil {
			return err
		}
		if code != 0 {
			return &BuildError{Step: step, Message: fmt.Sprintf("RUN %s: exited with code %d", s.Args[0], code)}
		}
		return nil
	case "WORKDIR":
		dir := bd.states[i].Workdir
		script := `set -e; mkdir -p -- "$D"; chown -- "$U:$(id -gn -- "$U")" "$D"`
		return bd.rootScript(ctx, g, step, "WORKDIR", script, map[string]string{"D": dir, "U": st.User}, out)
	case "USER":
		sudo := "false"
		if len(s.Args) > 1 && s.Args[1] == "true" {
			sudo = "true"
		}
		return bd.rootScript(ctx, g, step, "USER", userScript, map[string]string{"U": s.Args[0], "SUDO": sudo}, out)
	case "COPY", "ADD":
		return bd.copyStep(ctx, g, i, out)
	}
	return fmt.Errorf("unknown step type %q", s.Type)
}

// userScript makes user $U if missing (useradd, or busybox adduser) and,
// with SUDO=true, gives it passwordless sudo.
const userScript = `set -e
if ! id -u -- "$U" >/dev/null 2>&1; then
	shell=/bin/sh; [ -x /bin/bash ] && shell=/bin/bash
	if command -v useradd >/dev/null; then useradd --create-home --shell "$shell" -- "$U"
	else adduser -D -s "$shell" "$U"; fi
fi
if [ "$SUDO" = true ]; then
	getent group sudo >/dev/null || groupadd sudo 2>/dev/null || addgroup sudo
	usermod -aG sudo -- "$U" 2>/dev/null || addgroup "$U" sudo
	mkdir -p /etc/sudoers.d
	printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$U" > "/etc/sudoers.d/90-warren-$U"
	chmod 0440 "/etc/sudoers.d/90-warren-$U"
fi`

// copyScript puts the files of a COPY step, unpacked from $TAR, at $DEST
// with Docker's rules: one directory matched by $SRC is merged into DEST; a
// file goes to DEST, or into it when DEST ends in / or is a directory;
// several matches go into DEST. Copies take $OWNER and, if set, $MODE.
const copyScript = `set -e
shopt -s nullglob dotglob
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp" "$TAR"' EXIT
tar -xzf "$TAR" -C "$tmp" --no-same-owner
cd "$tmp"
IFS=$'\n'
matches=( $SRC )
if [ ${#matches[@]} -eq 0 ]; then echo "COPY: no file matches $SRC" >&2; exit 1; fi
copied=()
isdir() { [ -d "$1" ] && [ ! -L "$1" ]; }
merge() { # the entries of directory $1 into DEST
	mkdir -p -- "$DEST"
	for e in "$1"/*; do cp -a -- "$e" "$DEST/"; copied+=("$DEST/$(basename -- "$e")"); done
}
if [ ${#matches[@]} -eq 1 ] && isdir "${matches[0]}"; then
	isdir "$DEST" || copied+=("$DEST")
	merge "${matches[0]}"
elif [ ${#matches[@]} -gt 1 ] || [[ "$DEST" == */ ]] || isdir "$DEST"; then
	mkdir -p -- "$DEST"
	for m in "${matches[@]}"; do
		if isdir "$m"; then merge "$m"
		else cp -a -- "$m" "$DEST/"; copied+=("$DEST/$(basename -- "$m")"); fi
	done
else
	mkdir -p -- "$(dirname -- "$DEST")"
	rm -rf -- "$DEST"
	cp -a -- "${matches[0]}" "$DEST"; copied+=("$DEST")
fi
if [ ${#copied[@]} -gt 0 ]; then
	chown -R -h -- "$OWNER" "${copied[@]}"
	if [ -n "$MODE" ]; then chmod -R -- "$MODE" "${copied[@]}"; fi
fi`

// copyStep uploads the step's tar.gz into the guest and unpacks it.
func (bd *build) copyStep(ctx context.Context, g *guestClient, i int, out func(string)) error {
	s := bd.req.Steps[i-1]
	st := bd.states[i-1]
	step := stepName(i)
	local, err := bd.req.Files(s.FilesHash)
	if err != nil {
		return &BuildError{Step: step, Message: fmt.Sprintf("%s %s: the files (hash %s) were not uploaded: %v", s.Type, s.Args[0], s.FilesHash, err)}
	}
	remote := fmt.Sprintf("/tmp/.warren-copy-%s-%d.tar.gz", bd.req.BuildID, i)
	if err := g.upload(ctx, local, remote); err != nil {
		return fmt.Errorf("upload the files: %w", err)
	}
	dest := s.Args[1]
	if !path.IsAbs(dest) {
		home := "/root"
		if st.User != "root" {
			home = "/home/" + st.User
		}
		base := cmpOr(st.Workdir, home)
		trailing := strings.HasSuffix(dest, "/")
		dest = path.Join(base, dest)
		if trailing {
			dest += "/"
		}
	}
	owner := st.User
	if len(s.Args) > 2 && s.Args[2] != "" {
		owner = s.Args[2]
	}
	if !strings.Contains(owner, ":") {
		owner += ":" + owner
	}
	mode := ""
	if len(s.Args) > 3 {
		mode = s.Args[3]
	}
	src := strings.TrimPrefix(path.Clean(s.Args[0]), "/")
	env := map[string]string{"TAR": remote, "SRC": src, "DEST": dest, "OWNER": owner, "MODE": mode}
	return bd.rootScript(ctx, g, step, s.Type, copyScript, env, out)
}

// rootScript runs a bash script of the builder's as root; it must exit 0.
func (bd *build) rootScript(ctx context.Context, g *guestClient, step, what, script string, env map[string]string, out func(string)) error {
	code, err := g.run(ctx, "root", "/", env, script, out)
	if err != nil {
		return err
	}
	if code != 0 {
		return &BuildError{Step: step, Message: fmt.Sprintf("%s failed (exit code %d)", what, code)}
	}
	return nil
}

// ensureFreeDisk grows the build VM's disk and its root file system (online:
// QMP block_resize, then resize2fs in the guest) when the steps left less
// free space than the request asks for. The growth lands in the VM's last
// overlay, so the template's sandboxes have it; the cached step layers keep
// their size.
func (bd *build) ensureFreeDisk(ctx context.Context, g *guestClient, vm runtime.VM) error {
	want := bd.req.MinFreeDiskMiB
	if want <= 0 {
		return nil
	}
	free, size, err := bd.diskSpace(ctx, g)
	if err != nil {
		return err
	}
	if free >= want {
		bd.logf("finalize", "info", "%d MiB free on the disk (at least %d asked)", free, want)
		return nil
	}
	// ext4 keeps some of the new space for its own metadata: ask for more.
	grow := want - free + (want-free)/16 + 64
	bd.logf("finalize", "info", "growing the disk by %d MiB: %d MiB free, %d MiB asked", grow, free, want)
	if err := bd.b.cfg.Runtime.ResizeDisk(ctx, vm, (int64(size)+int64(grow))<<20); err != nil {
		return &BuildError{Step: "finalize", Message: fmt.Sprintf("grow the disk: %v", err)}
	}
	code, err := g.run(ctx, "root", "/", nil, "resize2fs \"$(findmnt -n -o SOURCE /)\"", func(l string) { bd.logf("finalize", "debug", "%s", l) })
	if err == nil && code != 0 {
		err = fmt.Errorf("resize2fs exited with code %d", code)
	}
	if err != nil {
		return &BuildError{Step: "finalize", Message: fmt.Sprintf("grow the file system: %v", err)}
	}
	if free, _, err = bd.diskSpace(ctx, g); err != nil {
		return err
	}
	if free < want {
		return &BuildError{Step: "finalize", Message: fmt.Sprintf("the disk has %d MiB free after growing it, %d asked", free, want)}
	}
	bd.logf("finalize", "info", "%d MiB free on the disk now", free)
	return nil
}

// diskSpace reads the root file system's free space and its disk's size, in MiB.
func (bd *build) diskSpace(ctx context.Context, g *guestClient) (free, size int, err error) {
	var out strings.Builder
	script := `df -B1M --output=avail / | tail -n 1; blockdev --getsize64 "$(findmnt -n -o SOURCE /)"`
	code, err := g.run(ctx, "root", "/", nil, script, func(l string) { out.WriteString(l + "\n") })
	if err == nil && code != 0 {
		err = fmt.Errorf("exited with code %d: %s", code, out.String())
	}
	if err == nil {
		f := strings.Fields(out.String())
		if len(f) != 2 {
			err = fmt.Errorf("unexpected output %q", out.String())
		} else {
			var bytes int64
			free, err = strconv.Atoi(f[0])
			if err == nil {
				bytes, err = strconv.ParseInt(f[1], 10, 64)
				size = int(bytes >> 20)
			}
		}
	}
	if err != nil {
		return 0, 0, &BuildError{Step: "finalize", Message: fmt.Sprintf("read the free disk space: %v", err)}
	}
	return free, size, nil
}

// finalize starts the start command and waits for the ready command.
func (bd *build) finalize(ctx context.Context, g *guestClient, vm runtime.VM) error {
	req := bd.req
	st := bd.states[len(bd.states)-1]
	ready := req.ReadyCmd
	switch {
	case ready != "":
	case req.StartCmd != "":
		ready = "sleep 20"
	default:
		ready = "sleep 0"
	}
	out := func(line string) { bd.logf("finalize", "info", "%s", line) }
	exited := make(chan error, 1)
	if req.StartCmd != "" {
		bd.logf("finalize", "info", "start command: %s", req.StartCmd)
		// No deadline: envd ties a process's life to its request's
		// Connect-Timeout-Ms. The stream is dropped before the snapshot;
		// the process runs on in every sandbox.
		sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
		defer stop()
		go func() {
			code, err := g.run(sctx, st.User, st.Workdir, st.Env, req.StartCmd, out)
			if err == nil {
				err = fmt.Errorf("the start command exited with code %d before the template was ready", code)
			}
			exited <- err
		}()
		defer func() {
			stop()
			g.closeIdle()
		}()
	}
	bd.logf("finalize", "info", "ready command: %s", ready)
	deadline := time.Now().Add(readyLimit)
	for {
		rctx, cancel := context.WithTimeout(ctx, readyLimit)
		code, err := g.run(rctx, st.User, st.Workdir, st.Env, ready, nil)
		cancel()
		if err == nil && code == 0 {
			break
		}
		select {
		case err := <-exited:
			if ctx.Err() == nil {
				return &BuildError{Step: "finalize", Message: err.Error()}
			}
		default:
		}
		if time.Now().After(deadline) {
			return &BuildError{Step: "finalize", Message: fmt.Sprintf("the ready command %q did not succeed within %s", ready, readyLimit)}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-vm.Done():
			return &BuildError{Step: "finalize", Message: "the build VM stopped"}
		case <-time.After(readyPeriod):
		}
	}
	bd.logf("finalize", "info", "ready")
	// E2B's marker of what a sandbox runs (TEMPLATES.md §4), then the disk
	// settles for the snapshot.
	marker := fmt.Sprintf("printf 'ENV_ID=%%s\\nTEMPLATE_ID=%%s\\nBUILD_ID=%%s\\n' %q %q %q > /.e2b; sync", req.TemplateID, req.TemplateID, req.BuildID)
	if _, err := g.run(ctx, "root", "/", nil, marker, nil); err != nil {
		return &BuildError{Step: "finalize", Message: fmt.Sprintf("sync the disk: %v", err)}
	}
	return nil
}

// guestClient talks to the build VM's envd.
type guestClient struct {
	base string
	once sync.Once
	c    *http.Client
}

func (g *guestClient) client() *http.Client {
	g.once.Do(func() {
		// Connections are closed before the snapshot (closeIdle): an open
		// one would be half-open in every sandbox.
		g.c = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	})
	return g.c
}

func (g *guestClient) closeIdle() { g.client().CloseIdleConnections() }

func basicUser(user string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"))
}

// init hands the build VM's envd its defaults and DNS.
func (g *guestClient) init(ctx context.Context, secret string, dns []string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	body, _ := json.Marshal(map[string]any{"defaultUser": defaultStepUser, "dns": dns})
	return g.post(ctx, "/init", secret, body)
}

func (g *guestClient) post(ctx context.Context, p, secret string, body []byte) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.base+p, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(envd.InitSecretHeader, secret)
	resp, err := g.client().Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("envd %s answered %s: %s", p, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// run runs script with bash (a login shell, as E2B runs commands) as user
// in workdir ("" is the user's home) with env, passes each output line to
// out (nil drops them) and returns the exit code.
func (g *guestClient) run(ctx context.Context, user, workdir string, env map[string]string, script string, out func(string)) (int, error) {
	proc := processconnect.NewProcessClient(g.client(), g.base, connect.WithProtoJSON())
	cfg := &processpb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", script}, Envs: env}
	if workdir != "" {
		cfg.Cwd = &workdir
	}
	noStdin := false
	req := connect.NewRequest(&processpb.StartRequest{Process: cfg, Stdin: &noStdin})
	req.Header().Set("Authorization", basicUser(user))
	stream, err := proc.Start(ctx, req)
	if err != nil {
		return 0, fmt.Errorf("start a command as %s: %w", user, err)
	}
	defer stream.Close()
	lines := &lineSplitter{out: out}
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			lines.write(d.GetStdout())
			lines.write(d.GetStderr())
		}
		if end := ev.GetEnd(); end != nil {
			lines.flush()
			if !end.GetExited() {
				return -1, nil
			}
			return int(end.GetExitCode()), nil
		}
	}
	lines.flush()
	if err := stream.Err(); err != nil {
		return 0, fmt.Errorf("command as %s: %w", user, err)
	}
	return 0, errors.New("the command's stream ended without an end event")
}

// upload writes the local file to remote in the guest, as root.
func (g *guestClient) upload(ctx context.Context, local, remote string) error {
	f, err := os.Open(local)
	if err != nil {
		return err
	}
	defer f.Close()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		part, err := mw.CreateFormFile("file", path.Base(remote))
		if err == nil {
			_, err = io.Copy(part, f)
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	q := url.Values{"path": {remote}, "username": {"root"}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.base+"/files?"+q.Encode(), pr)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := g.client().Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("envd /files answered %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// lineSplitter turns output chunks into lines.
type lineSplitter struct {
	out func(string)
	buf []byte
}

func (l *lineSplitter) write(b []byte) {
	if l.out == nil || len(b) == 0 {
		return
	}
	l.buf = append(l.buf, b...)
	consumed := 0
	for {
		i := bytes.IndexByte(l.buf[consumed:], '\n')
		if i < 0 {
			break
		}
		l.out(strings.TrimRight(string(l.buf[consumed:consumed+i]), "\r"))
		consumed += i + 1
	}
	l.buf = l.buf[consumed:]
	if len(l.buf) > 64<<10 { // a very long line without a newline
		l.flush()
	}
}

func (l *lineSplitter) flush() {
	if l.out != nil && len(l.buf) > 0 {
		l.out(string(l.buf))
	}
	l.buf = nil
}
