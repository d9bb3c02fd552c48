package node_test

import (
	"context"
	"os"
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
func cpuTicks(t *testing.T, pid int) int {
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
	m := newManager(t, node.Config{MaxSandboxes: 4})
	if err := m.SetWarmPool(base.Dir, 1); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, m, 1)
	if list, _ := m.List(t.Context()); len(list) != 0 {
		t.Errorf("List shows %d sandboxes; warm VMs are not sandboxes", len(list))
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
	// The claimed sandbox is the create's own: its token, env and clock.
	if got := strings.TrimSpace(run(t, info, "echo $SANDBOX_NAME; whoami")); got != "warm1\nuser" {
		t.Errorf("sandbox printed %q", got)
	}
	guest, _ := strconv.ParseInt(strings.TrimSpace(run(t, info, "date +%s")), 10, 64)
	if now := time.Now().Unix(); guest < now-2 || guest > now+2 {
		t.Errorf("guest clock %d, host %d", guest, now)
	}
	if _, err := execIn(t.Context(), info, "wrong-token", "true"); err == nil {
		t.Error("a wrong token ran a command in the claimed sandbox")
	}
	// The pool refills; a create without internet access does not claim.
	waitWarm(t, m, 1)
	s2 := spec("warm2")
	s2.AllowInternet = false
	info2 := create(t, m, s2)
	logs2, _ := m.Logs(t.Context(), info2.ID)
	for _, l := range logs2 {
		if strings.Contains(l.Message, "claimed a warm VM") {
			t.Errorf("a create without internet access claimed a warm VM (its slot allows internet)")
		}
	}
	if ready, _ := m.WarmPool(base.Dir); ready != 1 {
		t.Errorf("pool has %d ready, want 1", ready)
	}
	for _, id := range []string{info.ID, info2.ID} {
		if err := m.Kill(context.Background(), id); err != nil {
			t.Error(err)
		}
	}
	// Close (the cleanup) kills the warm VM and frees its slot: checkNoSlots.
}

// warmQEMU is the pid of the one warm VM's QEMU (its state directory is
// warm-<hex>).
func warmQEMU(t *testing.T) int {
	t.Helper()
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
	if len(found) != 1 {
		t.Fatalf("found %d warm VMs' QEMUs, want 1", len(found))
	}
	return found[0]
}
