package node_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// TestParallelSandboxesAreSeparate: five sandboxes created at once each run
// commands at their own address, with their own env vars, and see only their
// own files and processes.
func TestParallelSandboxesAreSeparate(t *testing.T) {
	m := newManager(t, node.Config{})
	const n = 5
	infos := make([]*node.SandboxInfo, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			info, err := m.Create(ctx, spec(fmt.Sprintf("par-%d", i)))
			if err != nil {
				t.Errorf("Create par-%d: %v", i, err)
				return
			}
			infos[i] = info
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d sandboxes created in parallel in %s", n, time.Since(start).Round(time.Millisecond))

	hosts := map[string]bool{}
	for _, info := range infos {
		if hosts[info.Host] {
			t.Fatalf("two sandboxes at %s", info.Host)
		}
		hosts[info.Host] = true
		if info.EnvdVersion == "" || info.StartedAt.IsZero() || info.TemplateID != "base" {
			t.Errorf("%s: info %+v lacks envd version, start time or template", info.ID, info)
		}
	}
	listed, err := m.List(t.Context())
	if err != nil || len(listed) != n {
		t.Fatalf("List: %d sandboxes, %v; want %d", len(listed), err, n)
	}

	for _, info := range infos {
		out := run(t, info, fmt.Sprintf(`echo "$SANDBOX_NAME" > /tmp/marker-%[1]s
setsid bash -c 'exec -a marker-%[1]s sleep 600' </dev/null >/dev/null 2>&1 &
echo "$SANDBOX_NAME"`, info.ID))
		if got := strings.TrimSpace(out); got != info.ID {
			t.Errorf("%s: SANDBOX_NAME is %q, want its own", info.ID, got)
		}
	}
	for _, info := range infos {
		out := run(t, info, `ls /tmp | grep '^marker-'; ps -eo args | grep -o '^marker-[^ ]*'; true`)
		want := fmt.Sprintf("marker-%[1]s\nmarker-%[1]s", info.ID)
		if got := strings.TrimSpace(out); got != want {
			t.Errorf("%s sees marker files and processes\n%s\nwant only its own:\n%s", info.ID, got, want)
		}
	}
}

// TestNetworkIsolation: a sandbox reaches neither the host's services nor
// another sandbox; it reaches the internet only with AllowInternet. (Another
// sandbox's guest address is every guest's own, so the other sandbox is
// reachable, if at all, only at its slot address.)
func TestNetworkIsolation(t *testing.T) {
	m := newManager(t, node.Config{})
	internet := newFakeInternet(t)
	withNet := spec("iso-a")
	withNet.AllowInternet = true
	a := create(t, m, withNet)
	b := create(t, m, spec("iso-b"))

	// Host services: on the host side of each slot's veth (the slot's
	// gateway; the slot address minus one) and on the host's loopback.
	serve := func(addr, body string) string {
		l, err := net.Listen("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		serveHTTP(t, l, body)
		return "http://" + l.Addr().String()
	}
	hostOf := func(info *node.SandboxInfo) string {
		return netip.MustParseAddr(info.Host).Prev().String()
	}
	hostVethA := serve(hostOf(a)+":0", "host veth of a")
	hostVethB := serve(hostOf(b)+":0", "host veth of b")
	hostLoopback := serve("127.0.0.1:0", "host loopback")
	for _, u := range []string{hostVethA, hostVethB, hostLoopback} {
		resp, err := http.Get(u) // control: each service answers the host
		if err != nil {
			t.Fatalf("control: host → %s: %v", u, err)
		}
		resp.Body.Close()
	}

	// probe fetches every URL from inside the sandbox at once, each bounded
	// by curl --max-time 2, and returns curl's exit code and output per name.
	probe := func(info *node.SandboxInfo, urls map[string]string) map[string]string {
		var script strings.Builder
		script.WriteString(`probe() { out=$(curl -sS --max-time 2 "$2" 2>&1); echo "$1 $? $out"; }` + "\n")
		for name, u := range urls {
			fmt.Fprintf(&script, "probe %s %q &\n", name, u)
		}
		script.WriteString("wait\n")
		got := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(run(t, info, script.String())), "\n") {
			name, rest, _ := strings.Cut(line, " ")
			got[name] = rest
		}
		return got
	}
	envdOf := func(info *node.SandboxInfo) string {
		return "http://" + net.JoinHostPort(info.Host, "49983") + "/health"
	}

	fromA := probe(a, map[string]string{
		"internet":        internet,
		"own-host-veth":   hostVethA,
		"other-host-veth": hostVethB,
		"host-loopback":   hostLoopback, // in the guest 127.0.0.1 is its own loopback: the host's must not show through
		"other-slot-envd": envdOf(b),
	})
	fromB := probe(b, map[string]string{
		"internet":        internet,
		"other-slot-envd": envdOf(a),
		"own-host-veth":   hostVethB,
	})
	if got := fromA["internet"]; got != "0 internet" {
		t.Fatalf("control: a sandbox with AllowInternet fetched the fake internet: %q, want exit 0 and %q", got, "internet")
	}
	for _, c := range []struct {
		from, name string
		got        string
	}{
		{"a", "own-host-veth", fromA["own-host-veth"]},
		{"a", "other-host-veth", fromA["other-host-veth"]},
		{"a", "host-loopback", fromA["host-loopback"]},
		{"a", "other-slot-envd", fromA["other-slot-envd"]},
		{"b (no internet)", "internet", fromB["internet"]},
		{"b (no internet)", "other-slot-envd", fromB["other-slot-envd"]},
		{"b (no internet)", "own-host-veth", fromB["own-host-veth"]},
	} {
		if c.got == "" || strings.HasPrefix(c.got, "0 ") {
			t.Errorf("sandbox %s → %s: %q; want curl to fail", c.from, c.name, c.got)
		}
	}
	t.Logf("from a: %q", fromA)
	t.Logf("from b: %q", fromB)
}

// TestResourceContainment: a sandbox that allocates past its memory or
// spins its CPUs hurts only itself.
func TestResourceContainment(t *testing.T) {
	m := newManager(t, node.Config{})
	hog := create(t, m, spec("hog"))
	other := create(t, m, spec("other"))

	t.Run("memory", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		// tail keeps its whole input (one endless line): 2 GiB in a 512 MiB VM.
		r, err := execIn(ctx, hog, "token-hog", "set -o pipefail; head -c 2G /dev/zero | tail >/dev/null")
		t.Logf("allocating 2 GiB: %s, %+v, %v", time.Since(start).Round(time.Millisecond), r, err)
		if err == nil && r.exited && r.exitCode == 0 {
			t.Fatalf("allocating 2 GiB in a %d MiB VM succeeded: %q", base.MemoryMiB, r.out)
		}
		if err == nil && r.exitCode != 137 {
			t.Errorf("the allocating pipeline ended with %d (%s), want 137: tail killed by SIGKILL", r.exitCode, r.status)
		}
		if got := strings.TrimSpace(run(t, other, "echo alive")); got != "alive" {
			t.Errorf("the other sandbox answered %q", got)
		}
		if _, err := m.List(t.Context()); err != nil {
			t.Errorf("the node stopped answering: %v", err)
		}
		// The guest's OOM killer took the allocation, not the guest.
		if out := run(t, hog, "sudo -n dmesg | grep -c 'Out of memory: Killed process' || true"); strings.TrimSpace(out) == "0" {
			t.Errorf("the guest's kernel log has no OOM kill")
		}
	})

	t.Run("cpu", func(t *testing.T) {
		run(t, hog, `for i in 1 2; do setsid yes </dev/null >/dev/null 2>&1 & done; sleep 1; pgrep -c -x yes`)
		for i := range 3 {
			start := time.Now()
			if got := strings.TrimSpace(run(t, other, "echo alive")); got != "alive" {
				t.Fatalf("the other sandbox answered %q", got)
			}
			took := time.Since(start)
			t.Logf("command in the other sandbox while the hog spins: %s", took.Round(time.Millisecond))
			if took > 5*time.Second {
				t.Errorf("round %d: a command took %s beside a busy sandbox, want < 5s", i, took)
			}
		}
	})
}

