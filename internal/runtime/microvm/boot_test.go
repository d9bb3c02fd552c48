package microvm

// These tests boot real VMs: Debian's cloud kernel under QEMU (TCG on hosts
// without vmx/svm), warren's initramfs with envd as init, an ext4 root disk
// with busybox, and virtio-net on a tap inside a network namespace of the
// test's own. They need root (namespaces, taps) and the host packages named
// in requireHost; they run in a plain `go test ./...` as root, a few seconds
// per boot under TCG. The kernel is cached in kernelCache between runs.

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/envd/guestinit"
	"github.com/warren-sh/warren/internal/guest"
)

// kernelCache keeps the ~100 MB unpacked kernel between test runs.
const kernelCache = "/var/tmp/warren-test-cache"

// The guest and host addresses exist only inside each test's namespace.
var (
	guestNet = netip.MustParsePrefix("10.11.0.2/30")
	hostAddr = netip.MustParseAddr("10.11.0.1")
)

const envdPort = 49983

// installHint is the one command that provides everything requireHost checks.
const installHint = "apt-get install -y qemu-system-x86 busybox-static e2fsprogs iproute2"

// requireHost stops the test unless it can boot VMs: root, and the tools.
func requireHost(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("boots a VM in a network namespace: run as root")
	}
	var missing []string
	for _, tool := range []string{Binary, "mkfs.ext4", "ip", "apt-get", "dpkg-deb"} {
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

// artifacts are built once per test binary and shared by every boot.
type artifacts struct {
	kernel    *guest.Kernel
	initramfs string
	rootImage string // pristine; each boot gets a copy
	tscKHz    int
	accel     Accel
}

var (
	buildOnce sync.Once
	built     *artifacts
	buildErr  error
	workDir   string // removed by TestMain
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "warren-microvm-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	workDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

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
	var why string
	a.accel, why = DetectAccel()
	if a.accel == TCG {
		t.Logf("using TCG: %s", why)
	}
	var err error
	if a.tscKHz, err = HostTSCkHz(); err != nil {
		return nil, err
	}
	start := time.Now()
	var progress bytes.Buffer
	a.kernel, err = guest.FetchKernel(ctx, kernelCache, &progress)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel: %w\n%s", err, progress.String())
	}
	t.Logf("kernel %s (%s) in %s\n%s", a.kernel.Release, a.kernel.Image, time.Since(start).Round(time.Millisecond), progress.String())

	envd := filepath.Join(workDir, "envd")
	build := exec.CommandContext(ctx, "go", "build", "-o", envd, "github.com/warren-sh/warren/cmd/envd")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build envd: %w\n%s", err, out)
	}
	a.initramfs = filepath.Join(workDir, "initramfs.cpio")
	if err := guest.BuildInitramfs(a.kernel, envd, a.initramfs); err != nil {
		return nil, err
	}
	a.rootImage = filepath.Join(workDir, "root.ext4")
	if err := buildRootImage(ctx, a.rootImage); err != nil {
		return nil, err
	}
	return a, nil
}

// buildRootImage makes the smallest root envd runs on: busybox as /bin/sh,
// root and user (uid 1000) with a home.
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
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, image, "32M").CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w\n%s", err, out)
	}
	return nil
}

// vm is one booted test VM.
type vm struct {
	ns      string
	cmd     *exec.Cmd
	started time.Time
	args    []string // QEMU's, without the binary
	serial  string
	exited  chan struct{} // closed when QEMU has exited
	client  *http.Client
}

