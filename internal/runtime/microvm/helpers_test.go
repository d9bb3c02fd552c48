package microvm_test

// These tests run real VMs: Debian's cloud kernel under QEMU (TCG on hosts
// without vmx/svm), warren's initramfs with envd as init, a small ext4 root
// disk with busybox, and virtio-net on the tap of a network slot from
// internal/netns. They need root and the host packages requireHost names, and
// run in a plain `go test ./...` as root: a few seconds per cold boot under
// TCG, well under a second per restore. The kernel is cached in kernelCache
// between runs.
//
// Slots come from a netns.Pool, which holds a host-wide lock: each test opens
// its own pool and closes it at its end, so other packages' pools wait for
// one test, not for the whole binary.

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/guest"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
)

// kernelCache keeps the ~100 MB unpacked kernel between test runs.
const kernelCache = "/var/tmp/warren-test-cache"

const envdPort = 49983

// initSecret is the cold-booted test VMs' envd init secret.
const initSecret = "test-init-secret"

// installHint is the one command that provides everything requireHost checks.
const installHint = "apt-get install -y qemu-system-x86 qemu-utils busybox-static e2fsprogs gcc libc6-dev"

// workPrefix names each test binary's work directory: <tmp>/<workPrefix><pid>-*.
const workPrefix = "warren-microvm-test-"

var workDir string // removed by TestMain

func TestMain(m *testing.M) {
	reapLeftovers()
	dir, err := os.MkdirTemp("", workPrefix+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	workDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// reapLeftovers cleans up after earlier test binaries that died without
// their cleanups (a timeout panic).
func reapLeftovers() { microvmtest.ReapLeftovers(os.TempDir(), workPrefix) }

// requireHost stops the test unless it can boot VMs: root, and the tools.
func requireHost(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("boots VMs in network namespaces: run as root")
	}
	var missing []string
	for _, tool := range []string{microvm.Binary, "qemu-img", "mkfs.ext4", "apt-get", "dpkg-deb", "gcc"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if err := requireStatic("/bin/busybox"); err != nil {
		missing = append(missing, err.Error())
	}
	if len(missing) > 0 {
		t.Fatalf("missing %s; install with: %s", strings.Join(missing, ", "), installHint)
	}
}

// requireStatic checks that path is a statically linked executable: the root
// image holds no shared libraries.
func requireStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("static %s (%v)", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("static %s (it is dynamically linked: busybox-static)", path)
		}
	}
	return nil
}

// artifacts are built once per test binary and shared by every VM.
type artifacts struct {
	kernel    *guest.Kernel
	initramfs string
	rootImage string // never written: each VM has an overlay
}

var (
	buildOnce sync.Once
	built     *artifacts
	buildErr  error
)

func buildArtifacts(t testing.TB) *artifacts {
	t.Helper()
	requireHost(t)
	buildOnce.Do(func() { built, buildErr = doBuild(t) })
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func doBuild(t testing.TB) (*artifacts, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a := &artifacts{}
	start := time.Now()
	var progress bytes.Buffer
	var err error
	a.kernel, err = guest.FetchKernel(ctx, kernelCache, &progress)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel: %w\n%s", err, progress.String())
	}
	t.Logf("kernel %s (%s) in %s\n%s", a.kernel.Release, a.kernel.Image, time.Since(start).Round(time.Millisecond), progress.String())

	envdBin := filepath.Join(workDir, "envd")
	build := exec.CommandContext(ctx, "go", "build", "-o", envdBin, "github.com/warren-sh/warren/cmd/envd")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build envd: %w\n%s", err, out)
	}
	a.initramfs = filepath.Join(workDir, "initramfs.cpio")
	if err := guest.BuildInitramfs(a.kernel, envdBin, a.initramfs); err != nil {
		return nil, err
	}
	a.rootImage = filepath.Join(workDir, "root.ext4")
	if err := buildRootImage(ctx, a.rootImage); err != nil {
		return nil, err
	}
	return a, nil
}

// buildRootImage makes the smallest root envd runs on: busybox as /bin/sh,
// root and user (uid 1000) with a home; and /bin/isa-v2 and /bin/isa-v3,
// testdata/isa.c built for those x86-64 levels (isaOutput).
func buildRootImage(ctx context.Context, image string) error {
	root := filepath.Join(workDir, "rootfs")
	for _, dir := range []string{"bin", "etc", "root", "home/user", "dev", "proc", "sys", "tmp", "run"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chown(filepath.Join(root, "home/user"), 1000, 1000); err != nil {
		return err
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return err
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
		"etc/group":  "root:x:0:\ntty:x:5:\nuser:x:1000:\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), bb, 0o755); err != nil {
		return err
	}
	if err := os.Symlink("busybox", filepath.Join(root, "bin/sh")); err != nil {
		return err
	}
	for _, level := range []string{"v2", "v3"} {
		// Static: the root image holds no shared libraries.
		out, err := exec.CommandContext(ctx, "gcc", "-O2", "-static", "-march=x86-64-"+level,
			"-o", filepath.Join(root, "bin/isa-"+level), "testdata/isa.c").CombinedOutput()
		if err != nil {
			return fmt.Errorf("build testdata/isa.c for x86-64-%s: %w\n%s(install: %s)", level, err, out, installHint)
		}
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, image, "32M").CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w\n%s", err, out)
	}
	return nil
}

