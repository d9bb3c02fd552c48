package node_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/blob"
	"github.com/warren-sh/warren/internal/node"
)

// newBlobs is a blob store of the test's own, on the VM roots' file system.
func newBlobs(t testing.TB) *blob.Local {
	return &blob.Local{Root: newRoot() + "-blobs"}
}

// counterScript starts a background loop that counts into /tmp/count and
// prints its pid.
const counterScript = `setsid bash -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`

// counter reads the loop's count (0 before its first write); the loop must
// still run as pid.
func counter(t testing.TB, info *node.SandboxInfo, pid string) int {
	t.Helper()
	out := strings.TrimSpace(run(t, info, "kill -0 "+pid+" && { cat /tmp/count 2>/dev/null || echo 0; }"))
	n, err := strconv.Atoi(out)
	if err != nil {
		t.Fatalf("%s: /tmp/count is %q", info.ID, out)
	}
	return n
}

// countsOn fails unless the loop pid runs and counts past from.
func countsOn(t testing.TB, info *node.SandboxInfo, pid string, from int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := counter(t, info, pid)
		if n > from {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the loop (pid %s) stays at %d", info.ID, pid, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func pauseSandbox(t testing.TB, m *node.Manager, id string, memory bool) *node.PausedSandbox {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := m.Paused(ctx, id); !errors.Is(err, node.ErrNotFound) {
		t.Errorf("Paused %s before its pause: %v, want ErrNotFound", id, err)
	}
	began := time.Now()
	p, err := m.Pause(ctx, id, memory)
	if err != nil {
		t.Fatalf("Pause %s (memory %v): %v", id, memory, err)
	}
	t.Logf("Pause %s (memory %v): %s, %d MiB saved", id, memory, time.Since(began).Round(time.Millisecond), p.Bytes>>20)
	if p.Key != node.PausedKey(id) || p.Memory != memory || p.Bytes <= 0 {
		t.Errorf("Pause returned %+v", p)
	}
	// What a restart finds when the pause was not recorded.
	if found, err := m.Paused(ctx, id); err != nil || *found != *p {
		t.Errorf("Paused %s = %+v, %v; want what Pause returned, %+v", id, found, err, p)
	}
	return p
}

func resumeSandbox(t testing.TB, m *node.Manager, id, key string) *node.SandboxInfo {
	t.Helper()
	s := spec(id)
	s.Resume = key
	return create(t, m, s)
}

// TestPauseResume: a paused sandbox leaves List and frees its slot; Create
// with Resume brings back the same sandbox, its files, RAM and a running
// process, twice; a pause without memory keeps the disk; a node restart keeps
// what is paused.
func TestPauseResume(t *testing.T) {
	root, blobs := newRoot(), newBlobs(t)
	// One sandbox at a time: a resume needs the paused one's place.
	m := newManager(t, node.Config{Runtime: newRuntime(t, root), Blobs: blobs, MaxSandboxes: 1})
	const id = "pausee"
	info := create(t, m, spec(id))
	pid := strings.TrimSpace(run(t, info, "echo kept > ~/file && echo ram > /tmp/ram && "+counterScript))
	count := countsOn(t, info, pid, 0)

	p := pauseSandbox(t, m, id, true)
	if list, _ := m.List(t.Context()); len(list) != 0 {
		t.Errorf("List after Pause = %v, want empty", list)
	}
	if pids := qemuOf(root); len(pids) != 0 {
		t.Errorf("QEMU %v still runs after Pause", pids)
	}
	if err := m.Kill(t.Context(), id); !errors.Is(err, node.ErrNotFound) {
		t.Errorf("Kill of a paused sandbox: %v, want ErrNotFound", err)
	}

	for cycle := 1; cycle <= 2; cycle++ {
		info = resumeSandbox(t, m, id, p.Key)
		if info.ID != id {
			t.Fatalf("resumed as %s", info.ID)
		}
		if _, err := os.Stat(blobs.Path(p.Key)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cycle %d: the paused state is still there after the resume (%v)", cycle, err)
		}
		count = countsOn(t, info, pid, count)
		want := "kept\nram\n" + strings.Repeat("cycle\n", cycle-1)
		if got := run(t, info, "cat ~/file /tmp/ram; cat ~/cycle-* 2>/dev/null; true"); got != want {
			t.Errorf("cycle %d: files read %q, want %q", cycle, got, want)
		}
		run(t, info, "echo cycle > ~/cycle-"+strconv.Itoa(cycle))
		p = pauseSandbox(t, m, id, true)
	}

	// A restart of the node keeps the paused sandbox.
	m.Close()
	m = newManager(t, node.Config{Runtime: newRuntime(t, root), Blobs: blobs, MaxSandboxes: 1})
	info = resumeSandbox(t, m, id, p.Key)
	countsOn(t, info, pid, count)
	if got := run(t, info, "cat ~/file ~/cycle-2"); got != "kept\ncycle\n" {
		t.Errorf("after a restart the files read %q", got)
	}

	// Without memory: the disk is kept, RAM and processes are not.
	run(t, info, "echo unsynced-before-pause > ~/late")
	p = pauseSandbox(t, m, id, false)
	info = resumeSandbox(t, m, id, p.Key)
	if got := run(t, info, "cat ~/file ~/late; ls /tmp; grep -l 'i=\\$((i' /proc/[0-9]*/cmdline 2>/dev/null || true"); got != "kept\nunsynced-before-pause\n" {
		t.Errorf("after a pause without memory: %q, want the disk files only (no /tmp, no loop)", got)
	}
	if got := strings.TrimSpace(run(t, info, "echo $SANDBOX_NAME; id -un")); got != id+"\nuser" {
		t.Errorf("after a cold resume env and user are %q", got)
	}
	if u, err := blobs.Usage(t.Context()); err != nil || u["paused"] != 0 {
		t.Errorf("blob usage after the last resume = %v, %v; want nothing paused", u, err)
	}
}

