package node_test

// The node's performance evidence (BENCHMARKS.md, "Node: create from
// snapshot"). Each benchmark runs its own fixed number of sandboxes per b.Loop
// iteration, one after the other, and reports percentiles with ReportMetric:
// run them with -benchtime 1x.
//
//	go test ./internal/node/ -run '^$' -bench . -benchtime 1x -count 3

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/template"
)

// BenchmarkCreate measures Manager.Create of the base template (slot, clone
// restore, envd /health, /init) against its floor in the same run: a bare
// runtime restore of the same snapshot until the guest's envd first answers
// /health. The two alternate, one sandbox at a time, so load from other work
// on the host falls on both alike. Target: create p50 ≤ 1.3 × floor p50.
func BenchmarkCreate(b *testing.B) {
	const n = 20
	a := baseArtifact(b)
	m := newManager(b, node.Config{})
	bare := newRuntime(b, newRoot())
	logLoad(b)

	// One unmeasured round of each: the first restore after a build reads
	// the snapshot's memory file into the page cache.
	timeCreate(b, m, "bench-warm-create")
	timeRestore(b, bare, m.Slots(), a, "bench-warm-floor")

	var creates, floors []time.Duration
	var phases createPhases
	seq := 0
	for b.Loop() {
		for i := range n {
			seq++
			measureCreate := func() {
				took, ph := timeCreate(b, m, fmt.Sprintf("bench-create-%d", seq))
				creates = append(creates, took)
				phases.add(ph)
			}
			measureFloor := func() {
				floors = append(floors, timeRestore(b, bare, m.Slots(), a, fmt.Sprintf("bench-floor-%d", seq)))
			}
			if i%2 == 0 {
				measureCreate()
				measureFloor()
			} else {
				measureFloor()
				measureCreate()
			}
		}
	}
	slices.Sort(creates)
	slices.Sort(floors)
	b.Logf("Manager.Create, sorted: %v", rounded(creates))
	b.Logf("floor (runtime Start → first /health), sorted: %v", rounded(floors))
	b.Logf("Create phases, p50: slot + restore %s, restore → /health %s, /health → /init done %s, the rest %s",
		phases.p50(0), phases.p50(1), phases.p50(2), phases.p50(3))
	ratio := float64(percentile(creates, 50)) / float64(percentile(floors, 50))
	b.Logf("load after: %s", loadAvg())
	b.ReportMetric(0, "ns/op") // one b.Loop iteration is 2n sandboxes: not a useful number
	b.ReportMetric(ms(percentile(creates, 50)), "create-p50-ms")
	b.ReportMetric(ms(percentile(creates, 90)), "create-p90-ms")
	b.ReportMetric(ms(percentile(floors, 50)), "floor-p50-ms")
	b.ReportMetric(ms(percentile(floors, 90)), "floor-p90-ms")
	b.ReportMetric(ratio, "create/floor-p50")
}

// createPhases collects where Create's time goes, from the node's own boot
// log lines: [0] Create called → restored (slot and runtime Start), [1] →
// envd's first /health, [2] → /init accepted, [3] → Create returned.
type createPhases [4][]time.Duration

func (p *createPhases) add(ph [4]time.Duration) {
	for i, d := range ph {
		p[i] = append(p[i], d)
	}
}

func (p *createPhases) p50(i int) time.Duration {
	s := slices.Clone(p[i])
	slices.Sort(s)
	return percentile(s, 50).Round(100 * time.Microsecond)
}

// timeCreate creates a sandbox, returns how long Create took and its phases,
// and kills it.
func timeCreate(b *testing.B, m *node.Manager, id string) (time.Duration, [4]time.Duration) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	began := time.Now()
	info, err := m.Create(ctx, spec(id))
	returned := time.Now()
	if err != nil {
		b.Fatalf("Create %s: %v", id, err)
	}
	defer func() {
		if err := m.Kill(ctx, id); err != nil {
			b.Fatalf("Kill %s: %v", id, err)
		}
	}()
	lines, err := m.Logs(ctx, info.ID)
	if err != nil {
		b.Fatalf("Logs %s: %v", id, err)
	}
	// The node's own account comes first: restored, /health, /init.
	if len(lines) < 3 {
		b.Fatalf("Logs %s: %d lines, want the node's 3 boot lines first", id, len(lines))
	}
	restored, healthy, inited := lines[0].Time, lines[1].Time, lines[2].Time
	return returned.Sub(began), [4]time.Duration{
		restored.Sub(began), healthy.Sub(restored), inited.Sub(healthy), returned.Sub(inited),
	}
}