// TestKillLeavesNothing: after Kill no QEMU runs for the sandbox, its state
// directory is gone and its slot serves the next sandbox; after Close no slot
// is left on the host (newManager's cleanup checks).
func TestKillLeavesNothing(t *testing.T) {
	root := newRoot()
	m := newManager(t, node.Config{Runtime: newRuntime(t, root)})
	info := create(t, m, spec("doomed"))
	// Its start's connection into envd is kept for the client (the proxy).
	checkAgentConnection(t, m, info)
	agent := m.AgentTransport(info.ID)
	vmDir := filepath.Join(root, info.ID)
	pids := qemuOf(vmDir)
	if len(pids) != 1 {
		t.Fatalf("QEMUs of %s: %v, want one", vmDir, pids)
	}
	if err := m.Kill(t.Context(), info.ID); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if left := qemuOf(vmDir); len(left) != 0 {
		t.Errorf("QEMU %v still runs after Kill", left)
	}
	if err := syscall.Kill(pids[0], 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("QEMU pid %d after Kill: %v, want ESRCH", pids[0], err)
	}
	if _, err := os.Stat(vmDir); !os.IsNotExist(err) {
		t.Errorf("state directory %s after Kill: %v", vmDir, err)
	}
	if l, _ := m.List(t.Context()); len(l) != 0 {
		t.Errorf("List after Kill: %v", l)
	}
	for name, err := range map[string]error{
		"Kill again": m.Kill(t.Context(), info.ID),
		"Stats":      errOf(m.Stats(t.Context(), info.ID)),
		"Logs":       errOf(m.Logs(t.Context(), info.ID)),
	} {
		if !errors.Is(err, node.ErrNotFound) {
			t.Errorf("%s of a killed sandbox: %v, want ErrNotFound", name, err)
		}
	}
	if tr := m.AgentTransport(info.ID); tr != nil {
		t.Errorf("AgentTransport of a killed sandbox = %v, want nil", tr)
	}
	next := create(t, m, spec("next"))
	if next.Host != info.Host {
		t.Errorf("the next sandbox got %s; want the released slot's %s", next.Host, info.Host)
	}
	// The killed sandbox's connections never reach the next one in its slot.
	if r, err := execVia(t.Context(), agent, next, "token-"+next.ID, "true"); err == nil {
		t.Errorf("a command over the killed sandbox's agent transport ran in the next sandbox of its slot: %+v", r)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if left := qemuOf(root); len(left) != 0 {
		t.Errorf("QEMU %v still runs after Close", left)
	}
	if dirs := stateDirs(root); len(dirs) != 0 {
		t.Errorf("state directories %v after Close", dirs)
	}
	checkNoSlots(t)
}

func errOf[T any](_ T, err error) error { return err }

// The crash test runs a child: the test binary again, which opens a Manager,
// creates sandboxes, prints them and waits to be killed. A real kill -9 is the
// only faithful crash: inside one process a dropped Manager would keep the
// slot pool's host-wide lock open, so no second Manager could start.
const (
	crashChildEnv    = "WARREN_NODE_TEST_CRASH_ROOT"
	crashArtifactEnv = "WARREN_NODE_TEST_ARTIFACT"
)

// crashChild is the child's main: two sandboxes, then "ready", then wait.
func crashChild() int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rt, err := microvm.New(microvm.Config{Root: os.Getenv(crashChildEnv)})
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	m, err := node.NewManager(ctx, node.Config{ID: "crash-child", Runtime: rt, DataDir: cacheDir})
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	for _, id := range []string{"crash-1", "crash-2"} {
		info, err := m.Create(ctx, node.SandboxSpec{ID: id, Artifact: os.Getenv(crashArtifactEnv), AccessToken: "token-" + id})
		if err != nil {
			fmt.Println("error", err)
			return 1
		}
		fmt.Println("sandbox", info.ID, info.Host)
	}
	fmt.Println("ready")
	select {} // until killed
}

