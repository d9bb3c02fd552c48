// Package template makes what sandboxes start from: a template build's
// artifact, which holds the guest kernel and initramfs, the root image and a
// snapshot of the template's VM, booted and ready, that every sandbox of the
// template restores.
//
// For now it builds the one built-in template, base (EnsureBase); user
// templates (steps run in a build sandbox, layers, a start command) come later
// and produce the same Artifact.
package template

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/durable"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/fslock"
	"github.com/warren-sh/warren/internal/guest"
	"github.com/warren-sh/warren/internal/image"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// An artifact directory, <dataDir>/templates/<template>/<buildID>/:
//
//	artifact.json   Artifact; written last, so a directory without it is an
//	                unfinished build (removed and redone by the next call)
//	kernel          the guest kernel (vmlinux), a hard link to the data dir's
//	initramfs.cpio  envd as init, and the virtio modules
//	rootfs.ext4     the root image, a hard link to the base image: the image
//	                package replaces its file by rename, so this one never
//	                changes under the snapshot
//	init-secret     envd's init secret in the snapshot (mode 0600)
//	snapshot/       the VM booted, envd /init'ed (microvm's snapshot layout)
const (
	artifactFile   = "artifact.json"
	kernelFile     = "kernel"
	initramfsFile  = "initramfs.cpio"
	rootfsFile     = "rootfs.ext4"
	initSecretFile = "init-secret"
	snapshotDir    = "snapshot"
	lockFile       = ".artifact.lock" // in baseDir
	// retiredFile, in a base build's directory, says the store that
	// recorded the build dropped it (RetireBaseBuild): only such a build
	// may be collected.
	retiredFile = "retired"
)

// baseDir, under <dataDir>/templates, holds the base template's builds
// (<buildID>/) beside the base image (internal/image).
const baseDir = "base"

// baseRecipe versions the steps of EnsureBase: bump it when they change what
// the artifact holds, so cached builds are redone.
//
//	2: the guest CPU has ARAT under TCG (a tickless idle)
//	3: the guest CPU is x86-64-v3 under TCG
//	4: the VM has a transfer disk (internal/transfer), which restores keep
const baseRecipe = 4

// E2B's base template sizes: 2 vCPUs, 512 MiB. A snapshot fixes them for
// every sandbox restored from it.
const (
	DefaultBaseCPUs      = 2
	DefaultBaseMemoryMiB = 512
)

// baseHostname is the base template's hostname, as E2B sandboxes answer
// (and as the base image's /etc/hostname says).
const baseHostname = "e2b.local"

// Artifact is a template build: the files a node needs to start sandboxes
// from it (artifact.json).
type Artifact struct {
	// BuildID names the build: a hash of everything that went into it.
	BuildID string `json:"buildId"`
	// Dir is the artifact directory.
	Dir string `json:"dir"`
	// Kernel, Initramfs and RootDisk are the files the snapshot's VM booted.
	Kernel    string `json:"kernel"`
	Initramfs string `json:"initramfs"`
	RootDisk  string `json:"rootDisk"`
	// Snapshot is the VM snapshot every sandbox restores (runtime.Spec.Snapshot).
	Snapshot string `json:"snapshot"`
	// InitSecret is the snapshot's envd init secret: the node sends it in
	// envd.InitSecretHeader on /init.
	InitSecret string `json:"-"`
	// CPUs and MemoryMiB size every sandbox of the build.
	CPUs      int `json:"cpus"`
	MemoryMiB int `json:"memoryMiB"`
	// Inputs is what BuildID hashes (the base template's build).
	Inputs BaseInputs `json:"inputs"`
	// Env, User and Workdir are the template's defaults for its sandboxes
	// (ENV, USER and WORKDIR steps); empty: E2B's (user `user`, its home).
	// A sandbox's own env vars win over Env.
	Env     map[string]string `json:"env,omitempty"`
	User    string            `json:"user,omitempty"`
	Workdir string            `json:"workdir,omitempty"`
	// StartCmd is the command the snapshot holds running, if any.
	StartCmd string `json:"startCmd,omitempty"`
	// BuiltAt is when the build finished; BootToHealth and SnapshotTime how
	// long its VM took to boot until envd answered, and to be saved.
	BuiltAt      time.Time `json:"builtAt"`
	BootToHealth string    `json:"bootToHealth"`
	SnapshotTime string    `json:"snapshotTime"`
}

