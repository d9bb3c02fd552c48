package microvm_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/bits"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// oldTCGModel is the guest CPU warren gave TCG guests before x86-64-v3:
// x86-64-v1, on which /bin/isa-v2 and /bin/isa-v3 die of SIGILL.
const oldTCGModel = "qemu64,+arat"

// isaArg is the argument the tests give /bin/isa-v2 and /bin/isa-v3.
const isaArg = 0xdeadbeefcafe1234

// tcgFlags are /proc/cpuinfo flags a TCG guest must have: x86-64-v2
// (ssse3 ... lahf_lm), x86-64-v3 (avx ... xsave; abm is LZCNT), what
// builds such as polars' assume beside it (pclmulqdq, aes), and arat, which
// lets the tick stop in idle.
var tcgFlags = []string{
	"ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm",
	"avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "abm", "movbe", "xsave",
	"pclmulqdq", "aes", "arat",
}

// isaOutput is what testdata/isa.c, built for x86-64-v2 or v3, prints for x.
func isaOutput(level string, x uint64) string {
	var le [8]byte
	binary.LittleEndian.PutUint64(le[:], x)
	// The CRC32 instruction: CRC-32C without the pre- and post-inversion
	// that crc32.Update applies.
	crc := ^crc32.Update(^uint32(0), crc32.MakeTable(crc32.Castagnoli), le[:])
	out := fmt.Sprintf("popcnt=%d crc32c=%08x", bits.OnesCount64(x), crc)
	if level == "v3" {
		n := x % 61
		out += fmt.Sprintf(" avx2=%x lzcnt=%d bzhi=%x", 3*(x+3), bits.LeadingZeros64(x), x&(1<<n-1))
	}
	return out + "\n"
}

// isaScript runs /bin/isa-v2 and /bin/isa-v3 in the guest and prints their
// output, or their exit status (132: SIGILL) when they fail.
var isaScript = fmt.Sprintf(`for l in v2 v3; do /bin/isa-$l %d 2>/dev/null || echo "isa-$l: exit $?"; done`, uint64(isaArg))

// qemuCPU is the -cpu argument of the VM's QEMU.
func qemuCPU(t testing.TB, vm runtime.VM) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", vm.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(string(b), "\x00")
	for i, a := range args {
		if a == "-cpu" && i+1 < len(args) {
			return args[i+1]
		}
	}
	t.Fatalf("QEMU pid %d has no -cpu argument: %q", vm.Pid(), args)
	return ""
}

// idleCost measures an idle guest over d: its local timer interrupts per
// second per vCPU (the guest's own count) and QEMU's CPU time per second
// (every thread of it, as the host accounts it), the latter without the
// commands that read the former.
func idleCost(t *testing.T, sb *sandbox, d time.Duration) (timerHz, cpuMsPerSec float64) {
	t.Helper()
	// The LOC line: "LOC: <a count per vCPU...> Local timer interrupts".
	const script = `awk '$1 == "LOC:" {for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) {s += $i; n++}; print s, n}' /proc/interrupts`
	interrupts := func() (count, cpus float64, at time.Time) {
		f := strings.Fields(sb.run(t, "root", script))
		if len(f) != 2 {
			t.Fatalf("the LOC line of /proc/interrupts reads %q", f)
		}
		count, _ = strconv.ParseFloat(f[0], 64)
		cpus, _ = strconv.ParseFloat(f[1], 64)
		return count, cpus, time.Now()
	}
	cpuTime := func() (time.Duration, time.Time) {
		st, err := sb.rt.Stats(t.Context(), sb.vm)
		if err != nil {
			t.Fatal(err)
		}
		return st.CPUTime, time.Now()
	}
	c0, cpus, t0 := interrupts()
	time.Sleep(500 * time.Millisecond) // the command's own work done
	cpu0, s0 := cpuTime()
	time.Sleep(d)
	cpu1, s1 := cpuTime()
	c1, _, t1 := interrupts()
	return (c1 - c0) / cpus / t1.Sub(t0).Seconds(), float64((cpu1 - cpu0).Milliseconds()) / s1.Sub(s0).Seconds()
}