// TestRestartCleansLeftovers: a node process killed with -9 leaves QEMUs,
// state directories and slot namespaces; the next NewManager removes them all
// and starts sandboxes again.
func TestRestartCleansLeftovers(t *testing.T) {
	baseArtifact(t)
	root := newRoot()
	t.Cleanup(func() { // if the test fails before the new Manager cleaned up
		for _, pid := range qemuOf(root) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), crashChildEnv+"="+root, crashArtifactEnv+"="+base.Dir)
	var stderr strings.Builder
	child.Stderr = &stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			child.Process.Kill()
			child.Wait()
		}
	})
	sc := bufio.NewScanner(out)
	var hosts []string
	for sc.Scan() {
		line := sc.Text()
		t.Logf("child: %s", line)
		if f := strings.Fields(line); len(f) == 3 && f[0] == "sandbox" {
			hosts = append(hosts, f[2])
		}
		if line == "ready" || strings.HasPrefix(line, "error") {
			break
		}
	}
	if len(hosts) != 2 {
		t.Fatalf("the child started %d sandboxes, want 2; stderr:\n%s", len(hosts), stderr.String())
	}
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	killed = true

	leftQEMU, leftDirs := qemuOf(root), stateDirs(root)
	leftNetns := slotNetns()
	t.Logf("after kill -9: QEMUs %v, state dirs %v, slot netns %v", leftQEMU, leftDirs, leftNetns)
	if len(leftQEMU) != 2 || len(leftDirs) != 2 || len(leftNetns) < 2 {
		t.Fatalf("the crash left QEMUs %v, state %v, netns %v; want 2 of each (the test would prove nothing)", leftQEMU, leftDirs, leftNetns)
	}

	m := newManager(t, node.Config{Runtime: newRuntime(t, root)})
	if left := qemuOf(root); len(left) != 0 {
		t.Errorf("QEMUs %v survive NewManager", left)
	}
	if dirs := stateDirs(root); len(dirs) != 0 {
		t.Errorf("state directories %v survive NewManager", dirs)
	}
	if ns := slotNetns(); len(ns) != 0 {
		t.Errorf("slot namespaces %v survive NewManager", ns)
	}
	if l, _ := m.List(t.Context()); len(l) != 0 {
		t.Errorf("a restarted node lists %v, want nothing", l)
	}
	info := create(t, m, spec("after-restart"))
	if got := strings.TrimSpace(run(t, info, "echo ok")); got != "ok" {
		t.Errorf("a sandbox after the restart answered %q", got)
	}
}