// timeRestore restores a clone of a's snapshot in a slot of pool, returns the
// time from runtime Start to envd's first /health answer, and kills it.
func timeRestore(b *testing.B, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, id string) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	slot, err := pool.Acquire(ctx, netns.Policy{})
	if err != nil {
		b.Fatalf("acquire a slot for %s: %v", id, err)
	}
	defer func() {
		if err := pool.Release(slot); err != nil {
			b.Errorf("release %s: %v", slot.Name, err)
		}
	}()
	began := time.Now()
	vm, err := rt.Start(ctx, a.Spec(id, slot))
	if err != nil {
		b.Fatalf("restore %s: %v", id, err)
	}
	defer killVM(b, rt, vm)
	waitHealth(b, vm, slot)
	return time.Since(began)
}

// BenchmarkMissCPU measures the host CPU one pool miss costs: QEMU's user +
// system CPU time when Manager.Create returns (restore, envd's port, /init)
// and after the sandbox's first command, a login shell's `echo ready` as the
// SDK starts it. Under TCG a new QEMU translates the guest's code anew, so
// this is what a burst of creates on few cores is bound by.
func BenchmarkMissCPU(b *testing.B) {
	const n = 8
	root := newRoot()
	m := newManager(b, node.Config{Runtime: newRuntime(b, root)})
	logLoad(b)
	var created, first, walls []time.Duration
	seq := 0
	for b.Loop() {
		for i := range n + 1 { // the first is a warm-up: the snapshot's pages into the page cache
			seq++
			id := fmt.Sprintf("bench-miss-%d", seq)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			info, err := m.Create(ctx, spec(id))
			if err != nil {
				b.Fatalf("Create %s: %v", id, err)
			}
			pids := qemuOf(filepath.Join(root, id))
			if len(pids) != 1 {
				b.Fatalf("QEMUs of %s: %v, want one", id, pids)
			}
			atCreate := cpuTime(b, pids[0])
			began := time.Now()
			if _, err := execIn(ctx, info, "token-"+id, "exec bash -l -c 'echo ready'"); err != nil {
				b.Fatalf("%s: first command: %v", id, err)
			}
			wall := time.Since(began)
			afterFirst := cpuTime(b, pids[0])
			if err := m.Kill(ctx, id); err != nil {
				b.Fatalf("Kill %s: %v", id, err)
			}
			cancel()
			if i > 0 {
				created, first, walls = append(created, atCreate), append(first, afterFirst-atCreate), append(walls, wall)
			}
		}
	}
	for _, s := range [][]time.Duration{created, first, walls} {
		slices.Sort(s)
	}
	b.Logf("QEMU CPU by the create's end, sorted: %v", rounded(created))
	b.Logf("QEMU CPU of the first command, sorted: %v (its wall time: %v)", rounded(first), rounded(walls))
	b.Logf("load after: %s", loadAvg())
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(percentile(created, 50)), "create-cpu-p50-ms")
	b.ReportMetric(ms(percentile(first, 50)), "first-command-cpu-p50-ms")
	b.ReportMetric(ms(percentile(walls, 50)), "first-command-wall-p50-ms")
}

