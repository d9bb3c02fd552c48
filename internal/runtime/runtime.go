// Package runtime is the boundary between a node and the virtual machines that
// hold its sandboxes. A Runtime starts one VM per sandbox inside the sandbox's
// network slot (internal/netns), snapshots it, and stops it; drivers live in
// subpackages (microvm: QEMU; gvisor later).
//
// # Lifecycle
//
// A VM is born from a Spec, either by a cold boot (kernel, initramfs, root
// disk) or by restoring a Snapshot, which is how sandboxes are normally
// created: the template's snapshot was taken once its envd was ready, and any
// number of VMs restore from it concurrently.
//
//	vm, err := rt.Start(ctx, spec)   // cold boot, or restore spec.Snapshot
//	// The VM runs. The runtime knows nothing of envd: the node waits for
//	// envd's /health at the slot address, then calls /init (clock, entropy,
//	// env vars, token) — a restored guest's clock and RNG are the snapshot's.
//	err = rt.Snapshot(ctx, vm, dir)  // optional, once: the VM stops for good;
//	                                 // dir now serves Starts with Spec.Snapshot = dir
//	err = rt.Kill(ctx, vm)           // always last: stops the VM, frees its state
//
// # Pause, resume and checkpoints
//
// A sandbox is paused by a Snapshot (memory, devices and disk) or a SaveDisk
// (the disk only: the guest must have synced its file systems) into a
// directory of its own, then Kill. It resumes with Start{Snapshot: dir,
// Resume: true}, which consumes dir: the VM takes over its files by rename,
// and dir is gone once Start succeeds (and as it was when Start fails). How
// fast a Snapshot is depends on where the VM's RAM is: a file of its own (a
// cold boot, or a resume of a snapshot whose RAM was such a file) is handed
// over in milliseconds; private RAM (a template's clone, or a VM restored
// from a snapshot whose RAM is in the stream) is copied. A resume from a
// SaveDisk cold boots the saved VM's kernel on the saved disk.
//
// Checkpoint saves a running VM without stopping it for good (named
// snapshots, fork): the VM pauses for the save and continues. Any number of
// Starts restore a checkpoint, and each takes a copy of what it needs, so a
// VM restored from it keeps running when the checkpoint is deleted.
//
// Every VM owns a state directory (its disk overlay, logs, control socket and a
// record of its Spec) that outlives the node process: a VM keeps running when
// the node crashes. After a restart the node calls List and, for each ID,
// Adopt, which rebuilds the handle from the state directory; the node then
// keeps the VM or Kills it. A VM whose process died meanwhile is adopted with
// Done already closed, and Kill removes what it left.
package runtime

import (
	"context"
	"time"

	"github.com/warren-sh/warren/internal/netns"
)

// Runtime starts, snapshots and stops the VMs of one host. It is safe for
// concurrent use; operations on one VM are serialized by the runtime.
type Runtime interface {
	// Start cold boots spec, or restores spec.Snapshot, and returns once the
	// VM runs (not once its envd answers).
	Start(ctx context.Context, spec Spec) (VM, error)
	// Snapshot saves a running VM into dir (which must not exist) and leaves
	// the VM stopped for good: its memory now belongs to the snapshot. Kill it
	// next. On error the VM runs on as before and dir does not exist.
	Snapshot(ctx context.Context, vm VM, dir string) error
	// Checkpoint saves a running VM into dir (which must not exist) like
	// Snapshot, but the VM continues once the save is done (it is stopped
	// meanwhile). On error the VM runs on and dir does not exist.
	Checkpoint(ctx context.Context, vm VM, dir string) error
	// SaveDisk stops the VM for good and saves only its disk into dir (which
	// must not exist): what the guest had not synced to its disk is lost, and
	// so are its processes. A Start of dir cold boots the saved VM's kernel
	// on the saved disk. Kill the VM next.
	SaveDisk(ctx context.Context, vm VM, dir string) error
	// Freeze stops the VM's vCPUs: it uses no CPU and keeps its memory and
	// devices as they are (a warm pool's idle VMs). Thaw lets them run again
	// (and ends a Spec.Background VM's low priority).
	Freeze(ctx context.Context, vm VM) error
	Thaw(ctx context.Context, vm VM) error
	// Kill stops the VM (gracefully for a moment, then by force), waits for
	// its process to exit and removes its state directory.
	Kill(ctx context.Context, vm VM) error
	// Stats samples the VM process's resource use.
	Stats(ctx context.Context, vm VM) (*Stats, error)
	// List returns the IDs of the VMs that have state on this host, running or
	// not: what Adopt takes after a node restart.
	List(ctx context.Context) ([]string, error)
	// Adopt rebuilds the handle of a VM started by an earlier node process.
	Adopt(ctx context.Context, id string) (VM, error)
}