// newRuntime makes a Runtime whose VM states live in a directory of the test.
func newRuntime(t testing.TB) *microvm.Runtime {
	t.Helper()
	root, err := os.MkdirTemp(workDir, "vms-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	rt, err := microvm.New(microvm.Config{Root: root, Accel: "auto"})
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

// newPool opens a slot pool for the test and closes it at the test's end
// (after the test's VMs are killed: cleanups run last-in first-out).
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

// sandbox is one running test VM in its slot.
type sandbox struct {
	vm      runtime.VM
	slot    *netns.Slot
	rt      *microvm.Runtime
	started time.Time // before Start was called
	client  *http.Client
	base    string // envd's URL at the slot address
}

// start starts spec in a new slot; the test's cleanup kills the VM and
// releases the slot, and logs the guest console when the test failed.
func start(t testing.TB, rt *microvm.Runtime, pool *netns.Pool, spec runtime.Spec) *sandbox {
	t.Helper()
	sb, err := tryStart(t, rt, pool, spec)
	if err != nil {
		t.Fatal(err)
	}
	return sb
}

func tryStart(t testing.TB, rt *microvm.Runtime, pool *netns.Pool, spec runtime.Spec) (*sandbox, error) {
	t.Helper()
	slot, err := pool.Acquire(context.Background(), netns.Policy{})
	if err != nil {
		return nil, err
	}
	spec.Slot = slot
	sb := &sandbox{slot: slot, rt: rt, started: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sb.vm, err = rt.Start(ctx, spec)
	if err != nil {
		pool.Release(slot)
		return nil, err
	}
	t.Cleanup(func() {
		if t.Failed() {
			console, _ := os.ReadFile(sb.vm.(*microvm.VM).ConsoleLog())
			t.Logf("VM %s console:\n%s", spec.ID, console)
		}
		if err := rt.Kill(context.Background(), sb.vm); err != nil {
			t.Errorf("kill %s: %v", spec.ID, err)
		}
		if err := pool.Release(slot); err != nil {
			t.Errorf("release %s: %v", slot.Name, err)
		}
	})
	// A short connect timeout: a SYN sent before the guest runs is lost and
	// would be retried only after a second. Answers may take a while: under
	// TCG a restored guest translates every code path anew.
	dialer := &net.Dialer{Timeout: 50 * time.Millisecond}
	sb.client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: dialer.DialContext}}
	sb.base = "http://" + net.JoinHostPort(slot.SlotIP.String(), strconv.Itoa(envdPort))
	return sb, nil
}

// coldSpec is a cold boot of the test root image.
func coldSpec(a *artifacts, id string) runtime.Spec {
	return runtime.Spec{
		ID: id, CPUs: 1, MemoryMiB: 256,
		Kernel: a.kernel.Image, Initramfs: a.initramfs, RootDisk: a.rootImage,
		Hostname: "warren-test", InitSecret: initSecret,
	}
}

// waitHealthy polls envd's /health until it answers 204 and returns the time
// since Start was called.
func (sb *sandbox) waitHealthy(t testing.TB, timeout time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-sb.vm.Done():
			t.Fatalf("QEMU exited before envd answered")
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, sb.base+"/health", nil)
		resp, err := sb.client.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				return time.Since(sb.started)
			}
			t.Fatalf("GET /health: %s, want 204", resp.Status)
		}
		last = err
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("envd did not answer /health within %s: %v", timeout, last)
	return 0
}

// init posts body to envd's /init as the node does (with the init secret)
// and fails the test unless envd answers 204.
func (sb *sandbox) init(t testing.TB, body string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, sb.base+"/init", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(envd.InitSecretHeader, initSecret)
	resp, err := sb.client.Do(req)
	if err != nil {
		t.Fatalf("POST /init: %v", err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("POST /init %s: %s %s, want 204", body, resp.Status, raw)
	}
}

// run runs script with /bin/sh as user in the guest and returns its stdout;
// it fails the test unless the script exits 0.
func (sb *sandbox) run(t testing.TB, user, script string) string {
	t.Helper()
	client := processconnect.NewProcessClient(sb.client, sb.base, connect.WithProtoJSON())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", script}}})
	req.Header().Set("Authorization", envdtest.BasicAuth(user))
	stream, err := client.Start(ctx, req)
	if err != nil {
		t.Fatalf("Start %q: %v", script, err)
	}
	defer stream.Close()
	out, err := envdtest.Collect(stream)
	if err != nil || !out.OK() {
		t.Fatalf("%q as %s ended %v (%v); stderr %q", script, user, out.End, err, out.Stderr)
	}
	return out.Stdout
}

// entropyBody is an /init body with fresh entropy and the host's clock.
func entropyBody() string {
	b := make([]byte, 64)
	rand.Read(b)
	return fmt.Sprintf(`{"timestamp":%q,"entropy":%q}`, time.Now().UTC().Format(time.RFC3339Nano), b64(b))
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// processGone reports whether pid no longer runs QEMU (it exited, or the pid
// now belongs to something else).
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err != nil || !bytes.HasPrefix(b, []byte(microvm.Binary+"\x00"))
}