// slotNetns lists the slot namespaces (warren-<n>) on the host.
func slotNetns() []string {
	entries, _ := os.ReadDir("/run/netns")
	var out []string
	for _, e := range entries {
		if n, ok := strings.CutPrefix(e.Name(), "warren-"); ok && isDigits(n) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestFreshSandboxClockAndEntropy: /init sets the restored guest's clock to
// the host's and reseeds its RNG, so clones of one snapshot differ.
func TestFreshSandboxClockAndEntropy(t *testing.T) {
	m := newManager(t, node.Config{})
	a := create(t, m, spec("clock-a"))
	b := create(t, m, spec("clock-b"))
	for _, info := range []*node.SandboxInfo{a, b} {
		before := time.Now()
		out := strings.TrimSpace(run(t, info, "date +%s.%N"))
		after := time.Now()
		secs, err := strconv.ParseFloat(out, 64)
		if err != nil {
			t.Fatalf("%s: date printed %q", info.ID, out)
		}
		guest := time.Unix(0, int64(secs*1e9))
		if guest.Before(before.Add(-time.Second)) || guest.After(after.Add(time.Second)) {
			t.Errorf("%s: guest clock %s, host %s..%s: more than 1 s apart", info.ID, guest.Format(time.RFC3339Nano),
				before.Format(time.RFC3339Nano), after.Format(time.RFC3339Nano))
		}
	}
	const rnd = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
	ra, rb := run(t, a, rnd), run(t, b, rnd)
	if len(ra) != 32 || ra == rb {
		t.Errorf("16 random bytes: %q in one sandbox, %q in the other; want different", ra, rb)
	}
}

// TestLimitStatsLogs: Create refuses past MaxSandboxes with ErrFull naming
// the limit; Stats and Logs describe a running sandbox.
func TestLimitStatsLogs(t *testing.T) {
	m := newManager(t, node.Config{MaxSandboxes: 2})
	a := create(t, m, spec("lim-a"))
	create(t, m, spec("lim-b"))
	_, err := m.Create(t.Context(), spec("lim-c"))
	if !errors.Is(err, node.ErrFull) || !strings.Contains(err.Error(), "MaxSandboxes) is 2") {
		t.Errorf("third Create: %v; want ErrFull naming the limit 2", err)
	}

	st, err := m.Stats(t.Context(), a.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stats: %+v", st)
	memMiB := uint64(base.MemoryMiB) << 20
	switch {
	case st.CPUCount != base.CPUs:
		t.Errorf("CPUCount %d, want %d", st.CPUCount, base.CPUs)
	case st.CPUUsedPct < 0 || st.CPUUsedPct > 100:
		t.Errorf("CPUUsedPct %v", st.CPUUsedPct)
	case st.MemTotal < memMiB*3/4 || st.MemTotal > memMiB:
		t.Errorf("MemTotal %d, want about %d MiB", st.MemTotal, base.MemoryMiB)
	case st.MemUsed == 0 || st.MemUsed >= st.MemTotal:
		t.Errorf("MemUsed %d of %d", st.MemUsed, st.MemTotal)
	case st.DiskTotal == 0 || st.DiskUsed == 0 || st.DiskUsed >= st.DiskTotal:
		t.Errorf("DiskUsed %d of %d", st.DiskUsed, st.DiskTotal)
	case time.Since(st.Timestamp) > 10*time.Second || time.Until(st.Timestamp) > 2*time.Second:
		t.Errorf("Timestamp %s, now %s", st.Timestamp, time.Now())
	}

	run(t, a, "true") // envd logs the process it started
	logs, err := m.Logs(t.Context(), a.ID)
	if err != nil {
		t.Fatal(err)
	}
	sources := map[string]int{}
	var restored bool
	for _, l := range logs {
		sources[l.Source]++
		restored = restored || l.Source == "boot" && strings.Contains(l.Message, "restored template build "+base.BuildID)
		if l.Time.IsZero() || l.Message == "" {
			t.Errorf("log line %+v lacks a time or text", l)
		}
	}
	t.Logf("%d log lines by source: %v; first: %+v", len(logs), sources, logs[0])
	if !restored {
		t.Errorf("Logs has no boot line naming the restore: %+v", logs)
	}

	if err := m.Kill(t.Context(), a.ID); err != nil {
		t.Fatal(err)
	}
	create(t, m, spec("lim-c")) // room again
}

// TestCreateFailureLeavesNothing: a Create that fails before or after its VM
// started leaves no QEMU, state or slot behind.
func TestCreateFailureLeavesNothing(t *testing.T) {
	root := newRoot()
	m := newManager(t, node.Config{Runtime: newRuntime(t, root)})
	missing := spec("no-artifact")
	missing.Artifact = filepath.Join(cacheDir, "templates", "base", "no-such-build")
	badUser := spec("bad-user") // envd refuses /init: the VM already runs
	badUser.DefaultUser = "no-such-user"
	for _, tc := range []struct {
		name    string
		spec    node.SandboxSpec
		timeout time.Duration
		want    string
	}{
		{"missing artifact", missing, time.Minute, "no-such-build"},
		{"envd refuses /init", badUser, time.Minute, "no-such-user"},
		{"deadline before envd answers", spec("too-slow"), 50 * time.Millisecond, "deadline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), tc.timeout)
			defer cancel()
			_, err := m.Create(ctx, tc.spec)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Create: %v; want an error naming %q", err, tc.want)
			}
			if left := qemuOf(root); len(left) != 0 {
				t.Errorf("QEMU %v left", left)
			}
			if dirs := stateDirs(root); len(dirs) != 0 {
				t.Errorf("state %v left", dirs)
			}
			if l, _ := m.List(t.Context()); len(l) != 0 {
				t.Errorf("List: %v", l)
			}
		})
	}
	// The slots went back: the pool's first slot serves the next sandbox.
	if info := create(t, m, spec("fine")); info.Host != "10.200.0.2" {
		t.Errorf("after the failures the next sandbox is at %s, want the first slot's 10.200.0.2", info.Host)
	}
}

// TestKillDuringCreate: Kills racing Creates (at random moments, some before
// the VM runs, some after) always win: every sandbox ends killed, and nothing
// is left.
func TestKillDuringCreate(t *testing.T) {
	root := newRoot()
	m := newManager(t, node.Config{Runtime: newRuntime(t, root)})
	const n = 4
	var wg sync.WaitGroup
	created := make([]error, n)
	for i := range n {
		id := fmt.Sprintf("race-%d", i)
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, created[i] = m.Create(context.Background(), spec(id))
		}()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(rand.IntN(1200)) * time.Millisecond)
			deadline := time.Now().Add(time.Minute)
			for {
				err := m.Kill(context.Background(), id)
				if err == nil {
					return
				}
				if !errors.Is(err, node.ErrNotFound) || time.Now().After(deadline) {
					t.Errorf("Kill %s: %v", id, err)
					return
				}
				time.Sleep(time.Millisecond) // the Create has not registered yet
			}
		}()
	}
	wg.Wait()
	for i, err := range created {
		t.Logf("race-%d: Create returned %v", i, err)
	}
	if l, _ := m.List(t.Context()); len(l) != 0 {
		t.Errorf("List after every Kill: %v", l)
	}
	if left := qemuOf(root); len(left) != 0 {
		t.Errorf("QEMU %v left", left)
	}
	if dirs := stateDirs(root); len(dirs) != 0 {
		t.Errorf("state %v left", dirs)
	}
	info := create(t, m, spec("race-0")) // the ID and a slot are free again
	run(t, info, "true")
}

