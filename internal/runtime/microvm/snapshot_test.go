package microvm_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// template is a VM cold booted, initialized and snapshotted once per test
// binary; the tests in this file restore clones of it.
type template struct {
	dir            string // the snapshot
	bootToHealth   time.Duration
	snapshotTook   time.Duration
	madeAt         time.Time
	a              *artifacts
	marker, unsync string // file contents the template wrote
}

var (
	templateOnce sync.Once
	tmpl         *template
	tmplErr      error
)

// snapshotTemplate returns the shared template snapshot, making it with a
// slot of pool the first time.
func snapshotTemplate(t testing.TB, rt *microvm.Runtime, pool *netns.Pool) *template {
	t.Helper()
	a := buildArtifacts(t)
	templateOnce.Do(func() { tmpl, tmplErr = makeTemplate(t, a, rt, pool) })
	if tmplErr != nil {
		t.Fatal(tmplErr)
	}
	return tmpl
}

func makeTemplate(t testing.TB, a *artifacts, rt *microvm.Runtime, pool *netns.Pool) (*template, error) {
	it := &iteration{TB: t}
	defer it.cleanup() // kills the snapshotted VM and releases its slot
	sb, err := tryStart(it, rt, pool, coldSpec(a, "template"))
	if err != nil {
		return nil, err
	}
	tp := &template{a: a, dir: filepath.Join(workDir, "template-snapshot"), marker: "made-in-template-" + randomHex(4)}
	tp.bootToHealth = sb.waitHealthy(t, 60*time.Second)
	sb.init(t, `{"defaultUser":"user","envVars":{"FROM_TEMPLATE":"yes"}}`)
	// One file synced to the disk overlay, one only in the guest's page
	// cache: both must be in every clone.
	sb.run(t, "user", "echo "+tp.marker+" > ~/marker && sync ~/marker && echo unsynced > ~/unsynced")
	tp.unsync = "unsynced"
	start := time.Now()
	if err := rt.Snapshot(context.Background(), sb.vm, tp.dir); err != nil {
		return nil, err
	}
	tp.snapshotTook, tp.madeAt = time.Since(start), time.Now()
	if st, err := sb.vm.(*microvm.VM).Status(context.Background()); err != nil || st != "postmigrate" {
		return nil, fmt.Errorf("after Snapshot the VM's status is %q (%v), want postmigrate (stopped for good)", st, err)
	}
	m, err := microvm.ReadManifest(tp.dir)
	if err != nil {
		return nil, err
	}
	t.Logf("template: cold boot → /health %s; Snapshot took %s (VM stopped %s)", tp.bootToHealth.Round(time.Millisecond),
		tp.snapshotTook.Round(time.Millisecond), time.Duration(m.SaveTime).Round(time.Microsecond))
	return tp, nil
}

