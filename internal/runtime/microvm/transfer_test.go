package microvm_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/transfer"
)

// findTransfer prints the guest's block device whose serial is the transfer
// disk's (as transfer.OpenDevice finds it), or nothing.
const findTransfer = `for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = ` + transfer.Serial + ` ] && echo ${d##*/}; done; true`

// rootDevice prints the device / is mounted from, and its type.
const rootDevice = `awk '$2 == "/" {print $1, $3}' /proc/mounts`

// TestTransferDisk: a VM's transfer disk is its second disk, /dev/vdb by its
// serial, with the root disk still /dev/vda; what the host Puts into slots
// the guest reads back with O_DIRECT; a snapshot keeps no transfer file, and
// the VM resumed from it has a new, empty one that works the same.
func TestTransferDisk(t *testing.T) {
	rt, pool := newRuntime(t), newPool(t)
	tp := snapshotTemplate(t, rt, pool)
	it := &iteration{TB: t}
	defer func() { it.cleanup() }()
	sb := start(it, rt, pool, tp.restoreSpec("transfer"))
	sb.waitHealthy(t, 30*time.Second)
	sb.init(t, entropyBody())

	checkDevices := func(t *testing.T, sb *sandbox) {
		t.Helper()
		if got := strings.TrimSpace(sb.run(t, "root", rootDevice)); got != "/dev/vda ext4" {
			t.Errorf("/ is mounted from %q, want /dev/vda ext4", got)
		}
		if got := strings.TrimSpace(sb.run(t, "root", findTransfer)); got != "vdb" {
			t.Errorf("the device with serial %s is %q, want vdb", transfer.Serial, got)
		}
	}
	checkDevices(t, sb)
	offs := putAndRead(t, sb, checkFresh(t, sb.vm))

	dir := filepath.Join(t.TempDir(), "paused")
	if err := rt.Snapshot(context.Background(), sb.vm, dir); err != nil {
		t.Fatal(err)
	}
	it.cleanup()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !slices.Contains([]string{"manifest.json", "mem", "rootfs.qcow2", "state"}, e.Name()) {
			t.Errorf("the snapshot holds %s: only its memory, state, disk and manifest belong there", e.Name())
		}
	}
	m, err := microvm.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Hardware.TransferDisk != microvm.DefaultTransferDiskSize {
		t.Errorf("the manifest records a transfer disk of %d bytes, want %d", m.Hardware.TransferDisk, microvm.DefaultTransferDiskSize)
	}

	resumed := start(it, rt, pool, runtime.Spec{ID: "transfer", Snapshot: dir, Resume: true})
	resumed.waitHealthy(t, 60*time.Second)
	resumed.init(t, entropyBody())
	checkDevices(t, resumed)
	second := checkFresh(t, resumed.vm)
	// The slots the first VM's host wrote read as zeros: a new disk.
	zero := sha256.Sum256(make([]byte, transfer.SlotSize))
	for _, off := range offs {
		if got := readSlot(t, resumed, off); got != hex.EncodeToString(zero[:]) {
			t.Errorf("the resumed VM reads slot %d as %s, want zeros", off, got)
		}
	}
	putAndRead(t, resumed, second)
}

// TestTransferDiskOldSnapshot: a snapshot of a VM without a transfer disk
// (made before VMs had one) still restores, without one.
func TestTransferDiskOldSnapshot(t *testing.T) {
	a := buildArtifacts(t)
	old, rt, pool := newRuntime(t), newRuntime(t), newPool(t)
	microvm.SetTransferDiskSize(old, 0)
	it := &iteration{TB: t}
	defer func() { it.cleanup() }()
	sb := start(it, old, pool, coldSpec(a, "old"))
	sb.waitHealthy(t, 60*time.Second)
	if sb.vm.TransferDisk() != "" {
		t.Fatalf("a VM without a transfer disk says it has %s", sb.vm.TransferDisk())
	}
	dir := filepath.Join(t.TempDir(), "old")
	if err := old.Snapshot(context.Background(), sb.vm, dir); err != nil {
		t.Fatal(err)
	}
	it.cleanup()
	raw, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), "transferDisk") {
		t.Fatalf("the manifest of a VM without a transfer disk names one, unlike manifests from before the disk:\n%s", raw)
	}

	restored := start(t, rt, pool, runtime.Spec{ID: "restored", Snapshot: dir})
	restored.waitHealthy(t, 60*time.Second)
	restored.init(t, entropyBody())
	if p := restored.vm.TransferDisk(); p != "" {
		t.Errorf("the restore of a snapshot without a transfer disk has one: %s", p)
	}
	if got := strings.TrimSpace(restored.run(t, "root", rootDevice)); got != "/dev/vda ext4" {
		t.Errorf("/ is mounted from %q, want /dev/vda ext4", got)
	}
	if got := strings.TrimSpace(restored.run(t, "root", findTransfer)); got != "" {
		t.Errorf("the guest has a transfer disk %q", got)
	}
}

// checkFresh checks that vm's transfer disk is a new file of the default
// size with no blocks written, and returns its path.
func checkFresh(t *testing.T, vm runtime.VM) string {
	t.Helper()
	p := vm.TransferDisk()
	if p == "" {
		t.Fatal("the VM has no transfer disk")
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != microvm.DefaultTransferDiskSize {
		t.Errorf("transfer disk %s: %d bytes, want %d", p, fi.Size(), microvm.DefaultTransferDiskSize)
	}
	if blocks := fi.Sys().(*syscall.Stat_t).Blocks; blocks != 0 {
		t.Errorf("transfer disk %s: %d blocks allocated, want none (sparse, empty)", p, blocks)
	}
	return p
}

// putAndRead has the host Put a random 3 MiB into the transfer disk at path,
// and the guest read each slot back with O_DIRECT; it returns the slots.
func putAndRead(t *testing.T, sb *sandbox, path string) []int64 {
	t.Helper()
	d, err := transfer.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	data := make([]byte, 3*transfer.SlotSize)
	rand.Read(data)
	var offs []int64
	for p := range slices.Chunk(data, transfer.SlotSize) {
		off, ok, err := d.Put(p)
		if err != nil || !ok {
			t.Fatalf("Put: %d, %v, %v", off, ok, err)
		}
		offs = append(offs, off)
		want := sha256.Sum256(p)
		if got := readSlot(t, sb, off); got != hex.EncodeToString(want[:]) {
			t.Errorf("the guest reads slot %d with sha256 %s, the host put %x", off, got, want)
		}
	}
	return offs
}

// readSlot returns the sha256 of the slot at off as the guest reads it from
// its transfer disk with O_DIRECT.
func readSlot(t *testing.T, sb *sandbox, off int64) string {
	t.Helper()
	script := fmt.Sprintf(`dev=$(%s); dd if=/dev/$dev bs=%d skip=%d count=1 iflag=direct 2>/dev/null | sha256sum`,
		findTransfer, transfer.SlotSize, off/transfer.SlotSize)
	sum, _, _ := strings.Cut(sb.run(t, "root", script), " ")
	return sum
}