// Spec is the runtime spec that restores a sandbox id from the artifact in slot.
func (a *Artifact) Spec(id string, slot *netns.Slot) runtime.Spec {
	return runtime.Spec{
		ID: id, Slot: slot, Snapshot: a.Snapshot, CPUs: a.CPUs, MemoryMiB: a.MemoryMiB,
		Kernel: a.Kernel, Initramfs: a.Initramfs, RootDisk: a.RootDisk,
	}
}

// BaseInputs is everything the base template's build depends on.
type BaseInputs struct {
	Recipe     int    `json:"recipe"`
	EnvdSHA256 string `json:"envdSha256"`
	// Kernel is the guest kernel package and version.
	Kernel string `json:"kernel"`
	// Rootfs is the base image's manifest (internal/image).
	Rootfs image.Manifest `json:"rootfs"`
	// QEMU, Accel, CPUs and MemoryMiB: a snapshot restores only on the same.
	QEMU      string        `json:"qemu"`
	Accel     microvm.Accel `json:"accel"`
	CPUs      int           `json:"cpus"`
	MemoryMiB int           `json:"memoryMiB"`
	// GuestASLR is the runtime's (microvm.Config.GuestASLR): the snapshot's
	// kernel keeps it.
	GuestASLR bool `json:"guestASLR"`
	// TransferDisk is the size of the runtime's transfer disk
	// (microvm.Runtime.TransferDiskSize): the snapshot's guest keeps it.
	TransferDisk int64 `json:"transferDisk"`
}