// bootVM starts QEMU on a copy of rootImage (or on disk, when not empty) in a
// new network namespace. Cleanup kills QEMU and deletes the namespace.
func bootVM(t testing.TB, a *artifacts, disk string) *vm {
	t.Helper()
	dir := t.TempDir()
	if disk == "" {
		disk = filepath.Join(dir, "root.ext4")
		if err := copyFile(a.rootImage, disk); err != nil {
			t.Fatal(err)
		}
	}
	v := &vm{ns: "warren-test-vm-" + randHex(4), serial: filepath.Join(dir, "serial.log"), exited: make(chan struct{})}
	mustRun(t, "ip", "netns", "add", v.ns)
	t.Cleanup(func() { mustRun(t, "ip", "netns", "delete", v.ns) })
	const tap = "tap0"
	mustRun(t, "ip", "-n", v.ns, "tuntap", "add", "dev", tap, "mode", "tap")
	mustRun(t, "ip", "-n", v.ns, "addr", "add", netip.PrefixFrom(hostAddr, guestNet.Bits()).String(), "dev", tap)
	mustRun(t, "ip", "-n", v.ns, "link", "set", tap, "up")
	// A permanent neighbour entry saves the guest's first answer an ARP round
	// (up to 1 s under TCG).
	mustRun(t, "ip", "-n", v.ns, "neigh", "add", guestNet.Addr().String(), "lladdr", GuestMAC, "dev", tap, "nud", "permanent")

	m := Machine{
		Accel: a.accel, TSCkHz: a.tscKHz,
		Kernel: a.kernel.Image, Initramfs: a.initramfs,
		RootDisk: disk, RootFormat: "raw",
		Tap:       tap,
		Network:   guestinit.Network{Addr: guestNet, Gateway: hostAddr},
		Hostname:  "warren-test",
		QMPSocket: filepath.Join(dir, "qmp.sock"),
		SerialLog: v.serial,
	}
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	v.args = args
	qemuLog, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer qemuLog.Close()
	// ip netns exec execs QEMU in place: cmd's PID is QEMU's.
	v.cmd = exec.Command("ip", append([]string{"netns", "exec", v.ns, Binary}, args...)...)
	v.cmd.Stdout, v.cmd.Stderr = qemuLog, qemuLog
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.cmd.Wait(); close(v.exited) }()
	t.Cleanup(func() {
		v.cmd.Process.Kill()
		<-v.exited
		if t.Failed() {
			serial, _ := os.ReadFile(v.serial)
			qlog, _ := os.ReadFile(qemuLog.Name())
			t.Logf("%s %s\nguest console:\n%s\nqemu output:\n%s", Binary, shellQuote(v.args), serial, qlog)
		}
	})
	v.client = &http.Client{Transport: &http.Transport{DialContext: dialIn(v.ns), DisableKeepAlives: true}}
	return v
}

// waitHealthy polls envd's /health until it answers 204 and returns the time
// since QEMU started.
func (v *vm) waitHealthy(t testing.TB, timeout time.Duration) time.Duration {
	t.Helper()
	url := fmt.Sprintf("http://%s/health", net.JoinHostPort(guestNet.Addr().String(), fmt.Sprint(envdPort)))
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-v.exited:
			t.Fatalf("QEMU exited before envd answered (%v)", v.cmd.ProcessState)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := v.client.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				return time.Since(v.started)
			}
			t.Fatalf("GET /health: %s, want 204", resp.Status)
		}
		last = err
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("envd did not answer /health within %s: %v", timeout, last)
	return 0
}

func TestBootToHealth(t *testing.T) {
	a := buildArtifacts(t)
	v := bootVM(t, a, "")
	took := v.waitHealthy(t, 60*time.Second)
	t.Logf("%s %s", Binary, shellQuote(v.args))
	t.Logf("QEMU start → first /health 204: %s (%s)", took.Round(time.Millisecond), a.accel)
	base := "http://" + net.JoinHostPort(guestNet.Addr().String(), fmt.Sprint(envdPort))

	t.Run("metrics are the guest's", func(t *testing.T) {
		resp, err := v.client.Get(base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /metrics: %s %s, want 200", resp.Status, body)
		}
		var metrics map[string]any
		if err := json.Unmarshal(body, &metrics); err != nil {
			t.Fatalf("GET /metrics: %v in %s", err, body)
		}
		// The guest's memory, not the host's: envd runs in the VM.
		if total, ok := metrics["mem_total"].(float64); !ok || total <= 0 || total > 256<<20 {
			t.Errorf("/metrics mem_total = %v, want the guest's (0, 256 MiB]; body %s", metrics["mem_total"], body)
		}
	})

	t.Run("console has init's ready line", func(t *testing.T) {
		serial, _ := os.ReadFile(v.serial)
		if !bytes.Contains(serial, []byte("warren-init: ready at")) {
			t.Errorf("console lacks init's ready line:\n%s", serial)
		}
	})

	// What init set up, seen by a process envd starts in the guest.
	client := processconnect.NewProcessClient(v.client, base, connect.WithProtoJSON())
	for _, tc := range []struct {
		name, user, script, want string
	}{
		{"root is the ext4 disk", "root", `awk '$2 == "/" {print $1, $3}' /proc/mounts`, "/dev/vda ext4"},
		{"devpts, shm, run and tmp are mounted", "root",
			`awk '$2 ~ "^/(dev/pts|dev/shm|run|tmp)$" {print $2, $3}' /proc/mounts | sort | tr '\n' ' '`,
			"/dev/pts devpts /dev/shm tmpfs /run tmpfs /tmp tmpfs "},
		{"/tmp and /dev/shm are world-writable and sticky", "root", `stat -c %a /tmp /dev/shm | tr '\n' ' '`, "1777 1777 "},
		{"devpts gives ttys the tty group", "root", `awk '$2 == "/dev/pts" {print $4}' /proc/mounts | grep -o 'gid=5'`, "gid=5"},
		{"hostname from the kernel argument", "user", `hostname`, "warren-test"},
		{"eth0 has the address", "user", `ip -4 -o addr show dev eth0 | awk '{print $4}'`, guestNet.String()},
		{"default route via the host side", "user", `ip route | grep ^default`, "default via " + hostAddr.String() + " dev eth0 "},
		{"runs as user uid 1000", "user", `id -u`, "1000"},
		{"warren_* arguments do not leak into processes", "root", `env | grep -c ^warren_ || true`, "0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := runInGuest(t, client, tc.user, tc.script)
			if strings.TrimRight(got, "\n") != strings.TrimRight(tc.want, "\n") {
				t.Errorf("%s as %s printed %q, want %q", tc.script, tc.user, got, tc.want)
			}
		})
	}
}

