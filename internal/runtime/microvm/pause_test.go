package microvm_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// guestState is what a test puts into a guest to see whether a pause kept it.
type guestState struct {
	value string // in /tmp (tmpfs: the guest's RAM)
	pid   string // a counter process that writes /tmp/count
	count int    // its count when last read
}

// plant writes a value into the guest's RAM and starts a counter process.
func plant(t *testing.T, sb *sandbox) *guestState {
	t.Helper()
	g := &guestState{value: "in-ram-" + randomHex(4)}
	g.pid = strings.TrimSpace(sb.run(t, "user", "echo "+g.value+" > /tmp/value && "+
		`setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`))
	time.Sleep(500 * time.Millisecond)
	g.count = readCount(t, sb, g.pid)
	return g
}

// check fails the test unless the guest still has the value and the same
// counter process, which has counted on.
func (g *guestState) check(t *testing.T, sb *sandbox) {
	t.Helper()
	if got := strings.TrimSpace(sb.run(t, "user", "cat /tmp/value")); got != g.value {
		t.Errorf("/tmp/value is %q, want %q: the RAM was not kept", got, g.value)
	}
	before := g.count
	deadline := time.Now().Add(10 * time.Second)
	for g.count <= before && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		g.count = readCount(t, sb, g.pid)
	}
	if g.count <= before {
		t.Errorf("counter pid %s stays at %d: it does not run", g.pid, g.count)
	}
}

// readCount reads the counter's count, failing the test unless pid runs.
func readCount(t *testing.T, sb *sandbox, pid string) int {
	t.Helper()
	out := sb.run(t, "user", "kill -0 "+pid+" 2>/dev/null && echo alive || echo gone; cat /tmp/count")
	alive, count, _ := strings.Cut(strings.TrimSpace(out), "\n")
	if alive != "alive" {
		t.Fatalf("counter pid %s is gone", pid)
	}
	n, err := strconv.Atoi(strings.TrimSpace(count))
	if err != nil {
		t.Fatalf("/tmp/count is %q", count)
	}
	return n
}

// pause snapshots sb's VM into dir, kills it and releases its slot.
func pause(t *testing.T, rt *microvm.Runtime, it *iteration, sb *sandbox, dir string) {
	t.Helper()
	start := time.Now()
	if err := rt.Snapshot(context.Background(), sb.vm, dir); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	it.cleanup()
	m, err := microvm.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pause: Snapshot took %s (VM stopped %s), memory %s", took.Round(time.Millisecond), time.Duration(m.SaveTime).Round(time.Millisecond), m.Memory)
}

// resume starts dir as the VM id, consuming it, and waits for envd.
func resume(t *testing.T, rt *microvm.Runtime, pool *netns.Pool, it *iteration, id, dir string) *sandbox {
	t.Helper()
	sb := start(it, rt, pool, runtime.Spec{ID: id, Snapshot: dir, Resume: true})
	took := sb.waitHealthy(t, 60*time.Second)
	t.Logf("resume: Start → first /health %s", took.Round(time.Millisecond))
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after a resume the snapshot %s is still there (%v)", dir, err)
	}
	sb.init(t, entropyBody())
	return sb
}