// cpuTime is process pid's user + system CPU time.
func cpuTime(b *testing.B, pid int) time.Duration {
	return time.Duration(cpuTicks(b, pid)) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

// BenchmarkIdleClones measures what idle sandboxes cost the host: 20 are
// created, left alone for 10 s, then their QEMU processes' PSS (which splits
// the snapshot's shared memory file and QEMU's code among them) and CPU time,
// and the host's MemAvailable, are read. The first clone's idle CPU is also
// read while it runs alone. A create that fails is counted (failed-creates)
// and tried again under a new ID.
func BenchmarkIdleClones(b *testing.B) {
	const (
		n     = 20
		idle  = 10 * time.Second
		alone = 5 * time.Second
	)
	baseArtifact(b)
	root := newRoot()
	rt := newRuntime(b, root)
	m := newManager(b, node.Config{Runtime: rt, MaxSandboxes: n})
	logLoad(b)

	var pss, rss, cpu []float64 // per clone: MiB, MiB, ms of CPU per second idle
	var drops []float64         // MemAvailable drop per clone, MiB
	var cpuAlone []float64      // ms of CPU per second of the first clone, idle alone
	failed := 0                 // creates that failed (and were tried again)
	seq := 0
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		before := memAvailable(b)
		ids := make([]string, n)
		for i := range ids {
			for {
				seq++
				ids[i] = fmt.Sprintf("bench-idle-%d", seq)
				_, err := m.Create(ctx, spec(ids[i]))
				if err == nil {
					break
				}
				// Counted and shown, not hidden: with the host's cores
				// saturated by the idle clones, a create can fail.
				failed++
				b.Logf("Create %s (clone %d of %d, load %s): %v", ids[i], i+1, n, loadAvg(), err)
				if failed > n {
					b.Fatalf("%d creates failed", failed)
				}
			}
			if i == 0 {
				// One clone's idle CPU with no other VM competing: 20 of
				// them may saturate the host's cores, which caps their share.
				vm := adoptAll(ctx, b, rt, 1)
				time.Sleep(2 * time.Second) // past the restore's first translations under TCG
				s0 := statsOf(ctx, b, rt, vm)
				time.Sleep(alone)
				s1 := statsOf(ctx, b, rt, vm)
				cpuAlone = append(cpuAlone, float64((s1[0].CPUTime-s0[0].CPUTime).Milliseconds())/alone.Seconds())
			}
		}
		vms := adoptAll(ctx, b, rt, n)
		first := statsOf(ctx, b, rt, vms)
		time.Sleep(idle)
		last := statsOf(ctx, b, rt, vms)
		after := memAvailable(b)
		for i := range vms {
			pss = append(pss, mib(last[i].PSS))
			rss = append(rss, mib(last[i].RSS))
			cpu = append(cpu, float64((last[i].CPUTime-first[i].CPUTime).Milliseconds())/idle.Seconds())
		}
		drop := (float64(before) - float64(after)) / n / (1 << 20)
		drops = append(drops, drop)
		b.Logf("MemAvailable %d MiB before the clones, %d MiB after %s idle: %.1f MiB per clone",
			before>>20, after>>20, idle, drop)
		for _, id := range ids {
			if err := m.Kill(ctx, id); err != nil {
				b.Fatalf("Kill %s: %v", id, err)
			}
		}
		cancel()
	}
	slices.Sort(pss)
	slices.Sort(rss)
	slices.Sort(cpu)
	b.Logf("PSS per clone, MiB, sorted: %.1f", pss)
	b.Logf("RSS per clone, MiB, sorted: %.1f", rss)
	b.Logf("CPU per idle clone, ms per s, sorted: %.1f (one clone alone: %.1f)", cpu, cpuAlone)
	b.Logf("load after: %s", loadAvg())
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(medianOf(pss), "pss-p50-MiB")
	b.ReportMetric(meanOf(pss), "pss-mean-MiB")
	b.ReportMetric(medianOf(rss), "rss-p50-MiB")
	b.ReportMetric(medianOf(drops), "memavail-drop-MiB/clone")
	b.ReportMetric(medianOf(cpu), "idle-cpu-ms/s")
	b.ReportMetric(medianOf(cpuAlone), "idle-alone-cpu-ms/s")
	b.ReportMetric(float64(failed), "failed-creates")
}

// adoptAll returns handles on the n VMs of rt (the Manager keeps its own):
// the runtime's Stats needs one.
func adoptAll(ctx context.Context, b *testing.B, rt *microvm.Runtime, n int) []runtime.VM {
	b.Helper()
	ids, err := rt.List(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if len(ids) != n {
		b.Fatalf("the runtime has %d VMs, want %d", len(ids), n)
	}
	vms := make([]runtime.VM, len(ids))
	for i, id := range ids {
		if vms[i], err = rt.Adopt(ctx, id); err != nil {
			b.Fatal(err)
		}
	}
	return vms
}

func statsOf(ctx context.Context, b *testing.B, rt *microvm.Runtime, vms []runtime.VM) []*runtime.Stats {
	b.Helper()
	out := make([]*runtime.Stats, len(vms))
	for i, vm := range vms {
		var err error
		if out[i], err = rt.Stats(ctx, vm); err != nil {
			b.Fatal(err)
		}
	}
	return out
}

// BenchmarkColdBoot boots the base template's kernel, initramfs and root
// image without the snapshot, as its build does, and reports the time from
// runtime Start to envd's first /health answer and to /init accepted: what
// every create would cost without snapshots.
func BenchmarkColdBoot(b *testing.B) {
	const n = 3
	a := baseArtifact(b)
	rt := newRuntime(b, newRoot())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pool, err := netns.NewPool(ctx, netns.Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := pool.Close(); err != nil {
			b.Errorf("close the slot pool: %v", err)
		}
		checkNoSlots(b)
	})
	logLoad(b)

	var health, ready []time.Duration
	seq := 0
	for b.Loop() {
		for range n {
			seq++
			h, r := timeColdBoot(b, rt, pool, a, fmt.Sprintf("bench-cold-%d", seq))
			health, ready = append(health, h), append(ready, r)
		}
	}
	slices.Sort(health)
	slices.Sort(ready)
	b.Logf("cold boot → first /health, sorted: %v; → /init accepted: %v", rounded(health), rounded(ready))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(percentile(health, 50)), "health-p50-ms")
	b.ReportMetric(ms(percentile(ready, 50)), "init-p50-ms")
}

