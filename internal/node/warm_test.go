package node_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// waitWarm waits until the base pool has want VMs ready.
func waitWarm(t *testing.T, m *node.Manager, want int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ready, _ := m.WarmPool(base.Dir)
		if ready == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the warm pool has %d VMs ready after 2 min, want %d", ready, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cpuTicks is a process's user+system CPU time in clock ticks.
func cpuTicks(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return ut + st
}

func TestWarmPool(t *testing.T) {
	var starts startLog
	m := newManager(t, node.Config{MaxSandboxes: 4, OnStart: starts.add})
	internet := newFakeInternet(t)
	if err := m.SetWarmPool(base.Dir, 1); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, m, 1)
	if list, _ := m.List(t.Context()); len(list) != 0 {
		t.Errorf("List shows %d sandboxes; warm VMs are not sandboxes", len(list))
	}
	if pools := m.WarmPools(); len(pools) != 1 || filepath.Base(pools[0].Artifact) != filepath.Base(base.Dir) || pools[0].Ready != 1 || pools[0].Size != 1 {
		t.Errorf("WarmPools = %+v, want the base build's, 1 of 1 ready", pools)
	}
	// A frozen VM costs no CPU: its QEMU barely ticks over a second (an
	// idle running clone takes ~13 ticks a second under TCG).
	pid := warmQEMU(t)
	before := cpuTicks(t, pid)
	time.Sleep(3 * time.Second)
	d := cpuTicks(t, pid) - before
	t.Logf("the frozen warm VM's QEMU used %d ticks (10 ms each) in 3 s", d)
	if d > 15 {
		t.Errorf("the frozen warm VM's QEMU %d used %d ticks (10 ms each) in 3 s", pid, d)
	}

	// It was prepared at the lowest CPU priority, every thread of it.
	if nices := threadNices(t, pid); len(nices) == 0 || slices.Max(nices) != 19 || slices.Min(nices) != 19 {
		t.Errorf("the warm VM's QEMU threads have nice values %v, want 19 each", nices)
	}

	// The warm VM's warm-up connection into its envd stays open while frozen.
	warmConns := hostAgentConns(t)

	s := spec("warm1")
	s.AllowInternet = true
	start := time.Now()
	info := create(t, m, s)
	took := time.Since(start)
	logs, err := m.Logs(t.Context(), info.ID)
	if err != nil {
		t.Fatal(err)
	}
	claimed := false
	for _, l := range logs {
		claimed = claimed || strings.Contains(l.Message, "claimed a warm VM")
	}
	if !claimed {
		t.Errorf("the create did not claim the warm VM: %v", logs)
	}
	t.Logf("create from the warm pool: %s", took.Round(time.Millisecond))
	// The warm-up's connection into envd stayed open while the VM was
	// frozen: the claim's /init and the client's first command use it.
	checkAgentConnection(t, m, info)
	var used []string
	for c, ip := range hostAgentConns(t) {
		if ip.String() == info.Host {
			used = append(used, c)
		}
	}
	if len(used) != 1 || warmConns[used[0]] != netip.MustParseAddr(info.Host) {
		t.Errorf("the host's connections to the claimed sandbox's envd are %v; want the one the warm VM had before its claim (of %v)", used, warmConns)
	}
	// The claimed VM runs at the node's priority, threads started since too.
	if nices := threadNices(t, pid); len(nices) == 0 || slices.Max(nices) != 0 || slices.Min(nices) != 0 {
		t.Errorf("the claimed VM's QEMU threads have nice values %v, want the node's (0) each", nices)
	}
	// The claimed sandbox is the create's own: its token, env and clock.
	if got := strings.TrimSpace(run(t, info, "echo $SANDBOX_NAME; whoami")); got != "warm1\nuser" {
		t.Errorf("sandbox printed %q", got)
	}
	guest, _ := strconv.ParseInt(strings.TrimSpace(run(t, info, "date +%s")), 10, 64)
	if now := time.Now().Unix(); guest < now-2 || guest > now+2 {
		t.Errorf("guest clock %d, host %d", guest, now)
	}
	// The warm VM's transfer disk, opened when it was prepared, is the
	// sandbox's.
	checkTransfer(t, m, info)
	if _, err := execIn(t.Context(), info, "wrong-token", "true"); err == nil {
		t.Error("a wrong token ran a command in the claimed sandbox")
	}
	// The pool refills; a create without internet access claims too, and its
	// slot gets that policy: the fake internet answers warm1, not warm2.
	waitWarm(t, m, 1)
	s2 := spec("warm2")
	s2.AllowInternet = false
	info2 := create(t, m, s2)
	logs2, _ := m.Logs(t.Context(), info2.ID)
	claimed = false
	for _, l := range logs2 {
		claimed = claimed || strings.Contains(l.Message, "claimed a warm VM")
	}
	if !claimed {
		t.Errorf("a create without internet access did not claim the warm VM: %v", logs2)
	}
	curl := `out=$(curl -sS --max-time 2 ` + internet + ` 2>&1); echo "$? $out"`
	if got := strings.TrimSpace(run(t, info, curl)); got != "0 internet" {
		t.Errorf("warm1 (AllowInternet) → fake internet: %q, want exit 0 and %q", got, "internet")
	}
	if got := strings.TrimSpace(run(t, info2, curl)); got == "" || strings.HasPrefix(got, "0 ") {
		t.Errorf("warm2 (no internet access) → fake internet: %q, want curl to fail", got)
	}
	for _, id := range []string{info.ID, info2.ID} {
		if err := m.Kill(context.Background(), id); err != nil {
			t.Error(err)
		}
	}
	starts.want(t, "warm ok", "warm ok")

	// Shrinking the pool kills the warm VMs past its new size.
	waitWarm(t, m, 1)
	if err := m.SetWarmPool(base.Dir, 0); err != nil {
		t.Fatal(err)
	}
	if ready, size := m.WarmPool(base.Dir); ready != 0 || size != 0 {
		t.Errorf("after SetWarmPool(0) the pool has %d of %d ready, want 0 of 0", ready, size)
	}
	if n := len(warmQEMUs()); n != 0 {
		t.Errorf("%d warm VMs' QEMUs still run after SetWarmPool(0)", n)
	}
	if pools := m.WarmPools(); len(pools) != 0 {
		t.Errorf("WarmPools after SetWarmPool(0) = %+v, want none", pools)
	}
	// Close (the cleanup) kills the warm VM and frees its slot: checkNoSlots.
}