// runInGuest runs script with /bin/sh as user and returns its stdout; it fails
// the test unless the script exits 0.
func runInGuest(t *testing.T, client processconnect.ProcessClient, user, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", script}}})
	req.Header().Set("Authorization", envdtest.BasicAuth(user))
	stream, err := client.Start(ctx, req)
	if err != nil {
		t.Fatalf("Start %q: %v", script, err)
	}
	defer stream.Close()
	var stdout, stderr bytes.Buffer
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			stdout.Write(d.GetStdout())
			stderr.Write(d.GetStderr())
		}
		if end := ev.GetEnd(); end != nil {
			if !end.GetExited() || end.GetExitCode() != 0 {
				t.Fatalf("%q as %s ended %v; stderr %q", script, user, end, stderr.String())
			}
			return stdout.String()
		}
	}
	t.Fatalf("%q as %s: stream ended without an end event: %v; stderr %q", script, user, stream.Err(), stderr.String())
	return ""
}

// TestInitFailurePowersOff: when init cannot finish (here the root disk is not
// ext4) it names the error on the console and the VM stops, instead of a
// kernel panic or a VM that never answers.
func TestInitFailurePowersOff(t *testing.T) {
	a := buildArtifacts(t)
	disk := filepath.Join(t.TempDir(), "blank.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	v := bootVM(t, a, disk)
	select {
	case <-v.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("QEMU still runs 60 s after boot with an unmountable root disk")
	}
	serial, _ := os.ReadFile(v.serial)
	for _, want := range []string{"warren-init: fatal: init: mount /dev/vda (ext4) on /newroot", "warren-init: powering off"} {
		if !bytes.Contains(serial, []byte(want)) {
			t.Errorf("console lacks %q:\n%s", want, serial)
		}
	}
	if bytes.Contains(serial, []byte("Kernel panic")) {
		t.Errorf("the kernel panicked instead of powering off:\n%s", serial)
	}
}

// BenchmarkBootToHealth reports the time from QEMU start to envd's first
// /health answer (ms-to-health), one fresh VM per iteration.
func BenchmarkBootToHealth(b *testing.B) {
	a := buildArtifacts(b)
	var took []time.Duration
	for b.Loop() {
		func() {
			tb := &iteration{TB: b}
			defer tb.cleanup()
			v := bootVM(tb, a, "")
			took = append(took, v.waitHealthy(tb, 60*time.Second))
		}()
	}
	slices.Sort(took)
	b.Logf("QEMU start → first /health 204, sorted: %v", took)
	b.ReportMetric(float64(took[len(took)/2].Milliseconds()), "ms-to-health(median)")
}

// iteration gives one benchmark iteration its own cleanups.
type iteration struct {
	testing.TB
	cleanups []func()
}

func (i *iteration) Cleanup(f func()) { i.cleanups = append(i.cleanups, f) }
func (i *iteration) TempDir() string {
	dir, err := os.MkdirTemp(workDir, "iter-")
	if err != nil {
		i.Fatal(err)
	}
	i.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
func (i *iteration) cleanup() {
	for _, f := range slices.Backward(i.cleanups) {
		f()
	}
}

// dialIn dials from inside the network namespace ns: the socket is created by
// a thread that has entered ns, and a socket stays in the namespace it was
// created in.
func dialIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			// The thread is never unlocked: it ends with this goroutine instead
			// of returning to Go's pool inside the wrong namespace.
			runtime.LockOSThread()
			fd, err := unix.Open("/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				ch <- result{err: fmt.Errorf("open netns %s: %w", ns, err)}
				return
			}
			defer unix.Close(fd)
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				ch <- result{err: fmt.Errorf("enter netns %s: %w", ns, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

func mustRun(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " ,=:") {
			a = "'" + a + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}