// BuildID hashes the inputs: 16 hex digits.
func (in BaseInputs) BuildID() string {
	b, _ := json.Marshal(in)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// BaseOptions says how to make the base template.
type BaseOptions struct {
	// Envd is the envd binary (static): the guest's init and agent, and
	// /usr/bin/envd in the root image.
	Envd string
	// Runtime boots and snapshots the template's VM. Its state root must be
	// on the data directory's file system (the snapshot takes over the VM's
	// memory file by rename).
	Runtime *microvm.Runtime
	// Slots lends the template's VM a network slot while it boots.
	Slots *netns.Pool
	// CPUs and MemoryMiB size the template's VM and so every sandbox
	// restored from it; DefaultBaseCPUs and DefaultBaseMemoryMiB when 0.
	CPUs, MemoryMiB int
	// Mirror is the Debian mirror for the root image; image.DefaultMirror when empty.
	Mirror string
	// Progress receives a line per phase with the time elapsed; nil discards.
	Progress io.Writer
	// Register, when set, records the build (in the store) before
	// EnsureBase returns, under the lock that keeps collections of template
	// storage (CollectGarbage) away from the base builds: no collection sees
	// the build unrecorded and takes it for a superseded one.
	Register func(context.Context, *Artifact) error
}

// EnsureBase returns the base template's artifact under
// dataDir/templates/base, building what is missing: the guest kernel
// (internal/guest), the Debian root image (internal/image), an initramfs with
// opts.Envd, then a cold boot of all that in a network slot, envd's /init
// (default user `user`) and a snapshot of the ready VM.
//
// A build for the same inputs (envd, kernel, root image, QEMU and VM size) is
// returned at once; a changed input makes a new build beside the old ones,
// which stay while anything uses them (CollectGarbage removes them after).
// Concurrent callers on one data directory wait for each other.
func EnsureBase(ctx context.Context, dataDir string, opts BaseOptions) (*Artifact, error) {
	p := &progress{w: opts.Progress, start: time.Now()}
	if p.w == nil {
		p.w = io.Discard
	}
	a, err := ensureBase(ctx, p, dataDir, opts)
	if err != nil {
		return nil, fmt.Errorf("base template: %w", err)
	}
	return a, nil
}

func ensureBase(ctx context.Context, p *progress, dataDir string, opts BaseOptions) (*Artifact, error) {
	if opts.Runtime == nil || opts.Slots == nil {
		return nil, errors.New("BaseOptions needs a Runtime and Slots")
	}
	if opts.CPUs == 0 {
		opts.CPUs = DefaultBaseCPUs
	}
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = DefaultBaseMemoryMiB
	}
	envdSHA, err := image.FileSHA256(opts.Envd)
	if err != nil {
		return nil, fmt.Errorf("envd binary: %w", err)
	}

	kernel, err := guest.FetchKernel(ctx, dataDir, p.tool("guest"))
	if err != nil {
		return nil, err
	}
	p.phase("kernel %s", kernel.Release)
	img, err := image.BuildDebianBase(ctx, image.DebianBaseOptions{
		DataDir: dataDir, Envd: opts.Envd, Mirror: opts.Mirror,
		Log: slog.New(slog.NewTextHandler(p.tool("image"), &slog.HandlerOptions{ReplaceAttr: dropTime})),
	})
	if err != nil {
		return nil, err
	}
	p.phase("root image %s (%d MiB, built %s)", img.Path, img.Manifest.SizeBytes>>20, img.Manifest.BuiltAt.Format(time.RFC3339))

	in := BaseInputs{
		Recipe: baseRecipe, EnvdSHA256: envdSHA,
		Kernel: kernel.Package + " " + kernel.Version,
		Rootfs: img.Manifest,
		QEMU:   opts.Runtime.Version(), Accel: opts.Runtime.Accel(), GuestASLR: opts.Runtime.GuestASLR(),
		CPUs: opts.CPUs, MemoryMiB: opts.MemoryMiB, TransferDisk: opts.Runtime.TransferDiskSize(),
	}
	id := in.BuildID()
	base := filepath.Join(dataDir, "templates", baseDir)
	dir := filepath.Join(base, id)
	// Held until the build is recorded too: a collection would take a
	// cached build the store retired (before a downgrade) and does not list
	// yet for garbage.
	unlock, err := fslock.Lock(ctx, filepath.Join(base, lockFile), nil)
	if err != nil {
		return nil, err
	}
	defer unlock()
	a, err := LoadArtifact(dir)
	if err == nil {
		p.phase("cached build %s", id)
		// Its directory's time says when it was last taken: what keeps it
		// from pruning by age (the tests' shared cache) while in use.
		markUsed(dir)
		// A store may have retired it (before a downgrade): in use again.
		err = unretireBase(dir)
	} else {
		a, err = makeBase(ctx, p, dir, in, kernel, img, opts)
	}
	if err != nil {
		return nil, err
	}
	if opts.Register != nil {
		if err := opts.Register(ctx, a); err != nil {
			return nil, fmt.Errorf("record build %s: %w", id, err)
		}
	}
	return a, nil
}