// TestPauseResume pauses a clone of the template (its RAM goes into the
// stream) and resumes it, consuming the snapshot, twice; then pauses it
// without memory and resumes it by a cold boot on its disk, which gives it a
// RAM file of its own, and pauses and resumes it twice more by handing that
// file over. Memory, disk and a running process survive every cycle with
// memory; a resume that fails keeps the saved state; nothing is left behind.
func TestPauseResume(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	saved := t.TempDir()
	const id = "pausee"

	it := &iteration{TB: t}
	defer func() { it.cleanup() }()
	sb := start(it, rt, pool, tp.restoreSpec(id))
	sb.waitHealthy(t, 30*time.Second)
	sb.init(t, entropyBody())
	g := plant(t, sb)
	sb.run(t, "user", "echo on-disk > ~/disk && echo unsynced > ~/unsynced-disk && sync ~/disk")

	n := 0
	cycle := func(want microvm.MemoryForm) {
		t.Helper()
		n++
		dir := filepath.Join(saved, "pause-"+strconv.Itoa(n))
		pause(t, rt, it, sb, dir)
		if m, _ := microvm.ReadManifest(dir); m.Memory != want {
			t.Errorf("pause %d: memory %q, want %q", n, m.Memory, want)
		}
		if _, err := os.Stat(filepath.Join(dir, "mem")); (err == nil) != (want == microvm.MemoryInFile) {
			t.Errorf("pause %d: mem file: %v", n, err)
		}
		it = &iteration{TB: t}
		sb = resume(t, rt, pool, it, id, dir)
		g.check(t, sb)
		if got := sb.run(t, "user", "cat ~/disk ~/unsynced-disk"); got != "on-disk\nunsynced\n" {
			t.Errorf("after resume %d the disk files read %q", n, got)
		}
		sb.run(t, "user", "echo "+strconv.Itoa(n)+" >> ~/cycles && echo "+strconv.Itoa(n)+" >> /tmp/cycles")
	}
	// A clone's RAM is a private mapping of the template's, and a VM
	// restored from the stream has anonymous RAM: into the stream both times.
	cycle(microvm.MemoryInState)
	cycle(microvm.MemoryInState)
	if got := sb.run(t, "user", "cat ~/cycles /tmp/cycles"); got != "1\n2\n1\n2\n" {
		t.Errorf("after two cycles the files read %q", got)
	}

	// Without memory: the guest syncs, the disk alone is saved, and a resume
	// cold boots on it.
	sb.run(t, "root", "echo synced > /home/user/synced && sync")
	dir := filepath.Join(saved, "disk-only")
	if err := rt.SaveDisk(context.Background(), sb.vm, dir); err != nil {
		t.Fatal(err)
	}
	it.cleanup()
	if m, err := microvm.ReadManifest(dir); err != nil || m.Memory != microvm.NoMemory {
		t.Fatalf("SaveDisk manifest %+v, %v; want memory none", m, err)
	}
	it = &iteration{TB: t}
	sb = resume(t, rt, pool, it, id, dir)
	if got := sb.run(t, "user", "cat ~/disk ~/cycles ~/synced; ls /tmp"); got != "on-disk\n1\n2\nsynced\n" {
		t.Errorf("after a resume without memory the home files and /tmp read %q, want the disk files and an empty /tmp", got)
	}

	// The cold-booted VM owns its RAM file: its pauses hand it over.
	g = plant(t, sb)
	n = 2
	cycle(microvm.MemoryInFile)

	t.Run("a failed resume keeps the saved state", func(t *testing.T) {
		dir := filepath.Join(saved, "broken")
		if err := rt.Snapshot(context.Background(), sb.vm, dir); err != nil {
			t.Fatal(err)
		}
		it.cleanup()
		state := filepath.Join(dir, "state")
		good, err := os.ReadFile(state)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(state, []byte("not a migration stream"), 0o600); err != nil {
			t.Fatal(err)
		}
		slot, err := pool.Acquire(context.Background(), netns.Policy{})
		if err != nil {
			t.Fatal(err)
		}
		vm, err := rt.Start(context.Background(), runtime.Spec{ID: id, Snapshot: dir, Resume: true, Slot: slot})
		pool.Release(slot)
		if err == nil {
			rt.Kill(context.Background(), vm)
			t.Fatal("a resume from a broken device state succeeded")
		}
		t.Logf("Start: %v", err)
		for _, f := range []string{"mem", "rootfs.qcow2", "manifest.json"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				t.Errorf("after a failed resume: %v", err)
			}
		}
		if ids, _ := rt.List(context.Background()); len(ids) != 0 {
			t.Errorf("a failed resume left VM state: %v", ids)
		}
		if err := os.WriteFile(state, good, 0o600); err != nil {
			t.Fatal(err)
		}
		it = &iteration{TB: t}
		sb = resume(t, rt, pool, it, id, dir)
		g.check(t, sb)
	})
	cycle(microvm.MemoryInFile)
	if got := sb.run(t, "user", "cat ~/cycles /tmp/cycles"); got != "1\n2\n3\n4\n3\n4\n" {
		t.Errorf("at the end the files read %q", got)
	}
	it.cleanup()

	if ids, err := rt.List(context.Background()); err != nil || len(ids) != 0 {
		t.Errorf("List after the last Kill = %v, %v; want none", ids, err)
	}
	if entries, _ := os.ReadDir(saved); len(entries) != 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("saved states left: %v (resumes consume theirs)", names)
	}
}