// TestVMExitIsReaped: a sandbox whose VM dies on its own (here QEMU is
// killed behind the node's back) leaves List, and its state and slot are freed.
func TestVMExitIsReaped(t *testing.T) {
	root := newRoot()
	m := newManager(t, node.Config{Runtime: newRuntime(t, root)})
	info := create(t, m, spec("short-lived"))
	pids := qemuOf(filepath.Join(root, info.ID))
	if len(pids) != 1 {
		t.Fatalf("QEMUs of %s: %v", info.ID, pids)
	}
	syscall.Kill(pids[0], syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, _ := m.List(t.Context())
		if len(l) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a sandbox whose VM died is still listed: %+v", l[0])
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The node may still be freeing it: a Kill then waits for that and succeeds.
	if err := m.Kill(t.Context(), info.ID); err != nil && !errors.Is(err, node.ErrNotFound) {
		t.Errorf("Kill after the VM died: %v, want nil or ErrNotFound", err)
	}
	if dirs := stateDirs(root); len(dirs) != 0 {
		t.Errorf("state %v left", dirs)
	}
	if next := create(t, m, spec("successor")); next.Host != info.Host {
		t.Errorf("the next sandbox is at %s, want the freed slot's %s", next.Host, info.Host)
	}
}

// The node's nameservers reach the guest's /etc/resolv.conf and the E2B
// identity files exist (no DNS query is sent: the address is a documentation one).
func TestSandboxResolvConfAndIdentityFiles(t *testing.T) {
	m := newManager(t, node.Config{DNS: []string{"198.51.100.53"}})
	s := spec("dns-a")
	s.EnvVars = map[string]string{"E2B_SANDBOX_ID": "dns-a", "E2B_SANDBOX": "true"}
	info := create(t, m, s)
	if out := run(t, info, "cat /etc/resolv.conf"); !strings.Contains(out, "nameserver 198.51.100.53\n") {
		t.Errorf("/etc/resolv.conf = %q, want the node's nameserver", out)
	}
	if out := run(t, info, "cat /run/e2b/.E2B_SANDBOX_ID"); out != "dns-a" {
		t.Errorf("/run/e2b/.E2B_SANDBOX_ID = %q, want dns-a", out)
	}
}

// TestStartsTakeTurns: with MaxStarting 1, of two creates at once the second
// restores its VM only after the first's envd took /init: starts take turns.
func TestStartsTakeTurns(t *testing.T) {
	m := newManager(t, node.Config{MaxStarting: 1})
	infos := make([]*node.SandboxInfo, 2)
	var wg sync.WaitGroup
	for i := range infos {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			info, err := m.Create(ctx, spec(fmt.Sprintf("turn%d", i)))
			if err != nil {
				t.Error(err)
				return
			}
			infos[i] = info
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	// The boot log's first line is the restore's end, its last /init's.
	type span struct{ restored, initialized time.Time }
	spans := make([]span, 2)
	for i, info := range infos {
		logs, err := m.Logs(t.Context(), info.ID)
		if err != nil {
			t.Fatal(err)
		}
		var boot []node.LogLine
		for _, l := range logs {
			if l.Source == "boot" && (strings.Contains(l.Message, "restored") || strings.Contains(l.Message, "accepted /init")) {
				boot = append(boot, l)
			}
		}
		if len(boot) != 2 {
			t.Fatalf("%s: boot log lines %v, want the restore's and /init's", info.ID, boot)
		}
		spans[i] = span{boot[0].Time, boot[1].Time}
	}
	if spans[1].initialized.Before(spans[0].initialized) {
		spans[0], spans[1] = spans[1], spans[0]
	}
	t.Logf("first: restored %s, /init %s; second: restored %s, /init %s",
		spans[0].restored.Format("15:04:05.000"), spans[0].initialized.Format("15:04:05.000"),
		spans[1].restored.Format("15:04:05.000"), spans[1].initialized.Format("15:04:05.000"))
	if !spans[1].restored.After(spans[0].initialized) {
		t.Errorf("the second VM was restored at %s, before the first's /init at %s: starts did not take turns",
			spans[1].restored.Format("15:04:05.000"), spans[0].initialized.Format("15:04:05.000"))
	}
}