// unretireBase undoes RetireBaseBuild: the base build in dir is in use
// again, and no collection may take it. Call it under the base builds' lock.
func unretireBase(dir string) error {
	if err := os.Remove(filepath.Join(dir, retiredFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("take back retired build %s: %w", dir, err)
	}
	return nil
}

// makeBase builds the base template's artifact in dir from scratch.
func makeBase(ctx context.Context, p *progress, dir string, in BaseInputs, kernel *guest.Kernel, img *image.Image, opts BaseOptions) (*Artifact, error) {
	id := in.BuildID()
	p.phase("building %s in %s", id, dir)
	// Leftovers of a build that died are redone from scratch.
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	a, err := buildBase(ctx, p, dir, in, kernel, img, opts)
	if err != nil {
		// A half-built directory would only be removed by the next call.
		os.RemoveAll(dir)
		return nil, err
	}
	p.phase("ready: build %s", id)
	return a, nil
}

// buildBase fills the artifact directory dir.
func buildBase(ctx context.Context, p *progress, dir string, in BaseInputs, kernel *guest.Kernel, img *image.Image, opts BaseOptions) (*Artifact, error) {
	a := &Artifact{
		BuildID: in.BuildID(), Dir: dir,
		Kernel:    filepath.Join(dir, kernelFile),
		Initramfs: filepath.Join(dir, initramfsFile),
		RootDisk:  filepath.Join(dir, rootfsFile),
		Snapshot:  filepath.Join(dir, snapshotDir),
		CPUs:      in.CPUs, MemoryMiB: in.MemoryMiB, Inputs: in,
	}
	if err := linkOrCopy(kernel.Image, a.Kernel); err != nil {
		return nil, err
	}
	if err := linkOrCopy(img.Path, a.RootDisk); err != nil {
		return nil, err
	}
	if err := guest.BuildInitramfs(kernel, opts.Envd, a.Initramfs); err != nil {
		return nil, err
	}
	secret := make([]byte, 24)
	rand.Read(secret)
	a.InitSecret = hex.EncodeToString(secret)
	if err := os.WriteFile(filepath.Join(dir, initSecretFile), []byte(a.InitSecret+"\n"), 0o600); err != nil {
		return nil, err
	}
	p.phase("files ready: kernel, root image, initramfs")

	slot, err := opts.Slots.Acquire(ctx, netns.Policy{})
	if err != nil {
		return nil, err
	}
	defer opts.Slots.Release(slot)
	spec := runtime.Spec{
		ID:   "template-base-" + a.BuildID,
		CPUs: a.CPUs, MemoryMiB: a.MemoryMiB,
		Kernel: a.Kernel, Initramfs: a.Initramfs, RootDisk: a.RootDisk,
		Slot: slot, Hostname: baseHostname, InitSecret: a.InitSecret,
	}
	// A VM of a build that died earlier may still hold the id.
	if old, err := opts.Runtime.Adopt(ctx, spec.ID); err == nil {
		opts.Runtime.Kill(ctx, old)
	}
	p.phase("booting the template VM (%d vCPUs, %d MiB, %s)", a.CPUs, a.MemoryMiB, opts.Runtime.Accel())
	envdURL := "http://" + net.JoinHostPort(slot.SlotIP.String(), strconv.Itoa(envdPort))
	vm, started, err := coldBoot(ctx, opts.Runtime, spec, envdURL, func(msg string) { p.phase("%s", msg) })
	if err != nil {
		return nil, err
	}
	defer opts.Runtime.Kill(context.WithoutCancel(ctx), vm)
	boot := time.Since(started)
	a.BootToHealth = boot.Round(time.Millisecond).String()
	p.phase("envd answered %s after QEMU started", a.BootToHealth)
	if err := initEnvd(ctx, envdURL, a.InitSecret); err != nil {
		return nil, withConsole(err, vm)
	}
	saveStart := time.Now()
	if err := opts.Runtime.Snapshot(ctx, vm, a.Snapshot); err != nil {
		return nil, err
	}
	a.SnapshotTime = time.Since(saveStart).Round(time.Microsecond).String()
	p.phase("snapshot saved in %s", a.SnapshotTime)
	if err := opts.Runtime.Kill(ctx, vm); err != nil {
		return nil, err
	}

	a.BuiltAt = time.Now().UTC()
	if err := writeArtifact(a); err != nil {
		return nil, err
	}
	return a, nil
}

// LoadArtifact reads a finished build's artifact.json in dir.
func LoadArtifact(dir string) (*Artifact, error) {
	b, err := os.ReadFile(filepath.Join(dir, artifactFile))
	if err != nil {
		return nil, fmt.Errorf("template artifact: %w", err)
	}
	var a Artifact
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("template artifact %s: %w", dir, err)
	}
	secret, err := os.ReadFile(filepath.Join(dir, initSecretFile))
	if err != nil {
		return nil, fmt.Errorf("template artifact: %w", err)
	}
	a.InitSecret = strings.TrimSpace(string(secret))
	if _, err := microvm.ReadManifest(a.Snapshot); err != nil {
		return nil, fmt.Errorf("template artifact %s: %w", dir, err)
	}
	return &a, nil
}

// envdPort is envd's port in every guest.
const envdPort = 49983