// TestSnapshotKeepsCPUModel: a VM saved under one CPU model restores on
// that model after the runtime's default changed (as after an upgrade of
// warren), and a save without memory cold boots on the new default. The VM
// boots on oldTCGModel, where the ISA test programs die of SIGILL: that
// shows the model in use, and that the checks of TestBootToHealth can fail.
func TestSnapshotKeepsCPUModel(t *testing.T) {
	a := buildArtifacts(t)
	pool := newPool(t)
	old, rt := newRuntime(t), newRuntime(t)
	microvm.SetCPUModel(old, oldTCGModel)
	saved := t.TempDir()
	sigill := "isa-v2: exit 132\nisa-v3: exit 132\n"

	it := &iteration{TB: t}
	defer func() { it.cleanup() }()
	sb := start(it, old, pool, coldSpec(a, "old-cpu"))
	sb.waitHealthy(t, 60*time.Second)
	// Under KVM a CPU model hides features from CPUID only: the host CPU
	// still runs their instructions.
	tcg := old.Accel() == microvm.TCG
	if got := sb.run(t, "user", isaScript); tcg && got != sigill {
		t.Fatalf("on %s the ISA programs printed %q, want them killed by SIGILL (%q)", oldTCGModel, got, sigill)
	}
	marker := "saved-on-" + randomHex(4)
	sb.run(t, "user", "echo "+marker+" > /tmp/marker")
	dir := filepath.Join(saved, "paused")
	if err := old.Snapshot(context.Background(), sb.vm, dir); err != nil {
		t.Fatal(err)
	}
	it.cleanup()
	if m, err := microvm.ReadManifest(dir); err != nil || m.Hardware.CPU != oldTCGModel {
		t.Fatalf("the snapshot's manifest: %+v, %v; want CPU %q", m, err, oldTCGModel)
	}

	// A restore runs on the snapshot's model, whatever the runtime's default.
	it = &iteration{TB: t}
	sb = start(it, rt, pool, runtime.Spec{ID: "restored", Snapshot: dir, Resume: true})
	sb.waitHealthy(t, 60*time.Second)
	if got := qemuCPU(t, sb.vm); got != oldTCGModel {
		t.Errorf("the restored VM's QEMU runs -cpu %s, want the snapshot's %s", got, oldTCGModel)
	}
	if got := sb.run(t, "user", "cat /tmp/marker; "+isaScript); !strings.HasPrefix(got, marker+"\n") || tcg && got != marker+"\n"+sigill {
		t.Fatalf("the restored guest printed %q, want its RAM's marker and SIGILL as before the save", got)
	}

	// A save without memory cold boots on today's model.
	disk := filepath.Join(saved, "disk-only")
	if err := rt.SaveDisk(context.Background(), sb.vm, disk); err != nil {
		t.Fatal(err)
	}
	it.cleanup()
	it = &iteration{TB: t}
	sb = start(it, rt, pool, runtime.Spec{ID: "rebooted", Snapshot: disk, Resume: true})
	sb.waitHealthy(t, 60*time.Second)
	want := microvm.CPUModel(rt.Accel())
	if got := qemuCPU(t, sb.vm); got != want {
		t.Errorf("the cold-booted VM's QEMU runs -cpu %s, want today's %s", got, want)
	}
	if tcg {
		if got, want := sb.run(t, "user", isaScript), isaOutput("v2", isaArg)+isaOutput("v3", isaArg); got != want {
			t.Errorf("the ISA programs printed %q, want %q", got, want)
		}
	}
	// Its own saves record the model it runs on.
	again := filepath.Join(saved, "again")
	if err := rt.Checkpoint(context.Background(), sb.vm, again); err != nil {
		t.Fatal(err)
	}
	if m, err := microvm.ReadManifest(again); err != nil || m.Hardware.CPU != want {
		t.Errorf("a save of the cold-booted VM: %+v, %v; want CPU %q", m, err, want)
	}
}