// threadNices lists the nice value of each thread of process pid.
func threadNices(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		t.Fatal(err)
	}
	var nices []int
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + task.Name() + "/stat")
		if err != nil {
			continue // the thread ended
		}
		_, rest, _ := strings.Cut(string(b), ") ")
		nice, err := strconv.Atoi(strings.Fields(rest)[16])
		if err != nil {
			t.Fatalf("thread %s of %d: nice %v", task.Name(), pid, err)
		}
		nices = append(nices, nice)
	}
	return nices
}

// warmQEMU is the pid of the one warm VM's QEMU.
func warmQEMU(t *testing.T) int {
	t.Helper()
	found := warmQEMUs()
	if len(found) != 1 {
		t.Fatalf("found %d warm VMs' QEMUs, want 1", len(found))
	}
	return found[0]
}

// warmQEMUs lists the pids of the QEMUs of unclaimed warm VMs (their state
// directories are warm-<hex>; a claimed one's process is the sandbox's and
// is stopped for good only by its kill, so the test kills those first).
func warmQEMUs() []int {
	procs, _ := os.ReadDir("/proc")
	var found []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		if err == nil && strings.HasPrefix(string(b), microvm.Binary+"\x00") && strings.Contains(string(b), "/warm-") {
			found = append(found, pid)
		}
	}
	return found
}