// TestPauseKillRace: a Kill during a Pause waits for it, and either the
// Pause wins (the sandbox is saved, Kill finds nothing) or it fails and the
// Kill stops the sandbox; nothing runs afterwards either way.
func TestPauseKillRace(t *testing.T) {
	root, blobs := newRoot(), newBlobs(t)
	m := newManager(t, node.Config{Runtime: newRuntime(t, root), Blobs: blobs})
	create(t, m, spec("race"))
	var wg sync.WaitGroup
	var pauseErr, killErr error
	wg.Go(func() { _, pauseErr = m.Pause(context.Background(), "race", true) })
	time.Sleep(20 * time.Millisecond)
	wg.Go(func() { killErr = m.Kill(context.Background(), "race") })
	wg.Wait()
	t.Logf("Pause: %v; Kill: %v", pauseErr, killErr)
	if pauseErr == nil && !errors.Is(killErr, node.ErrNotFound) {
		t.Errorf("the Pause won, and Kill answered %v, want ErrNotFound", killErr)
	}
	if pauseErr != nil && killErr != nil {
		t.Errorf("both failed: Pause %v, Kill %v", pauseErr, killErr)
	}
	if list, _ := m.List(t.Context()); len(list) != 0 {
		t.Errorf("List = %v, want empty", list)
	}
	if pids := qemuOf(root); len(pids) != 0 {
		t.Errorf("QEMU %v runs", pids)
	}
	if err := m.DeletePaused(t.Context(), node.PausedKey("race")); err != nil {
		t.Error(err)
	}
	if err := m.DeletePaused(t.Context(), node.PausedKey("race")); err != nil {
		t.Errorf("a second DeletePaused: %v, want nil", err)
	}
}