// waitHealth polls envd's /health until it answers 204, the VM exits or ctx
// ends. A cold boot under TCG takes seconds; a bound keeps a guest that never
// comes up from hanging the build.
func waitHealth(ctx context.Context, base string, exited <-chan struct{}) error {
	return waitHealthWithin(ctx, base, exited, 5*time.Minute)
}

func waitHealthWithin(ctx context.Context, base string, exited <-chan struct{}, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	client := newClient()
	var last error
	for {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		req, _ := http.NewRequestWithContext(rctx, http.MethodGet, base+"/health", nil)
		resp, err := client.Do(req)
		rcancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				return nil
			}
			return fmt.Errorf("envd /health answered %s, want 204", resp.Status)
		}
		last = err
		select {
		case <-exited:
			return errors.New("the template VM stopped before envd answered")
		case <-ctx.Done():
			return fmt.Errorf("envd did not answer /health: %w (last: %v)", ctx.Err(), last)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Cold boots under TCG now and then hang early in the guest (seen under load:
// the console stops after "PCI: Fatal: No config space access function
// found"); a boot normally answers in seconds. coldBoot gives each attempt
// bootAttemptLimit and tries bootAttempts times.
const (
	bootAttempts     = 3
	bootAttemptLimit = 2 * time.Minute
)

// coldBoot starts spec and waits for its envd's /health at url, booting again
// when a boot does not answer; it returns the VM and when its QEMU started.
// A Spec.Overlay is the attempt's own: removed before the next one.
func coldBoot(ctx context.Context, rt *microvm.Runtime, spec runtime.Spec, url string, say func(string)) (runtime.VM, time.Time, error) {
	var last error
	for attempt := 1; attempt <= bootAttempts; attempt++ {
		started := time.Now()
		vm, err := rt.Start(ctx, spec)
		if err != nil {
			return nil, started, err
		}
		err = waitHealthWithin(ctx, url, vm.Done(), bootAttemptLimit)
		if err == nil {
			return vm, started, nil
		}
		last = withConsole(err, vm)
		rt.Kill(context.WithoutCancel(ctx), vm)
		if spec.Overlay != "" {
			os.Remove(spec.Overlay)
		}
		if ctx.Err() != nil {
			break
		}
		if attempt < bootAttempts {
			say(fmt.Sprintf("the VM did not come up (attempt %d of %d), booting it again: %v", attempt, bootAttempts, err))
		}
	}
	return nil, time.Time{}, last
}

// initEnvd gives the template's envd its defaults: every sandbox restored
// from the snapshot starts with them, before the node's own /init.
func initEnvd(ctx context.Context, base, secret string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/init", strings.NewReader(`{"defaultUser":"user"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(envd.InitSecretHeader, secret)
	resp, err := newClient().Do(req)
	if err != nil {
		return fmt.Errorf("envd /init: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("envd /init answered %s: %s", resp.Status, body)
	}
	return nil
}

// newClient makes HTTP clients that leave no connection open: an open
// connection would be part of the snapshot, half-open in every clone.
func newClient() *http.Client {
	dialer := &net.Dialer{Timeout: 100 * time.Millisecond}
	return &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: dialer.DialContext}}
}

// withConsole adds the end of the VM's console to err.
func withConsole(err error, vm runtime.VM) error {
	v, ok := vm.(*microvm.VM)
	if !ok {
		return err
	}
	b, rerr := os.ReadFile(v.ConsoleLog())
	if rerr != nil {
		return err
	}
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return fmt.Errorf("%w; guest console ends:\n%s", err, b)
}

// linkOrCopy makes dst a hard link of src, or a sparse copy when they are on
// different file systems. The copy is made beside dst and renamed: dst never
// exists half-written (a build trusts a source disk that exists).
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if err == nil || !errors.Is(err, syscall.EXDEV) {
		return err
	}
	tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-copy")
	out, err := exec.Command("cp", "--sparse=always", "--reflink=auto", src, tmp).CombinedOutput()
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("copy %s to %s: %w: %s", src, dst, err, out)
	}
	return nil
}

// writeFileAtomic writes data next to p and renames it over p.
func writeFileAtomic(p string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", p, err)
	}
	return durable.Sync(filepath.Dir(p))
}
