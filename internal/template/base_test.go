package template_test

// These tests build the real base template: Debian's cloud kernel, the Debian
// root image (internal/image; minutes the first time, then cached with the
// kernel in cacheDir), a cold boot under QEMU (TCG here) in a network slot and
// a snapshot. The build happens once per cache: later runs find it, unless
// envd changed. They need root and the host tools of internal/image and
// internal/runtime/microvm.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/fslock"
	"github.com/warren-sh/warren/internal/image"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
	"github.com/warren-sh/warren/internal/template"
)

// cacheDir is the data directory the tests build in, shared with the guest,
// image and microvm tests (kernel, root image) and kept between runs.
const cacheDir = "/var/tmp/warren-test-cache"

var (
	workDir string           // this binary's scratch directory
	envdBin string           // envd built for the tests
	rt      *microvm.Runtime // VM state lives in cacheDir (same file system as the snapshots)
	used    sync.Map         // build IDs this run used: kept
)

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() != 0 {
			return m.Run() // the tests skip
		}
		var err error
		if workDir, err = os.MkdirTemp("", "warren-template-test-"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(workDir)
		envdBin = filepath.Join(workDir, "envd")
		build := exec.Command("go", "build", "-o", envdBin, "github.com/warren-sh/warren/cmd/envd")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build envd: %v\n%s", err, out)
			return 1
		}
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		reapLeftovers()
		root, err := os.MkdirTemp(cacheDir, vmsPrefix+strconv.Itoa(os.Getpid())+"-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(root)
		if rt, err = microvm.New(microvm.Config{Root: root}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		code := m.Run()
		pruneBuilds()
		return code
	}()
	os.Exit(code)
}

// vmsPrefix names each test binary's VM state root in cacheDir: <vmsPrefix><pid>-*.
const vmsPrefix = ".test-vms-"

// reapLeftovers cleans up after earlier test binaries that died without
// their cleanups.
func reapLeftovers() { microvmtest.ReapLeftovers(cacheDir, vmsPrefix) }

// pruneBuilds removes the cache's base builds that this run did not use and
// that nothing took for two hours: every envd change makes a new build of a
// few hundred MB. EnsureBase sets a build directory's time whenever it hands
// the build out, so a build that a test binary of another checkout is making
// or using (each runs well under two hours) stays.
func pruneBuilds() {
	dirs, _ := filepath.Glob(filepath.Join(cacheDir, "templates", "base", "*"))
	for _, d := range dirs {
		id := filepath.Base(d)
		if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(id) {
			continue
		}
		if _, ok := used.Load(id); ok {
			continue
		}
		if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 2*time.Hour {
			os.RemoveAll(d)
		}
	}
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("builds a root image and boots VMs in network namespaces: run as root")
	}
}

// newPool opens a slot pool for one test (it holds a host-wide lock).
func newPool(t testing.TB) *netns.Pool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	p, err := netns.NewPool(ctx, netns.Config{})
	if err != nil {
		t.Fatalf("netns.NewPool: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("close slot pool: %v", err)
		}
	})
	return p
}

var (
	baseOnce sync.Once
	base     *template.Artifact
	baseErr  error
)

// ensureBase makes (or finds) the base template once per test binary.
func ensureBase(t testing.TB, pool *netns.Pool) *template.Artifact {
	t.Helper()
	requireRoot(t)
	baseOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		var progress bytes.Buffer
		base, baseErr = template.EnsureBase(ctx, cacheDir, template.BaseOptions{Envd: envdBin, Runtime: rt, Slots: pool, Progress: &progress})
		t.Logf("EnsureBase progress:\n%s", progress.String())
		if base != nil {
			used.Store(base.BuildID, true)
		}
	})
	if baseErr != nil {
		t.Fatal(baseErr)
	}
	return base
}

