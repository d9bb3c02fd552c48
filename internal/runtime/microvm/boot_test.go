package microvm_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/runtime/microvm"
)

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func TestBootToHealth(t *testing.T) {
	a := buildArtifacts(t)
	rt, pool := newRuntime(t), newPool(t)
	sb := start(t, rt, pool, coldSpec(a, "boot"))
	took := sb.waitHealthy(t, 60*time.Second)
	t.Logf("cold boot: Start → first /health 204: %s (%s)", took.Round(time.Millisecond), rt.Accel())

	t.Run("metrics are the guest's", func(t *testing.T) {
		resp, err := sb.client.Get(sb.base + "/metrics")
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
		serial, _ := os.ReadFile(sb.vm.(*microvm.VM).ConsoleLog())
		if !bytes.Contains(serial, []byte("warren-init: ready at")) {
			t.Errorf("console lacks init's ready line:\n%s", serial)
		}
	})

	// GuestASLR auto: randomization off under TCG (norandmaps), on under KVM.
	wantASLR := "2"
	if rt.Accel() == microvm.TCG {
		wantASLR = "0"
	}
	// What init set up, seen by a process envd starts in the guest.
	for _, tc := range []struct {
		name, user, script, want string
	}{
		{"root is the disk overlay, ext4", "root", `awk '$2 == "/" {print $1, $3}' /proc/mounts`, "/dev/vda ext4"},
		{"devpts, shm, run and tmp are mounted", "root",
			`awk '$2 ~ "^/(dev/pts|dev/shm|run|tmp)$" {print $2, $3}' /proc/mounts | sort | tr '\n' ' '`,
			"/dev/pts devpts /dev/shm tmpfs /run tmpfs /tmp tmpfs "},
		{"/tmp and /dev/shm are world-writable and sticky", "root", `stat -c %a /tmp /dev/shm | tr '\n' ' '`, "1777 1777 "},
		{"devpts gives ttys the tty group", "root", `awk '$2 == "/dev/pts" {print $4}' /proc/mounts | grep -o 'gid=5'`, "gid=5"},
		{"hostname from the spec", "user", `hostname`, "warren-test"},
		{"eth0 has the slot's guest address", "user", `ip -4 -o addr show dev eth0 | awk '{print $4}'`, sb.slot.GuestPrefix.String()},
		{"default route via the slot's tap", "user", `ip route | grep ^default`, "default via " + sb.slot.GuestGateway.String() + " dev eth0 "},
		{"eth0 has the slot's guest MAC", "user", `cat /sys/class/net/eth0/address`, sb.slot.GuestMAC.String()},
		{"runs as user uid 1000", "user", `id -u`, "1000"},
		{"warren_* and WARREN_* arguments do not leak into processes", "root", `env | grep -ic ^warren_ || true`, "0"},
		{"address space randomization as GuestASLR auto has it for " + string(rt.Accel()), "user", `cat /proc/sys/kernel/randomize_va_space`, wantASLR},
		// One-shot ticks (NO_HZ_IDLE in high-resolution mode, 2) on every
		// vCPU: an idle guest's tick stops (the TCG CPU has ARAT).
		{"the tick stops in idle", "root", `awk '/nohz_mode/ {print $3}' /proc/timer_list | sort -u`, "2"},
		{"the guest has the spec's CPUs and memory", "root", `nproc; awk '/MemTotal/ {print ($2 > 200000 && $2 <= 262144)}' /proc/meminfo`, "1\n1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := sb.run(t, tc.user, tc.script)
			if strings.TrimRight(got, "\n") != strings.TrimRight(tc.want, "\n") {
				t.Errorf("%s as %s printed %q, want %q", tc.script, tc.user, got, tc.want)
			}
		})
	}

	t.Run("the guest CPU is x86-64-v3 under TCG", func(t *testing.T) {
		if rt.Accel() != microvm.TCG {
			t.Skip("under KVM the guest has the host's CPU")
		}
		script := `for f in ` + strings.Join(tcgFlags, " ") + `; do grep -qw $f /proc/cpuinfo || echo "no $f"; done
			grep -qw erms /proc/cpuinfo && echo "erms (TCG copies with rep movsb a byte at a time)"; true`
		if got := sb.run(t, "user", script); got != "" {
			t.Errorf("/proc/cpuinfo flags: %q", got)
		}
		if got, want := sb.run(t, "user", isaScript), isaOutput("v2", isaArg)+isaOutput("v3", isaArg); got != want {
			t.Errorf("the programs built for x86-64-v2 and v3 printed %q, want %q", got, want)
		}
	})

	// An idle guest stops its tick (nohz above), so it takes tens of timer
	// interrupts a second instead of HZ (250), and its QEMU uses 16-22 ms of
	// CPU a second under TCG here, against ~58 with a periodic tick.
	t.Run("an idle guest costs little CPU", func(t *testing.T) {
		time.Sleep(2 * time.Second) // past the commands above
		timerHz, cpu := idleCost(t, sb, 5*time.Second)
		t.Logf("idle: %.0f timer interrupts a second per vCPU; QEMU %.1f ms of CPU a second", timerHz, cpu)
		if timerHz > 125 {
			t.Errorf("idle: %.0f timer interrupts a second per vCPU, want under 125: the tick does not stop", timerHz)
		}
		if cpu > 40 {
			t.Errorf("idle: QEMU uses %.1f ms of CPU a second, want under 40", cpu)
		}
	})

	t.Run("stats", func(t *testing.T) {
		st, err := rt.Stats(t.Context(), sb.vm)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("cold-booted VM: RSS %d MiB, PSS %d MiB, CPU %s", st.RSS>>20, st.PSS>>20, st.CPUTime)
		if st.RSS < 16<<20 || st.PSS == 0 || st.PSS > st.RSS || st.CPUTime <= 0 {
			t.Errorf("stats %+v: want RSS of a running QEMU (> 16 MiB), 0 < PSS <= RSS, CPU time > 0", st)
		}
	})
}

