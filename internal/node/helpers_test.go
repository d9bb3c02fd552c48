package node_test

// The node tests run real sandboxes: the base template (built once into
// cacheDir like the template tests do, then cached), restored under QEMU (TCG
// here) into real network slots, configured through envd's /init, and driven
// through envd's process service at the slot address. They need root.

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
	"github.com/warren-sh/warren/internal/template"
)

// cacheDir is the data directory shared with the guest, image, microvm and
// template tests (kernel, root image, base template), kept between runs.
const cacheDir = "/var/tmp/warren-test-cache"

// vmsPrefix names this binary's VM state roots in cacheDir:
// <vmsPrefix><pid>-*. The template tests use ".test-vms-"; the names differ so
// each package's reaper keeps to its own.
const vmsPrefix = ".node-test-vms-"

var (
	workDir  string // this binary's scratch directory
	envdBin  string // envd built for the tests
	vmsRoot  string // this binary's VM state roots live under it
	rootSeq  int    // numbers the roots
	rootSeqM sync.Mutex
)

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(crashChild())
	}
	code := func() int {
		if os.Geteuid() != 0 {
			return m.Run() // the tests skip
		}
		var err error
		if workDir, err = os.MkdirTemp("", "warren-node-test-"); err != nil {
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
		if vmsRoot, err = os.MkdirTemp(cacheDir, vmsPrefix+strconv.Itoa(os.Getpid())+"-"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(vmsRoot)
		return m.Run()
	}()
	os.Exit(code)
}

// reapLeftovers cleans up after earlier node test binaries that died without
// their cleanups.
func reapLeftovers() { microvmtest.ReapLeftovers(cacheDir, vmsPrefix) }

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("restores VMs in network namespaces: run as root")
	}
}

var (
	baseOnce sync.Once
	base     *template.Artifact
	baseErr  error
)

// baseArtifact makes (or finds) the base template once per test binary. Call
// it before a test opens its Manager: a build borrows the host's slot pool.
func baseArtifact(t testing.TB) *template.Artifact {
	t.Helper()
	requireRoot(t)
	baseOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		rt, err := microvm.New(microvm.Config{Root: filepath.Join(vmsRoot, "build")})
		if err != nil {
			baseErr = err
			return
		}
		pool, err := netns.NewPool(ctx, netns.Config{})
		if err != nil {
			baseErr = err
			return
		}
		defer pool.Close()
		var progress bytes.Buffer
		base, baseErr = template.EnsureBase(ctx, cacheDir, template.BaseOptions{Envd: envdBin, Runtime: rt, Slots: pool, Progress: &progress})
		t.Logf("EnsureBase:\n%s", progress.String())
	})
	if baseErr != nil {
		t.Fatal(baseErr)
	}
	return base
}

// newRoot names a VM state root of the test's own (not yet made).
func newRoot() string {
	rootSeqM.Lock()
	defer rootSeqM.Unlock()
	rootSeq++
	return filepath.Join(vmsRoot, strconv.Itoa(rootSeq))
}

// newRuntime makes a runtime whose VMs live in root.
func newRuntime(t testing.TB, root string) *microvm.Runtime {
	t.Helper()
	rt, err := microvm.New(microvm.Config{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

// newManager opens a Manager on a fresh runtime (unless cfg has one) and
// closes it when the test ends, checking that Close left no slot behind.
func newManager(t testing.TB, cfg node.Config) *node.Manager {
	t.Helper()
	baseArtifact(t)
	if cfg.Runtime == nil {
		cfg.Runtime = newRuntime(t, newRoot())
	}
	cfg.ID = cmp.Or(cfg.ID, "test-node")
	cfg.DataDir = cmp.Or(cfg.DataDir, cacheDir)
	// NewManager waits for the host's network slots while another pool (a
	// VM test of another package, a bench, a warren) holds them.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	m, err := node.NewManager(ctx, cfg)
	if err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		checkNoSlots(t)
	})
	return m
}

// spec is a sandbox of the base template with a token of its own.
func spec(id string) node.SandboxSpec {
	return node.SandboxSpec{
		ID: id, TemplateID: "base", BuildID: base.BuildID, Artifact: base.Dir,
		CPUCount: base.CPUs, MemoryMB: base.MemoryMiB,
		AccessToken: "token-" + id, EnvVars: map[string]string{"SANDBOX_NAME": id},
	}
}

func create(t testing.TB, m *node.Manager, s node.SandboxSpec) *node.SandboxInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	info, err := m.Create(ctx, s)
	if err != nil {
		t.Fatalf("Create %s: %v", s.ID, err)
	}
	t.Logf("Create %s: %s at %s", s.ID, time.Since(start).Round(time.Millisecond), info.Host)
	return info
}