func TestEnsureBase(t *testing.T) {
	pool := newPool(t)
	a := ensureBase(t, pool)
	t.Logf("base build %s in %s: boot → /health %s, snapshot %s", a.BuildID, a.Dir, a.BootToHealth, a.SnapshotTime)

	t.Run("layout", func(t *testing.T) {
		for _, f := range []struct {
			name string
			mode os.FileMode // 0: any
		}{
			{"artifact.json", 0}, {"kernel", 0}, {"initramfs.cpio", 0}, {"rootfs.ext4", 0},
			{"init-secret", 0o600}, {"snapshot/mem", 0}, {"snapshot/state", 0},
			{"snapshot/rootfs.qcow2", 0}, {"snapshot/manifest.json", 0},
		} {
			fi, err := os.Stat(filepath.Join(a.Dir, f.name))
			if err != nil {
				t.Errorf("artifact lacks %s: %v", f.name, err)
				continue
			}
			if f.mode != 0 && fi.Mode().Perm() != f.mode {
				t.Errorf("%s has mode %s, want %s", f.name, fi.Mode().Perm(), f.mode)
			}
		}
		if a.Dir != filepath.Join(cacheDir, "templates", "base", a.BuildID) {
			t.Errorf("artifact in %s, want templates/base/<build id> of the data dir", a.Dir)
		}
		if a.CPUs != template.DefaultBaseCPUs || a.MemoryMiB != template.DefaultBaseMemoryMiB || a.InitSecret == "" {
			t.Errorf("artifact: %d CPUs, %d MiB, init secret %q; want the defaults and a secret", a.CPUs, a.MemoryMiB, a.InitSecret)
		}
		m, err := microvm.ReadManifest(a.Snapshot)
		if err != nil {
			t.Fatal(err)
		}
		if m.Hardware.RootDisk.Path != a.RootDisk || m.Hardware.Kernel.Path != a.Kernel || m.Hardware.MemoryMiB != a.MemoryMiB {
			t.Errorf("snapshot hardware %+v does not name the artifact's files and size", m.Hardware)
		}
	})

	t.Run("the root image is the base image's file, pinned", func(t *testing.T) {
		img, err := image.ReadManifest(filepath.Join(cacheDir, "templates", "base"))
		if err != nil {
			t.Fatal(err)
		}
		if a.Inputs.Rootfs.EnvdSHA256 != img.EnvdSHA256 || a.Inputs.EnvdSHA256 != img.EnvdSHA256 {
			t.Errorf("artifact envd %s (root image's %s), cached image's %s", a.Inputs.EnvdSHA256, a.Inputs.Rootfs.EnvdSHA256, img.EnvdSHA256)
		}
		ours, err1 := os.Stat(a.RootDisk)
		theirs, err2 := os.Stat(filepath.Join(cacheDir, "templates", "base", "rootfs.ext4"))
		if err1 != nil || err2 != nil || !os.SameFile(ours, theirs) {
			t.Logf("rootfs.ext4 is a copy, not a link of the image (%v, %v)", err1, err2)
		}
	})

	t.Run("a second call returns the build at once", func(t *testing.T) {
		var progress bytes.Buffer
		start := time.Now()
		// It records the build under the base builds' lock, which keeps
		// collections of template storage away until the store lists it.
		registered := false
		register := func(_ context.Context, got *template.Artifact) error {
			held, err := fslock.Held(filepath.Join(cacheDir, "templates", "base", ".artifact.lock"))
			if !held || err != nil {
				t.Errorf("Register ran without the base builds' lock held (%v)", err)
			}
			registered = got.BuildID == a.BuildID
			return nil
		}
		again, err := template.EnsureBase(t.Context(), cacheDir, template.BaseOptions{
			Envd: envdBin, Runtime: rt, Slots: pool, Progress: &progress, Register: register,
		})
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if !registered {
			t.Error("Register was not called with the build")
		}
		t.Logf("cached EnsureBase: %s\n%s", took.Round(time.Millisecond), progress.String())
		if again.BuildID != a.BuildID || again.InitSecret != a.InitSecret {
			t.Errorf("second call: build %s, want %s", again.BuildID, a.BuildID)
		}
		if took > 5*time.Second || strings.Contains(progress.String(), "booting") {
			t.Errorf("second call took %s and printed\n%s\nwant the cached build without a boot", took, progress.String())
		}
	})
}

// TestBaseRebuildsOnChange: a different input (here the VM size) is a new
// build beside the old one, which stays for the sandboxes that run from it.
func TestBaseRebuildsOnChange(t *testing.T) {
	pool := newPool(t)
	a := ensureBase(t, pool)
	var progress bytes.Buffer
	b, err := template.EnsureBase(t.Context(), cacheDir, template.BaseOptions{Envd: envdBin, Runtime: rt, Slots: pool, MemoryMiB: 384, Progress: &progress})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(b.Dir) })
	t.Logf("rebuild with 384 MiB:\n%s", progress.String())
	if b.BuildID == a.BuildID || b.MemoryMiB != 384 || !strings.Contains(progress.String(), "booting") {
		t.Errorf("384 MiB build %s (%d MiB), the default's %s: want a new build", b.BuildID, b.MemoryMiB, a.BuildID)
	}
	if _, err := template.LoadArtifact(a.Dir); err != nil {
		t.Errorf("the old build is gone: %v", err)
	}
}