// TestInitFailurePowersOff: when init cannot finish (here the root disk is not
// ext4) it names the error on the console and the VM stops, instead of a
// kernel panic or a VM that never answers.
func TestInitFailurePowersOff(t *testing.T) {
	a := buildArtifacts(t)
	rt, pool := newRuntime(t), newPool(t)
	blank := filepath.Join(t.TempDir(), "blank.img")
	if err := os.WriteFile(blank, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := coldSpec(a, "blank-root")
	spec.RootDisk = blank
	sb := start(t, rt, pool, spec)
	select {
	case <-sb.vm.Done():
	case <-time.After(60 * time.Second):
		t.Fatal("QEMU still runs 60 s after boot with an unmountable root disk")
	}
	serial, _ := os.ReadFile(sb.vm.(*microvm.VM).ConsoleLog())
	for _, want := range []string{"warren-init: fatal: init: mount /dev/vda (ext4) on /newroot", "warren-init: powering off"} {
		if !bytes.Contains(serial, []byte(want)) {
			t.Errorf("console lacks %q:\n%s", want, serial)
		}
	}
	if bytes.Contains(serial, []byte("Kernel panic")) {
		t.Errorf("the kernel panicked instead of powering off:\n%s", serial)
	}
}

// BenchmarkBootToHealth reports the time from Start to envd's first /health
// answer (ms-to-health), one cold-booted VM per iteration.
func BenchmarkBootToHealth(b *testing.B) {
	a := buildArtifacts(b)
	rt, pool := newRuntime(b), newPool(b)
	var took []time.Duration
	for b.Loop() {
		func() {
			it := &iteration{TB: b}
			defer it.cleanup()
			sb := start(it, rt, pool, coldSpec(a, "bench-boot"))
			took = append(took, sb.waitHealthy(it, 60*time.Second))
		}()
	}
	slices.Sort(took)
	b.Logf("Start → first /health 204, sorted: %v", took)
	b.ReportMetric(float64(median(took).Milliseconds()), "ms-to-health(median)")
}

// iteration gives one benchmark iteration its own cleanups.
type iteration struct {
	testing.TB
	cleanups []func()
}

func (i *iteration) Cleanup(f func()) { i.cleanups = append(i.cleanups, f) }
func (i *iteration) cleanup() {
	for _, f := range slices.Backward(i.cleanups) {
		f()
	}
	i.cleanups = nil
}