// result is how a command in a sandbox ended.
type result struct {
	out      string
	exitCode int32
	exited   bool
	status   string
}

// exec runs script with bash as the sandbox's default user through envd's
// process service at the sandbox's slot address.
func execIn(ctx context.Context, info *node.SandboxInfo, token, script string) (result, error) {
	return execVia(ctx, &http.Transport{DisableKeepAlives: true}, info, token, script)
}

// execVia is execIn over transport t.
func execVia(ctx context.Context, t http.RoundTripper, info *node.SandboxInfo, token, script string) (result, error) {
	client := &http.Client{Transport: t}
	proc := processconnect.NewProcessClient(client, "http://"+net.JoinHostPort(info.Host, "49983"), connect.WithProtoJSON())
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}})
	req.Header().Set("X-Access-Token", token)
	stream, err := proc.Start(ctx, req)
	if err != nil {
		return result{}, err
	}
	defer stream.Close()
	// To the stream's end, so that a kept-alive connection stays open.
	out, err := envdtest.Collect(stream)
	if err != nil {
		return result{out: out.Combined}, err
	}
	return result{out: out.Combined, exitCode: out.End.GetExitCode(), exited: out.End.GetExited(), status: out.End.GetStatus()}, nil
}

// run runs script in the sandbox; it must exit 0 within a minute.
func run(t testing.TB, info *node.SandboxInfo, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := execIn(ctx, info, "token-"+info.ID, script)
	if err != nil {
		t.Fatalf("%s: %q: %v", info.ID, script, err)
	}
	if !r.exited || r.exitCode != 0 {
		t.Fatalf("%s: %q ended with %d (%s): %s", info.ID, script, r.exitCode, r.status, r.out)
	}
	return r.out
}

// agentConnections runs a command in the sandbox over the node's own
// connections into its envd (Manager.AgentTransport, as the proxy forwards
// agent traffic) and reports whether the command went over a connection
// opened before it, and how many TCP connections envd then had in the guest.
func agentConnections(t testing.TB, m *node.Manager, info *node.SandboxInfo) (reused bool, conns int) {
	t.Helper()
	tr := m.AgentTransport(info.ID)
	if tr == nil {
		t.Fatalf("AgentTransport(%s) = nil for a running sandbox", info.ID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first := true
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(c httptrace.GotConnInfo) {
		if first {
			reused, first = c.Reused, false
		}
	}})
	// Established (state 01) connections to local port 49983 (0xC33F); envd
	// listens on a dual-stack socket, so IPv4 peers show in tcp6.
	const count = `cat /proc/net/tcp /proc/net/tcp6 | awk '$2 ~ /:C33F$/ && $4 == "01"' | wc -l`
	r, err := execVia(ctx, tr, info, "token-"+info.ID, count)
	if err != nil || !r.exited || r.exitCode != 0 {
		t.Fatalf("%s: count envd's connections over AgentTransport: %v (%s: %s)", info.ID, err, r.status, r.out)
	}
	conns, err = strconv.Atoi(strings.TrimSpace(r.out))
	if err != nil {
		t.Fatalf("%s: count envd's connections: %q", info.ID, r.out)
	}
	return reused, conns
}

// checkAgentConnection fails unless the sandbox's whole life so far (its
// start, /init, and the command agentConnections runs) used one connection
// into its envd, opened before that command.
func checkAgentConnection(t testing.TB, m *node.Manager, info *node.SandboxInfo) {
	t.Helper()
	reused, conns := agentConnections(t, m, info)
	if !reused || conns != 1 {
		t.Errorf("%s: a command over AgentTransport reused a connection: %v; envd had %d connections, want 1 (the node's, open since the start)", info.ID, reused, conns)
	}
}

// hostAgentConns lists the host's established TCP connections to port 49983
// of any guest, as "local->remote" (/proc/net/tcp's hex addresses), each with
// the guest's IP.
func hostAgentConns(t testing.TB) map[string]netip.Addr {
	t.Helper()
	// This thread's view: /proc/net is the main thread's, which a slot's
	// namespace creation may have left in that namespace (netns.create).
	goruntime.LockOSThread()
	defer goruntime.UnlockOSThread()
	b, err := os.ReadFile("/proc/thread-self/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]netip.Addr{}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "01" || !strings.HasSuffix(f[2], ":C33F") {
			continue
		}
		ip, err := strconv.ParseUint(strings.TrimSuffix(f[2], ":C33F"), 16, 32)
		if err != nil {
			t.Fatalf("/proc/net/tcp: %q", line)
		}
		// The address is the kernel's u32 in host (little-endian) order.
		out[f[1]+"->"+f[2]] = netip.AddrFrom4([4]byte{byte(ip), byte(ip >> 8), byte(ip >> 16), byte(ip >> 24)})
	}
	return out
}