// TestBaseInputsBuildID: every input names a different build.
func TestBaseInputsBuildID(t *testing.T) {
	in := template.BaseInputs{Recipe: 1, EnvdSHA256: "aa", Kernel: "linux-image-6.1.0-56-cloud-amd64 6.1.192-2",
		Rootfs: image.Manifest{Suite: "bookworm", EnvdSHA256: "aa", SizeBytes: 1 << 30}, QEMU: "7.2.22", Accel: microvm.TCG, CPUs: 2, MemoryMiB: 512}
	if in.BuildID() != in.BuildID() || !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(in.BuildID()) {
		t.Fatalf("BuildID %q is not 16 stable hex digits", in.BuildID())
	}
	for name, change := range map[string]func(*template.BaseInputs){
		"recipe":        func(i *template.BaseInputs) { i.Recipe++ },
		"envd":          func(i *template.BaseInputs) { i.EnvdSHA256 = "bb" },
		"kernel":        func(i *template.BaseInputs) { i.Kernel = "linux-image-6.1.0-57-cloud-amd64 6.1.193-1" },
		"root image":    func(i *template.BaseInputs) { i.Rootfs.SizeBytes++ },
		"QEMU":          func(i *template.BaseInputs) { i.QEMU = "8.0" },
		"accel":         func(i *template.BaseInputs) { i.Accel = microvm.KVM },
		"CPU count":     func(i *template.BaseInputs) { i.CPUs = 1 },
		"memory size":   func(i *template.BaseInputs) { i.MemoryMiB = 1024 },
		"transfer disk": func(i *template.BaseInputs) { i.TransferDisk = 2 << 30 },
	} {
		changed := in
		change(&changed)
		if changed.BuildID() == in.BuildID() {
			t.Errorf("a different %s keeps build ID %s", name, in.BuildID())
		}
	}
}

// TestBaseClone restores a sandbox from the base template as the node will:
// a slot, the artifact's spec, /init with a token, clock and entropy.
func TestBaseClone(t *testing.T) {
	pool := newPool(t)
	a := ensureBase(t, pool)
	slot, err := pool.Acquire(t.Context(), netns.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Release(slot) })
	started := time.Now()
	vm, err := rt.Start(t.Context(), a.Spec("base-clone", slot))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := rt.Kill(context.Background(), vm); err != nil {
			t.Errorf("kill: %v", err)
		}
	})
	dialer := &net.Dialer{Timeout: 50 * time.Millisecond}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: dialer.DialContext}, Timeout: 10 * time.Second}
	url := "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983")
	for {
		resp, err := client.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				break
			}
		}
		if time.Since(started) > 30*time.Second {
			t.Fatalf("the clone's envd did not answer /health in 30 s: %v", err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Logf("base clone: Start → first /health 204 in %s", time.Since(started).Round(time.Millisecond))

	entropy := make([]byte, 64)
	rand.Read(entropy)
	body := fmt.Sprintf(`{"accessToken":"clone-token","timestamp":%q,"entropy":%q,"envVars":{"SANDBOX_VAR":"set"}}`,
		time.Now().UTC().Format(time.RFC3339Nano), base64.StdEncoding.EncodeToString(entropy))
	req, _ := http.NewRequest(http.MethodPost, url+"/init", strings.NewReader(body))
	req.Header.Set(envd.InitSecretHeader, a.InitSecret)
	resp, err := client.Do(req)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("/init: %v %v", resp, err)
	}
	resp.Body.Close()

	proc := processconnect.NewProcessClient(client, url, connect.WithProtoJSON())
	for _, tc := range []struct{ name, script, want string }{
		{"runs as the template's default user", "whoami", "user"},
		{"in the Debian base", ". /etc/os-release && echo $VERSION_CODENAME", image.DebianSuite},
		{"with the base's tools", "python3 -c 'print(6*7)' && command -v curl git node", "42\n/usr/bin/curl\n/usr/bin/git\n/usr/bin/node"},
		{"answering as e2b.local", "hostname", "e2b.local"},
		{"with the node's env vars", "echo $SANDBOX_VAR", "set"},
		{"sudo works", "sudo -n id -u", "0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := run(t, proc, "clone-token", tc.script)
			if got := strings.TrimSpace(out); !strings.HasPrefix(got, tc.want) {
				t.Errorf("%q printed %q, want %q", tc.script, got, tc.want)
			}
		})
	}
	t.Run("and the host's clock", func(t *testing.T) {
		before := time.Now().Unix()
		guest, err := strconv.ParseInt(strings.TrimSpace(run(t, proc, "clone-token", "date +%s")), 10, 64)
		after := time.Now().Unix()
		if err != nil || guest < before-1 || guest > after+1 {
			t.Errorf("guest clock %d (%v), host %d..%d", guest, err, before, after)
		}
	})
	st, err := rt.Stats(t.Context(), vm)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("base clone: RSS %d MiB, PSS %d MiB, CPU %s", st.RSS>>20, st.PSS>>20, st.CPUTime)
	if err := syscall.Kill(vm.Pid(), 0); err != nil {
		t.Errorf("QEMU pid %d: %v", vm.Pid(), err)
	}
}

// run runs script with bash as the sandbox's default user (no Basic auth) and
// returns its output; the script must exit 0.
func run(t *testing.T, client processconnect.ProcessClient, token, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", script}}})
	req.Header().Set("X-Access-Token", token)
	stream, err := client.Start(ctx, req)
	if err != nil {
		t.Fatalf("Start %q: %v", script, err)
	}
	defer stream.Close()
	out, err := envdtest.Collect(stream)
	if err != nil || !out.OK() {
		t.Fatalf("%q ended %v (%v): %s", script, out.End, err, out.Combined)
	}
	return out.Combined
}
