package node_test

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/transfer"
)

// TestTransferDisk: every running sandbox has its VM's transfer disk open
// (Manager.TransferDisk), whose slots the guest reads as the host put them;
// a pause closes it and a resume, with memory or without, opens a new one;
// a kill closes it.
func TestTransferDisk(t *testing.T) {
	m := newManager(t, node.Config{Blobs: newBlobs(t), MaxSandboxes: 1})
	const id = "transfer"
	info := create(t, m, spec(id))
	d := checkTransfer(t, m, info)

	for _, memory := range []bool{true, false} {
		p := pauseSandbox(t, m, id, memory)
		if _, _, err := d.Put([]byte("late")); !errors.Is(err, transfer.ErrClosed) {
			t.Errorf("Put on the transfer disk of a sandbox paused (memory %v): %v, want ErrClosed", memory, err)
		}
		if got := m.TransferDisk(id); got != nil {
			t.Errorf("TransferDisk of a paused sandbox = %p, want nil", got)
		}
		info = resumeSandbox(t, m, id, p.Key)
		d = checkTransfer(t, m, info)
	}

	if err := m.Kill(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	if _, _, err := d.Put([]byte("late")); !errors.Is(err, transfer.ErrClosed) {
		t.Errorf("Put on the transfer disk of a killed sandbox: %v, want ErrClosed", err)
	}
	if got := m.TransferDisk(id); got != nil {
		t.Errorf("TransferDisk of a killed sandbox = %p, want nil", got)
	}
}

// checkTransfer fails unless the running sandbox has a transfer disk whose
// slots the guest reads (with O_DIRECT, from the device with the
// transfer disk's serial) as the host Put a random 3 MiB into them. It
// returns the disk, its slots released.
func checkTransfer(t testing.TB, m *node.Manager, info *node.SandboxInfo) *transfer.Disk {
	t.Helper()
	d := m.TransferDisk(info.ID)
	if d == nil {
		t.Fatalf("%s: TransferDisk = nil for a running sandbox", info.ID)
	}
	free := d.Free()
	data := make([]byte, 3*transfer.SlotSize)
	rand.Read(data)
	var offs []int64
	var script strings.Builder
	fmt.Fprintf(&script, `dev=$(for b in /sys/block/*; do [ "$(cat $b/serial 2>/dev/null)" = %s ] && echo ${b##*/}; done)`, transfer.Serial)
	for p := range slices.Chunk(data, transfer.SlotSize) {
		off, ok, err := d.Put(p)
		if err != nil || !ok {
			t.Fatalf("%s: Put: %v, %v", info.ID, ok, err)
		}
		offs = append(offs, off)
		fmt.Fprintf(&script, "; sudo dd if=/dev/$dev bs=%d skip=%d count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1",
			transfer.SlotSize, off/transfer.SlotSize)
	}
	var want strings.Builder
	for p := range slices.Chunk(data, transfer.SlotSize) {
		sum := sha256.Sum256(p)
		want.WriteString(hex.EncodeToString(sum[:]) + "\n")
	}
	if got := run(t, info, script.String()); got != want.String() {
		t.Errorf("%s: the guest reads the slots %v with sha256 sums\n%s\nthe host put\n%s", info.ID, offs, got, want.String())
	}
	d.Release(offs...)
	if d.Free() != free {
		t.Errorf("%s: %d slots free after the release, %d before the puts", info.ID, d.Free(), free)
	}
	return d
}