// Spec is one VM to start.
type Spec struct {
	// ID names the VM (the sandbox ID) and its state directory; letters,
	// digits, '-', '_' and '.', unique on the host.
	ID string
	// CPUs and MemoryMiB size the VM. A restore takes the snapshot's; when set
	// they must equal it.
	CPUs, MemoryMiB int
	// Kernel and Initramfs boot the guest (internal/guest). A restore takes
	// the snapshot's; when set they must name the snapshot's files.
	Kernel, Initramfs string
	// RootDisk is the template's root image (ext4), the guest's /dev/vda. It
	// is never written: each VM writes to its own copy-on-write overlay. A
	// restore takes the snapshot's disk; when set it must be the snapshot's.
	RootDisk string
	// Snapshot is a directory written by Runtime.Snapshot, Checkpoint or
	// SaveDisk to restore instead of booting; empty for a cold boot.
	Snapshot string
	// Overlay, when set, is where the VM's copy-on-write disk overlay is
	// made (it must not exist) instead of inside the VM's state directory.
	// The runtime never removes it: a template build keeps it as a layer.
	Overlay string
	// Resume says Snapshot is this VM's own saved state (a paused sandbox):
	// the runtime moves its files into the VM's state directory instead of
	// copying or layering over them, and the Snapshot directory is gone once
	// Start succeeds. When Start fails the directory is left as it was.
	Resume bool
	// Slot is the sandbox's network: the VM runs inside its namespace, on its
	// tap, with its guest address and MAC (the same in every slot, so a
	// snapshot restores in any slot).
	Slot *netns.Slot
	// Hostname is the guest's hostname at a cold boot (a restore keeps the
	// snapshot's); empty: the guest's default.
	Hostname string
	// InitSecret is envd's init secret (envd.InitSecretHeader) at a cold boot;
	// a restore keeps the snapshot's.
	InitSecret string
	// Background runs the VM at the host's lowest CPU priority until its
	// first Thaw, which gives it the node's: a VM prepared ahead (a warm
	// pool's) takes only CPU that nothing else wants.
	Background bool
}

// VM is a handle on a running (or, after Adopt, possibly dead) VM.
type VM interface {
	// ID is Spec.ID.
	ID() string
	// Netns names the network namespace the VM runs in (netns.Slot.Name).
	Netns() string
	// Pid is the VM's process on the host.
	Pid() int
	// StartedAt is when the VM's process started.
	StartedAt() time.Time
	// Done is closed once the VM's process has exited.
	Done() <-chan struct{}
	// TransferDisk is the host's file of the VM's transfer disk
	// (internal/transfer), new and empty at every Start and never part of a
	// snapshot; empty when the VM has none (restored from a snapshot taken
	// before VMs had one).
	TransferDisk() string
}

// Stats is a VM process's resource use.
type Stats struct {
	// RSS and PSS are the process's resident and proportional set sizes in
	// bytes: PSS splits pages shared with other VMs (a snapshot's memory
	// file, QEMU's code) among them, so PSS sums to the host's real use.
	RSS, PSS uint64
	// CPUTime is the user plus system CPU time the process has used.
	CPUTime time.Duration
}