// timeColdBoot boots a's files in a slot of pool and returns the times from
// runtime Start to envd's first /health answer and to /init accepted.
func timeColdBoot(b *testing.B, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, id string) (time.Duration, time.Duration) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	slot, err := pool.Acquire(ctx, netns.Policy{})
	if err != nil {
		b.Fatalf("acquire a slot for %s: %v", id, err)
	}
	defer func() {
		if err := pool.Release(slot); err != nil {
			b.Errorf("release %s: %v", slot.Name, err)
		}
	}()
	cold := a.Spec(id, slot)
	cold.Snapshot = ""
	cold.Hostname, cold.InitSecret = "e2b.local", a.InitSecret
	began := time.Now()
	vm, err := rt.Start(ctx, cold)
	if err != nil {
		b.Fatalf("cold boot %s: %v", id, err)
	}
	defer killVM(b, rt, vm)
	waitHealth(b, vm, slot)
	healthy := time.Since(began)

	// The body the template build sends: the node's /init needs the
	// snapshot's defaults in place, which a cold boot has only after this.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, envdURL(slot)+"/init", strings.NewReader(`{"defaultUser":"user"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(envd.InitSecretHeader, a.InitSecret)
	resp, err := healthClient.Do(req)
	if err != nil {
		b.Fatalf("%s: POST /init: %v", id, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b.Fatalf("%s: POST /init answered %s, want 204", id, resp.Status)
	}
	return healthy, time.Since(began)
}

// healthClient polls as microvm's BenchmarkRestoreToHealth does: a short
// connect timeout, since a SYN sent before the guest runs is lost and would
// be retried only after a second.
var healthClient = &http.Client{Transport: &http.Transport{
	DisableKeepAlives: true,
	DialContext:       (&net.Dialer{Timeout: 50 * time.Millisecond}).DialContext,
}}

func envdURL(slot *netns.Slot) string {
	return "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983")
}

// waitHealth polls envd's /health in vm every 2 ms until it answers 204.
func waitHealth(b *testing.B, vm runtime.VM, slot *netns.Slot) {
	b.Helper()
	deadline := time.Now().Add(time.Minute)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-vm.Done():
			b.Fatalf("%s: QEMU exited before envd answered", vm.ID())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, envdURL(slot)+"/health", nil)
		resp, err := healthClient.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				return
			}
			b.Fatalf("%s: GET /health answered %s, want 204", vm.ID(), resp.Status)
		}
		last = err
		time.Sleep(2 * time.Millisecond)
	}
	b.Fatalf("%s: envd did not answer /health within a minute: %v", vm.ID(), last)
}

func killVM(b *testing.B, rt *microvm.Runtime, vm runtime.VM) {
	if err := rt.Kill(context.Background(), vm); err != nil {
		b.Errorf("kill %s: %v", vm.ID(), err)
	}
}

// memAvailable reads the host's MemAvailable, in bytes.
func memAvailable(b *testing.B) uint64 {
	b.Helper()
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				b.Fatalf("MemAvailable %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	b.Fatal("/proc/meminfo has no MemAvailable line")
	return 0
}

// logLoad records the host's load average: other work on the machine skews
// the numbers.
func logLoad(b *testing.B) { b.Logf("load before: %s", loadAvg()) }

func loadAvg() string {
	raw, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(raw))[:3], " ")
}

// percentile is the nearest-rank p-th percentile of sorted.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

func medianOf(sorted []float64) float64 {
	s := slices.Clone(sorted)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func meanOf(s []float64) float64 {
	sum := 0.0
	for _, v := range s {
		sum += v
	}
	return sum / float64(len(s))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func mib(bytes uint64) float64 { return float64(bytes) / (1 << 20) }

func rounded(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}