// TestSnapshotFork: Snapshot keeps the source running; sandboxes created from
// the snapshot have its files and RAM, are independent of each other and of
// the source, and keep working (and pausing) after DeleteSnapshot.
func TestSnapshotFork(t *testing.T) {
	blobs := newBlobs(t)
	m := newManager(t, node.Config{Blobs: blobs})
	src := create(t, m, spec("snap-src"))
	pid := strings.TrimSpace(run(t, src, "echo from-source > ~/file && echo ram > /tmp/ram && "+counterScript))
	countsOn(t, src, pid, 0)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	began := time.Now()
	art, err := m.Snapshot(ctx, "snap-src", "snapshots/snap-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Snapshot: %s into %s", time.Since(began).Round(time.Millisecond), art)
	if _, err := m.Snapshot(ctx, "snap-src", "snapshots/snap-1"); err == nil {
		t.Error("a second Snapshot under the same key succeeded")
	}
	run(t, src, "echo after > ~/after")
	count := countsOn(t, src, pid, 0)

	forks := make([]*node.SandboxInfo, 2)
	for i := range forks {
		s := spec("fork-" + strconv.Itoa(i))
		s.Artifact = art
		forks[i] = create(t, m, s)
	}
	for i, f := range forks {
		if got := run(t, f, "cat ~/file /tmp/ram; cat ~/after 2>/dev/null || echo absent; echo $SANDBOX_NAME"); got != "from-source\nram\nabsent\nfork-"+strconv.Itoa(i)+"\n" {
			t.Errorf("fork %d reads %q", i, got)
		}
		countsOn(t, f, pid, 0)
	}
	run(t, forks[0], "echo mine > ~/fork0")
	for _, other := range []*node.SandboxInfo{forks[1], src} {
		if got := run(t, other, "cat ~/fork0 2>/dev/null || echo absent"); got != "absent\n" {
			t.Errorf("%s sees fork-0's file: %q", other.ID, got)
		}
	}

	if err := m.DeleteSnapshot(ctx, "snapshots/snap-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(art); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the snapshot is there after DeleteSnapshot (%v)", err)
	}
	if err := m.DeleteSnapshot(ctx, "snapshots/snap-1"); err != nil {
		t.Errorf("a second DeleteSnapshot: %v", err)
	}
	for _, f := range forks {
		run(t, f, "dd if=/dev/urandom of=~/big bs=1M count=8 status=none && sync")
	}
	// A fork pauses and resumes without its snapshot.
	p := pauseSandbox(t, m, "fork-1", true)
	f1 := resumeSandbox(t, m, "fork-1", p.Key)
	if got := run(t, f1, "cat ~/file; ls ~/big"); !strings.HasPrefix(got, "from-source\n") {
		t.Errorf("the resumed fork reads %q", got)
	}
	countsOn(t, src, pid, count)
	if u, err := blobs.Usage(ctx); err != nil || u["snapshots"] != 0 {
		t.Errorf("blob usage = %v, %v; want no snapshots left", u, err)
	}
	if _, err := os.Stat(filepath.Join(blobs.Root, "snapshots")); err != nil {
		t.Logf("snapshots prefix: %v", err)
	}
}

// TestPausedStateSynced: a pause answers before its state is on the disk,
// then syncs it and marks it (the "synced" file); a state saved in another
// boot of the host resumes only when marked, and a refused resume leaves it
// in place. The other boot is played by rewriting the record's boot ID.
func TestPausedStateSynced(t *testing.T) {
	root, blobs := newRoot(), newBlobs(t)
	var starts startLog
	m := newManager(t, node.Config{Runtime: newRuntime(t, root), Blobs: blobs, MaxSandboxes: 1, OnStart: starts.add})
	const id = "synced"
	info := create(t, m, spec(id))
	run(t, info, "echo kept > ~/file")
	p := pauseSandbox(t, m, id, true)
	dir := blobs.Path(p.Key)
	marker := filepath.Join(dir, "synced")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not marked synced 30 s after the pause", dir)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Another boot, and the mark gone: the resume refuses, the state stays.
	record := filepath.Join(dir, "sandbox.json")
	b, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	bootField := `"bootId": "` + strings.TrimSpace(string(boot)) + `"`
	if !strings.Contains(string(b), bootField) {
		t.Fatalf("the paused record has no %s:\n%s", bootField, b)
	}
	other := strings.Replace(string(b), bootField, `"bootId": "00000000-0000-0000-0000-000000000000"`, 1)
	if err := os.WriteFile(record, []byte(other), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(marker); err != nil {
		t.Fatal(err)
	}
	s := spec(id)
	s.Resume = p.Key
	if _, err := m.Create(t.Context(), s); !errors.Is(err, node.ErrUnsynced) {
		t.Fatalf("resume of another boot's unsynced state: %v, want ErrUnsynced", err)
	}
	if found, err := m.Paused(t.Context(), id); err != nil || found.Bytes != p.Bytes {
		t.Fatalf("after the refused resume: Paused = %+v, %v; want the state as saved (%d bytes)", found, err, p.Bytes)
	}

	// Marked, the same state resumes whole.
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	info = resumeSandbox(t, m, id, p.Key)
	if got := run(t, info, "cat ~/file"); got != "kept\n" {
		t.Errorf("after the resume ~/file reads %q", got)
	}
	starts.want(t, "restore ok", "resume failed", "resume ok")
}

// startLog records what Config.OnStart is told.
type startLog struct {
	mu   sync.Mutex
	seen []string
}

func (l *startLog) add(kind string, took time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	result := "ok"
	if err != nil {
		result = "failed"
	}
	if took <= 0 {
		result += " (no duration)"
	}
	l.seen = append(l.seen, kind+" "+result)
}

func (l *startLog) want(t *testing.T, want ...string) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if !slices.Equal(l.seen, want) {
		t.Errorf("OnStart saw %q, want %q", l.seen, want)
	}
}