// checkNoSlots fails unless no slot namespace, slot veth or warren nftables
// table is left on the host.
func checkNoSlots(t testing.TB) {
	t.Helper()
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if name := e.Name(); strings.HasPrefix(name, "warren-") && isDigits(strings.TrimPrefix(name, "warren-")) {
			t.Errorf("netns %s is left", name)
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if name := l.Attrs().Name; strings.HasPrefix(name, "wv") && isDigits(name[2:]) {
			t.Errorf("link %s is left", name)
		}
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if strings.HasPrefix(tb.Name, "warren") {
			t.Errorf("nftables table %s is left", tb.Name)
		}
	}
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// qemuOf returns the pids of the QEMUs whose command line names dir.
func qemuOf(dir string) []int {
	var pids []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && bytes.HasPrefix(b, []byte(microvm.Binary+"\x00")) && bytes.Contains(b, []byte(dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// stateDirs lists the VM state directories under a runtime root.
func stateDirs(root string) []string {
	entries, _ := os.ReadDir(root)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// Test networks: a namespace the test owns (warren-test-*, never
// warren-<digits>, so the slot pool leaves it alone).

// inNetns runs fn on a locked thread inside ns; sockets fn opens stay there.
func inNetns(ns vnetns.NsHandle, fn func() error) error {
	if ns == vnetns.None() {
		return fn()
	}
	goruntime.LockOSThread()
	defer goruntime.UnlockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	if err := vnetns.Set(ns); err != nil {
		return err
	}
	ferr := fn()
	if err := vnetns.Set(orig); err != nil {
		// The thread is stuck in ns: keep it locked so it dies with the goroutine.
		goruntime.LockOSThread()
		return errors.Join(ferr, err)
	}
	return ferr
}

// newTestNetns creates a named namespace that is deleted when the test ends.
func newTestNetns(t testing.TB, role string) vnetns.NsHandle {
	t.Helper()
	name := fmt.Sprintf("warren-test-%s-%06x", role, rand.Uint32()&0xffffff)
	ns, err := newNamedNetns(name)
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := vnetns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return ns
}

// newNamedNetns creates a named namespace without leaving the calling
// goroutine's thread in it: vnetns.NewNamed moves the thread into the new
// namespace, so it runs on a locked thread that moves back.
func newNamedNetns(name string) (vnetns.NsHandle, error) {
	goruntime.LockOSThread()
	defer goruntime.UnlockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		return vnetns.None(), err
	}
	defer orig.Close()
	ns, err := vnetns.NewNamed(name)
	if err != nil {
		return vnetns.None(), err
	}
	if err := vnetns.Set(orig); err != nil {
		goruntime.LockOSThread() // stuck in the new namespace: the thread dies with the goroutine
		ns.Close()
		vnetns.DeleteNamed(name)
		return vnetns.None(), err
	}
	return ns, nil
}

// Addresses of the fake internet, from TEST-NET-2 (RFC 5737), as in the netns tests.
var (
	internetHostSide = netip.MustParsePrefix("198.51.100.1/30")
	internetServer   = netip.MustParsePrefix("198.51.100.2/30")
)

// newFakeInternet makes a namespace standing in for the world outside the
// host: 198.51.100.2, routed by the host over a veth, serves HTTP on port 80
// ("internet"). Slot egress is masqueraded to the host's veth address, so the
// namespace needs no route back.
func newFakeInternet(t testing.TB) string {
	t.Helper()
	ns := newTestNetns(t, "inet")
	hostVeth := fmt.Sprintf("wtn%06x", rand.Uint32()&0xffffff) // not wv*: warren's host rules must not apply
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostVeth}, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("create fake internet veth: %v", err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostVeth); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("delete %s: %v", hostVeth, err)
			}
		}
	})
	configure := func(h *netlink.Handle, name string, addr netip.Prefix) {
		t.Helper()
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatalf("find %s: %v", name, err)
		}
		if addr.IsValid() {
			a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}
			if err := h.AddrAdd(l, a); err != nil {
				t.Fatalf("address %s on %s: %v", addr, name, err)
			}
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", name, err)
		}
	}
	configure(&netlink.Handle{}, hostVeth, internetHostSide)
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	configure(h, "eth0", internetServer)
	configure(h, "lo", netip.Prefix{})
	serveHTTP(t, listenIn(t, ns, "0.0.0.0:80"), "internet")
	return "http://" + internetServer.Addr().String()
}

// listenIn opens a TCP listener inside ns; it is closed when the test ends.
func listenIn(t testing.TB, ns vnetns.NsHandle, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := inNetns(ns, func() (err error) {
		l, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	return l
}

// serveHTTP answers every request on l with body until the test ends.
func serveHTTP(t testing.TB, l net.Listener, body string) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, body) })}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Close(); <-done })
}