// TestCheckpoint checkpoints a running VM, which continues (its disk still
// writable), and restores the checkpoint twice: each copy has the files and
// RAM as of the checkpoint, and runs on after the checkpoint is deleted.
func TestCheckpoint(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	src := start(t, rt, pool, tp.restoreSpec("source"))
	src.waitHealthy(t, 30*time.Second)
	src.init(t, entropyBody())
	g := plant(t, src)
	src.run(t, "user", "echo before > ~/before && echo unsynced > ~/unsynced-before")

	dir := filepath.Join(t.TempDir(), "checkpoint")
	began := time.Now()
	if err := rt.Checkpoint(context.Background(), src.vm, dir); err != nil {
		t.Fatal(err)
	}
	m, err := microvm.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Checkpoint took %s (VM stopped %s)", time.Since(began).Round(time.Millisecond), time.Duration(m.SaveTime).Round(time.Millisecond))
	if m.Memory != microvm.MemoryInState {
		t.Errorf("checkpoint memory %q, want %q", m.Memory, microvm.MemoryInState)
	}

	t.Run("the source runs on and writes its disk", func(t *testing.T) {
		if st, err := src.vm.(*microvm.VM).Status(context.Background()); err != nil || st != "running" {
			t.Fatalf("source status after Checkpoint = %q, %v; want running", st, err)
		}
		g.check(t, src)
		src.run(t, "user", "echo after > ~/after && sync ~/after && echo after > /tmp/after")
		if got := src.run(t, "user", "cat ~/after"); got != "after\n" {
			t.Errorf("source reads %q back", got)
		}
	})

	copies := make([]*sandbox, 2)
	for i := range copies {
		copies[i] = start(t, rt, pool, runtime.Spec{ID: "copy-" + strconv.Itoa(i), Snapshot: dir})
		copies[i].waitHealthy(t, 60*time.Second)
		copies[i].init(t, entropyBody())
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	for i, c := range copies {
		want := "before\nunsynced\n" + g.value + "\nabsent\n"
		if got := c.run(t, "user", "cat ~/before ~/unsynced-before /tmp/value; cat ~/after 2>/dev/null || echo absent"); got != want {
			t.Errorf("copy %d reads %q, want the checkpoint's files %q", i, got, want)
		}
		cg := *g
		cg.check(t, c) // the counter runs in each copy, with the same pid
	}
	copies[0].run(t, "user", "echo mine > ~/only0 && sync")
	if got := copies[1].run(t, "user", "cat ~/only0 2>/dev/null || echo absent"); got != "absent\n" {
		t.Errorf("copy 1 sees copy 0's file: %q", got)
	}
	if got := src.run(t, "user", "cat ~/only0 2>/dev/null || echo absent"); got != "absent\n" {
		t.Errorf("the source sees copy 0's file: %q", got)
	}
	for i, c := range copies {
		st, err := rt.Stats(context.Background(), c.vm)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("copy %d: RSS %d MiB, PSS %d MiB", i, st.RSS>>20, st.PSS>>20)
	}
}