// restoreSpec restores the template.
func (tp *template) restoreSpec(id string) runtime.Spec {
	return runtime.Spec{ID: id, Snapshot: tp.dir, CPUs: 1, MemoryMiB: 256, Kernel: tp.a.kernel.Image}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func TestSnapshotDirectory(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	files := map[string]func(os.FileInfo) error{
		"mem": func(fi os.FileInfo) error {
			if fi.Size() != 256<<20 {
				return fmt.Errorf("%d bytes, want the VM's 256 MiB", fi.Size())
			}
			if fi.Mode().Perm()&0o222 != 0 {
				return fmt.Errorf("mode %s, want read-only: restores never write it", fi.Mode())
			}
			return nil
		},
		"state": func(fi os.FileInfo) error {
			// RAM is in mem, not in the stream: the state is device state only.
			if fi.Size() == 0 || fi.Size() > 4<<20 {
				return fmt.Errorf("%d bytes, want device state only (0, 4 MiB]", fi.Size())
			}
			return nil
		},
		"rootfs.qcow2":  func(os.FileInfo) error { return nil },
		"manifest.json": func(os.FileInfo) error { return nil },
	}
	for name, check := range files {
		fi, err := os.Stat(filepath.Join(tp.dir, name))
		if err == nil {
			err = check(fi)
		}
		if err != nil {
			t.Errorf("snapshot %s: %v", name, err)
		}
	}
	// Nothing else: the transfer disk, above all, is each VM's own.
	entries, err := os.ReadDir(tp.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if files[e.Name()] == nil {
			t.Errorf("snapshot holds %s", e.Name())
		}
	}
	m, err := microvm.ReadManifest(tp.dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Hardware.TransferDisk != microvm.DefaultTransferDiskSize {
		t.Errorf("manifest records a transfer disk of %d bytes, want the cold boot's %d", m.Hardware.TransferDisk, microvm.DefaultTransferDiskSize)
	}
	if m.Hardware.MemoryMiB != 256 || m.Hardware.CPUs != 1 || m.Hardware.Kernel.Path != tp.a.kernel.Image || m.Hardware.QEMU == "" {
		t.Errorf("manifest hardware %+v: want 1 CPU, 256 MiB, kernel %s, a QEMU version", m.Hardware, tp.a.kernel.Image)
	}
	if entries, _ := os.ReadDir(filepath.Dir(tp.dir)); len(entries) > 0 {
		for _, e := range entries {
			if strings.Contains(e.Name(), ".tmp-") {
				t.Errorf("Snapshot left its work directory %s", e.Name())
			}
		}
	}
}

// TestRestoreClones restores two clones of one snapshot at once, in two slots,
// and checks each is a working, independent sandbox.
func TestRestoreClones(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	// Let the snapshot age, so a clone's clock visibly lags before /init.
	time.Sleep(time.Until(tp.madeAt.Add(3 * time.Second)))

	clones := make([]*sandbox, 2)
	took := make([]time.Duration, 2)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range clones {
		wg.Go(func() {
			clones[i], errs[i] = tryStart(t, rt, pool, tp.restoreSpec(fmt.Sprintf("clone-%d", i)))
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, sb := range clones {
		wg.Go(func() { took[i] = sb.waitHealthy(t, 30*time.Second) })
	}
	wg.Wait()
	t.Logf("restore (Start → first /health 204), 2 clones at once: %v", took)

	// Before /init a clone's clock is the template's, frozen at the save.
	lag := time.Since(guestClock(t, clones[0]))
	t.Logf("clone clock before /init lags the host by %s", lag.Round(time.Millisecond))
	if lag < 2*time.Second {
		t.Errorf("a clone's clock lags only %s before /init; the snapshot is %s old: is the clock test meaningful?", lag, time.Since(tp.madeAt))
	}
	randomBefore := []string{clones[0].run(t, "root", "od -An -tx1 -N16 /dev/urandom"), clones[1].run(t, "root", "od -An -tx1 -N16 /dev/urandom")}
	t.Logf("without reseeding, clones' first urandom bytes are the same: %v", randomBefore[0] == randomBefore[1])

	for _, sb := range clones {
		sb.init(t, entropyBody())
	}

	t.Run("clock matches the host after /init", func(t *testing.T) {
		for i, sb := range clones {
			before := time.Now()
			guest := guestClock(t, sb)
			after := time.Now()
			if guest.Before(before.Add(-time.Second)) || guest.After(after.Add(time.Second)) {
				t.Errorf("clone %d clock %s, host %s..%s: more than 1 s apart", i, guest.Format(time.RFC3339Nano), before.Format(time.RFC3339Nano), after.Format(time.RFC3339Nano))
			}
		}
	})

	t.Run("clones draw different random bytes after /init", func(t *testing.T) {
		a := clones[0].run(t, "user", "head -c 16 /dev/urandom | od -An -tx1")
		b := clones[1].run(t, "user", "head -c 16 /dev/urandom | od -An -tx1")
		if a == b {
			t.Errorf("both clones read %q from /dev/urandom", a)
		}
	})

	t.Run("clones have the template's files and settings", func(t *testing.T) {
		for i, sb := range clones {
			got := sb.run(t, "user", `cat ~/marker ~/unsynced; echo "$FROM_TEMPLATE"; id -un`)
			if want := tp.marker + "\n" + tp.unsync + "\nyes\nuser\n"; got != want {
				t.Errorf("clone %d printed %q, want %q", i, got, want)
			}
		}
	})

	t.Run("clones' disks are their own", func(t *testing.T) {
		clones[0].run(t, "user", "echo mine > ~/clone0 && sync")
		if got := clones[1].run(t, "user", "cat ~/clone0 2>/dev/null || echo absent"); got != "absent\n" {
			t.Errorf("clone 1 sees clone 0's file: %q", got)
		}
		if got := clones[0].run(t, "user", "cat ~/clone0"); got != "mine\n" {
			t.Errorf("clone 0 lost its own file: %q", got)
		}
	})

	t.Run("a clone is small (PSS)", func(t *testing.T) {
		for i, sb := range clones {
			st, err := rt.Stats(t.Context(), sb.vm)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("clone %d: RSS %d MiB, PSS %d MiB, CPU %s", i, st.RSS>>20, st.PSS>>20, st.CPUTime)
			// Shared snapshot pages count half: well under a cold boot's ~270 MiB.
			if st.PSS > 200<<20 {
				t.Errorf("clone %d PSS %d MiB: the snapshot memory is not shared", i, st.PSS>>20)
			}
		}
	})
}

// guestClock reads the guest's wall clock to the microsecond (busybox date
// has no %N; adjtimex reads the clock without changing it).
func guestClock(t testing.TB, sb *sandbox) time.Time {
	t.Helper()
	out := sb.run(t, "user", `adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {print s, u}'`)
	f := strings.Fields(out)
	if len(f) != 2 {
		t.Fatalf("adjtimex printed %q", out)
	}
	s, err1 := strconv.ParseInt(f[0], 10, 64)
	us, err2 := strconv.ParseInt(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("adjtimex printed %q", out)
	}
	return time.Unix(s, us*1000)
}

func TestKillLeavesNothing(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	sb := start(t, rt, pool, tp.restoreSpec("to-kill"))
	sb.waitHealthy(t, 30*time.Second)
	pid, dir := sb.vm.Pid(), filepath.Dir(sb.vm.(*microvm.VM).ConsoleLog())
	if err := rt.Kill(context.Background(), sb.vm); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.vm.Done():
	default:
		t.Error("Done is open after Kill returned")
	}
	if !processGone(pid) {
		t.Errorf("QEMU pid %d still runs after Kill", pid)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state directory %s after Kill: %v, want it gone", dir, err)
	}
	if ids, err := rt.List(context.Background()); err != nil || len(ids) != 0 {
		t.Errorf("List after Kill = %v, %v; want none", ids, err)
	}
	// The snapshot survives its clones.
	if _, err := microvm.ReadManifest(tp.dir); err != nil {
		t.Errorf("snapshot after a clone's Kill: %v", err)
	}
}

// TestSnapshotMismatch: a restore that would not reproduce the saved VM is
// refused before QEMU starts, with an error naming the difference.
func TestSnapshotMismatch(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)

	// A copy of the snapshot (hard links, and a disk overlay written since).
	touched := filepath.Join(t.TempDir(), "touched")
	if err := os.Mkdir(touched, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"mem", "state", "manifest.json", "rootfs.qcow2"} {
		if err := os.Link(filepath.Join(tp.dir, f), filepath.Join(touched, f)); err != nil {
			t.Fatal(err)
		}
	}
	disk := filepath.Join(touched, "rootfs.qcow2")
	os.Remove(disk)
	if b, err := os.ReadFile(filepath.Join(tp.dir, "rootfs.qcow2")); err != nil || os.WriteFile(disk, b, 0o600) != nil {
		t.Fatal("copy rootfs.qcow2", err)
	}

	for _, tc := range []struct {
		name   string
		change func(*runtime.Spec)
		want   string
	}{
		{"different memory size", func(s *runtime.Spec) { s.MemoryMiB = 512 }, "memory (MiB) is 256 in the snapshot, 512 asked"},
		{"different CPU count", func(s *runtime.Spec) { s.CPUs = 2 }, "CPU count is 1 in the snapshot, 2 asked"},
		{"another kernel", func(s *runtime.Spec) { s.Kernel = "/boot/other-vmlinux" }, "kernel is " + tp.a.kernel.Image + " in the snapshot, /boot/other-vmlinux asked"},
		{"a disk written since the save", func(s *runtime.Spec) { s.Snapshot = touched }, "disk overlay " + disk + " changed since the save"},
		{"no snapshot there", func(s *runtime.Spec) { s.Snapshot = t.TempDir() }, "manifest.json: no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := tp.restoreSpec("mismatch")
			tc.change(&spec)
			slot, err := pool.Acquire(context.Background(), netns.Policy{})
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Release(slot)
			spec.Slot = slot
			vm, err := rt.Start(context.Background(), spec)
			if err == nil {
				rt.Kill(context.Background(), vm)
				t.Fatalf("Start restored a snapshot that does not match (%s)", tc.name)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Start: %v\nwant an error containing %q", err, tc.want)
			}
			if ids, _ := rt.List(context.Background()); len(ids) != 0 {
				t.Errorf("a refused Start left state: %v", ids)
			}
		})
	}
}

// TestAdopt: a new Runtime on the same state root (a restarted node) finds the
// VMs of the old one and takes them over; a VM that died meanwhile is
// adopted as exited, and Kill removes what it left.
func TestAdopt(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	live := start(t, rt, pool, tp.restoreSpec("survivor"))
	dead := start(t, rt, pool, tp.restoreSpec("casualty"))
	live.waitHealthy(t, 30*time.Second)
	dead.waitHealthy(t, 30*time.Second)
	syscall.Kill(dead.vm.Pid(), syscall.SIGKILL)
	<-dead.vm.Done()

	// The old handles are dropped; only the state root remains.
	rt2, err := microvm.New(microvm.Config{Root: filepath.Dir(filepath.Dir(live.vm.(*microvm.VM).ConsoleLog()))})
	if err != nil {
		t.Fatal(err)
	}
	ids, err := rt2.List(context.Background())
	if err != nil || strings.Join(ids, " ") != "casualty survivor" {
		t.Fatalf("List = %v, %v; want casualty survivor", ids, err)
	}

	t.Run("a running VM", func(t *testing.T) {
		vm, err := rt2.Adopt(context.Background(), "survivor")
		if err != nil {
			t.Fatal(err)
		}
		if vm.Pid() != live.vm.Pid() || vm.Netns() != live.slot.Name || vm.StartedAt().IsZero() {
			t.Errorf("adopted pid %d netns %s started %s; want pid %d netns %s", vm.Pid(), vm.Netns(), vm.StartedAt(), live.vm.Pid(), live.slot.Name)
		}
		if st, err := vm.(*microvm.VM).Status(context.Background()); err != nil || st != "running" {
			t.Errorf("QMP status of the adopted VM = %q, %v; want running", st, err)
		}
		if _, err := rt2.Stats(context.Background(), vm); err != nil {
			t.Errorf("Stats of the adopted VM: %v", err)
		}
		if got := live.run(t, "user", "cat ~/marker"); got != tp.marker+"\n" {
			t.Errorf("the adopted VM's guest printed %q", got)
		}
		if err := rt2.Kill(context.Background(), vm); err != nil {
			t.Fatal(err)
		}
		<-live.vm.Done()
		if !processGone(live.vm.Pid()) {
			t.Errorf("QEMU pid %d runs after Kill of the adopted VM", live.vm.Pid())
		}
	})

	t.Run("a VM that died", func(t *testing.T) {
		vm, err := rt2.Adopt(context.Background(), "casualty")
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-vm.Done():
		case <-time.After(time.Second):
			t.Fatal("the adopted dead VM's Done is open")
		}
		if err := rt2.Kill(context.Background(), vm); err != nil {
			t.Fatal(err)
		}
		if ids, _ := rt2.List(context.Background()); len(ids) != 0 {
			t.Errorf("List after both Kills = %v, want none", ids)
		}
	})

	t.Run("an unknown id", func(t *testing.T) {
		if _, err := rt2.Adopt(context.Background(), "never-started"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Adopt of an id without state: %v, want os.ErrNotExist", err)
		}
	})
}

// BenchmarkRestoreToHealth reports the median time from Start (restore of a
// snapshot) to envd's first /health answer, one clone per iteration.
func BenchmarkRestoreToHealth(b *testing.B) {
	rt, pool := newRuntime(b), newPool(b)
	tp := snapshotTemplate(b, rt, pool)
	var took, starts []time.Duration
	n := 0
	for b.Loop() {
		func() {
			it := &iteration{TB: b}
			defer it.cleanup()
			n++
			sb := start(it, rt, pool, tp.restoreSpec(fmt.Sprintf("bench-%d", n)))
			starts = append(starts, time.Since(sb.started))
			took = append(took, sb.waitHealthy(it, 30*time.Second))
		}()
	}
	b.Logf("restore: Start returned after (median) %s; Start → first /health 204: %v", median(starts).Round(time.Millisecond), took)
	b.ReportMetric(float64(median(took).Microseconds())/1000, "ms-to-health(median)")
}
