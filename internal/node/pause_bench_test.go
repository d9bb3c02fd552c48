package node_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// BenchmarkPauseResume measures Manager.Pause (with memory) and the resume
// (Create with Resume, until envd accepted /init) of a base-template sandbox
// whose guest dirtied 64 or 256 MiB of RAM (files in its tmpfs), and beside
// them the resume's floor in the same run: a bare runtime Start (consuming)
// of a copy of the same paused state until envd first answers /health. A
// clone's RAM is private, so its pause writes the RAM into the migration
// stream, and the resume reads it back into anonymous memory. Sizes
// alternate, one sandbox at a time.
//
//	go test ./internal/node/ -run '^$' -bench PauseResume -benchtime 1x
func BenchmarkPauseResume(b *testing.B) {
	const n = 5
	sizes := []int{64, 256}
	baseArtifact(b)
	blobs := newBlobs(b)
	m := newManager(b, node.Config{Blobs: blobs})
	bare := newRuntime(b, newRoot())
	scratch := newRoot() + "-floor"
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		b.Fatal(err)
	}
	logLoad(b)

	type series struct{ pause, resume, floor []time.Duration }
	got := map[int]*series{}
	for _, size := range sizes {
		got[size] = &series{}
	}
	seq := 0
	for b.Loop() {
		for range n {
			for _, size := range sizes {
				seq++
				p, r, f := timePauseResume(b, m, bare, blobs.Path, scratch, fmt.Sprintf("bench-pause-%d", seq), size)
				s := got[size]
				s.pause, s.resume, s.floor = append(s.pause, p), append(s.resume, r), append(s.floor, f)
			}
		}
	}
	b.ReportMetric(0, "ns/op")
	for _, size := range sizes {
		s := got[size]
		for _, d := range [][]time.Duration{s.pause, s.resume, s.floor} {
			slices.Sort(d)
		}
		b.Logf("%d MiB dirtied: pause %v; resume %v; floor %v", size, rounded(s.pause), rounded(s.resume), rounded(s.floor))
		b.ReportMetric(ms(percentile(s.pause, 50)), fmt.Sprintf("pause-%dM-p50-ms", size))
		b.ReportMetric(ms(percentile(s.resume, 50)), fmt.Sprintf("resume-%dM-p50-ms", size))
		b.ReportMetric(ms(percentile(s.floor, 50)), fmt.Sprintf("floor-%dM-p50-ms", size))
	}
}

// timePauseResume creates sandbox id, dirties size MiB of its RAM, pauses it,
// restores a copy of the paused state on the bare runtime (the floor),
// resumes it and kills it.
func timePauseResume(b *testing.B, m *node.Manager, bare *microvm.Runtime, blobPath func(string) string, scratch, id string, size int) (pause, resume, floor time.Duration) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	info, err := m.Create(ctx, spec(id))
	if err != nil {
		b.Fatalf("Create %s: %v", id, err)
	}
	// Non-zero pages (a zero page costs the stream a flag only), half in
	// each tmpfs: one holds at most half the guest's RAM.
	run(b, info, fmt.Sprintf("yes warren | head -c %[1]dM > /dev/shm/dirty && yes warren | head -c %[1]dM > /tmp/dirty", size/2))

	began := time.Now()
	p, err := m.Pause(ctx, id, true)
	if err != nil {
		b.Fatalf("Pause %s: %v", id, err)
	}
	pause = time.Since(began)

	// The floor: the same saved VM, restored bare from a copy.
	vmCopy := filepath.Join(scratch, id)
	if out, err := exec.Command("cp", "-a", "--sparse=always", filepath.Join(blobPath(p.Key), "vm"), vmCopy).CombinedOutput(); err != nil {
		b.Fatalf("copy the paused state: %v\n%s", err, out)
	}
	slot, err := m.Slots().Acquire(ctx, netns.Policy{})
	if err != nil {
		b.Fatal(err)
	}
	began = time.Now()
	vm, err := bare.Start(ctx, runtime.Spec{ID: id, Slot: slot, Snapshot: vmCopy, Resume: true})
	if err != nil {
		b.Fatalf("bare restore of %s: %v", id, err)
	}
	waitHealth(b, vm, slot)
	floor = time.Since(began)
	killVM(b, bare, vm)
	if err := m.Slots().Release(slot); err != nil {
		b.Error(err)
	}

	s := spec(id)
	s.Resume = p.Key
	began = time.Now()
	info, err = m.Create(ctx, s)
	if err != nil {
		b.Fatalf("resume %s: %v", id, err)
	}
	resume = time.Since(began)
	if out := run(b, info, "cat /dev/shm/dirty /tmp/dirty | wc -c"); out != fmt.Sprintf("%d\n", size<<20) {
		b.Errorf("%s: the dirtied file after the resume: %q", id, out)
	}
	if err := m.Kill(ctx, id); err != nil {
		b.Fatalf("Kill %s: %v", id, err)
	}
	return pause, resume, floor
}
