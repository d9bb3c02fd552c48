package microvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/warren-sh/warren/internal/runtime"
)

// errOverlayExists refuses a Spec.Overlay that is there already: the
// runtime never overwrites (or, after the failed start, removes) a file it
// did not make.
var errOverlayExists = errors.New("the disk overlay exists")

// diskPath is the file the guest's disk writes go to now.
func (v *VM) diskPath() string {
	if v.rec.Disk != "" {
		return v.rec.Disk
	}
	return v.path(overlayFile)
}

// SwitchDisk freezes the VM's disk as it is now: the file its writes went to
// so far becomes read-only, and a new qcow2 overlay at path (which must not
// exist), backed by it, takes the writes from here on. An empty path puts
// the new overlay in the VM's state directory, where Snapshot expects it.
//
// The VM keeps running; what the guest still holds in its page cache lands
// in the new overlay, so a caller that wants the frozen file to hold the
// guest's writes syncs the guest first. Template builds use it to cut one
// disk layer per build step.
func (r *Runtime) SwitchDisk(ctx context.Context, rv runtime.VM, path string) (err error) {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	defer func() {
		if err != nil {
			err = fmt.Errorf("microvm: switch the disk of %s to %s: %w", v.ID(), path, err)
		}
	}()
	if v.snapshotted || v.exited() {
		return errors.New("the VM is not running")
	}
	if path == "" {
		path = v.path(overlayFile)
	}
	if path, err = filepath.Abs(path); err != nil {
		return err
	}
	if _, err := os.Lstat(path); err == nil {
		return errOverlayExists
	}
	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return err
	}
	defer q.Close()
	// QEMU makes the overlay itself, naming the current file (by the path
	// it opened) as its backing file, and moves the drive onto it at once.
	args := map[string]any{"device": "root", "snapshot-file": path, "format": "qcow2", "mode": "absolute-paths"}
	if err := q.execute(ctx, "blockdev-snapshot-sync", args, nil); err != nil {
		os.Remove(path)
		return err
	}
	v.rec.Disk = path
	if path == v.path(overlayFile) {
		v.rec.Disk = ""
	}
	return writeJSON(v.path(recordFile), v.rec)
}

// SnapshotDisk is the disk image a snapshot directory holds: immutable, a
// qcow2 overlay over the saved VM's root disk. A template build boots it to
// build on a template.
func SnapshotDisk(dir string) string { return filepath.Join(dir, snapDiskFile) }

// Freeze stops the VM's vCPUs (QMP stop): under TCG an idle guest still
// costs host CPU for its timers, a frozen one none.
func (r *Runtime) Freeze(ctx context.Context, rv runtime.VM) error {
	return r.runState(ctx, rv, "stop")
}

// Thaw lets a frozen VM's vCPUs run again (QMP cont), at the node's CPU
// priority when it was started in the background. The guest's clock stood
// still meanwhile: the node's /init sets it.
func (r *Runtime) Thaw(ctx context.Context, rv runtime.VM) error {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	if v.background && !v.exited() {
		if err := setNice(v.rec.Pid, v.nice); err != nil {
			v.ops.Unlock()
			return fmt.Errorf("microvm: thaw %s: %w", v.ID(), err)
		}
		v.background = false
	}
	v.ops.Unlock()
	return r.runState(ctx, rv, "cont")
}

func (r *Runtime) runState(ctx context.Context, rv runtime.VM, command string) error {
	return r.command(ctx, rv, command, command, nil)
}

// command runs one QMP command on a running VM; what names it in errors.
func (r *Runtime) command(ctx context.Context, rv runtime.VM, what, command string, args map[string]any) error {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	if v.snapshotted || v.exited() {
		return fmt.Errorf("microvm: %s %s: the VM is not running", what, v.ID())
	}
	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return fmt.Errorf("microvm: %s %s: %w", what, v.ID(), err)
	}
	defer q.Close()
	var arguments any // a nil map would be sent as "arguments": null, which QEMU refuses
	if args != nil {
		arguments = args
	}
	if err := q.execute(ctx, command, arguments, nil); err != nil {
		return fmt.Errorf("microvm: %s %s: %w", what, v.ID(), err)
	}
	return nil
}

// ResizeDisk grows the running VM's disk to size bytes (QMP block_resize of
// the image its writes go to). The guest sees the new size at once; its file
// system grows with resize2fs. Layers below keep their size.
func (r *Runtime) ResizeDisk(ctx context.Context, rv runtime.VM, size int64) error {
	return r.command(ctx, rv, fmt.Sprintf("resize the disk (to %d bytes) of", size), "block_resize", map[string]any{"device": "root", "size": size})
}
