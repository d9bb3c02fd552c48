package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/runtime"
)

// A snapshot directory holds a stopped VM, ready to be restored any number of
// times, concurrently:
//
//	mem            the guest's RAM, the cold-booted VM's memory file itself
//	               (share=on, so the migration stream skipped it:
//	               x-ignore-shared); restores map it copy-on-write (share=off)
//	               and never write it
//	state          QEMU's device state, from `migrate exec:cat > state` (QEMU
//	               7.2 has no file: URI); tens of KB
//	rootfs.qcow2   the VM's disk overlay as of the save, over Hardware.RootDisk:
//	               the guest's page cache and file system state in mem match it,
//	               so every restore writes to its own overlay over this one
//	manifest.json  Manifest: what a restoring QEMU must reproduce
const (
	snapMemFile      = "mem"
	snapStateFile    = "state"
	snapDiskFile     = "rootfs.qcow2"
	snapManifestFile = "manifest.json"
)

// Manifest describes a snapshot (manifest.json).
type Manifest struct {
	// Hardware is the saved VM's; a restore reproduces it exactly.
	Hardware hardware `json:"hardware"`
	// Disk is the overlay as saved (rootfs.qcow2): a restore checks it is unchanged.
	Disk fileID `json:"disk"`
	// CreatedAt is when the save finished.
	CreatedAt time.Time `json:"createdAt"`
	// SaveTime is how long the VM was stopped for the save.
	SaveTime Duration `json:"saveTime"`
}

// hardware is what a restoring QEMU must reproduce: the same QEMU, the same
// device set, CPU and RAM size, the same guest MAC (the guest's neighbour
// cache is saved), and the very files it booted (loaded at QEMU's start).
type hardware struct {
	QEMU      string `json:"qemu"`    // qemu-system-x86_64 --version
	Machine   string `json:"machine"` // -M
	Accel     Accel  `json:"accel"`
	CPU       string `json:"cpu"` // -cpu
	CPUs      int    `json:"cpus"`
	MemoryMiB int    `json:"memoryMiB"`
	MAC       string `json:"mac"`
	Kernel    fileID `json:"kernel"`
	Initramfs fileID `json:"initramfs"`
	// Cmdline is the kernel command line of the cold boot.
	Cmdline string `json:"cmdline"`
	// RootDisk is the image under the VM's overlay, never written.
	RootDisk   fileID `json:"rootDisk"`
	RootFormat string `json:"rootFormat"`
}

// fileID identifies a file's content cheaply: path, size and modification time.
type fileID struct {
	Path    string    `json:"path"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"modTime"`
}

// Duration is a time.Duration that reads as text in JSON ("12ms").
type Duration time.Duration

// MarshalText writes d like time.Duration's String.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText parses what MarshalText wrote.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

func identify(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	return fileID{Path: path, Size: fi.Size(), ModTime: fi.ModTime().UTC()}, nil
}

// hardwareOf is the hardware record of a machine this runtime cold boots
// over the root image root (in format). File sizes and times are filled in
// when the VM is snapshotted.
func (r *Runtime) hardwareOf(m Machine, root, format string) hardware {
	return hardware{
		QEMU: r.qemu, Machine: machineOptions, Accel: m.Accel, CPU: cpuModel(m.Accel),
		CPUs: max(m.CPUs, 1), MemoryMiB: m.memoryMiB(), MAC: m.MAC.String(),
		Kernel: fileID{Path: m.Kernel}, Initramfs: fileID{Path: m.Initramfs},
		Cmdline:  m.cmdline(),
		RootDisk: fileID{Path: root}, RootFormat: format,
	}
}

// ReadManifest reads a snapshot directory's manifest.
func ReadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, snapManifestFile))
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", dir, err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("snapshot %s: %s: %w", dir, snapManifestFile, err)
	}
	return &m, nil
}

// Snapshot saves the VM into dir: it stops the vCPUs, writes the device state
// with a migration that skips the shared RAM file (x-ignore-shared), then
// moves the RAM file and the disk overlay into dir and writes the manifest.
// The VM stays stopped: its memory is the snapshot's now, so Kill it next.
// dir appears complete or not at all. Only a cold-booted VM can be
// snapshotted for now (a restored one maps its memory copy-on-write).
func (r *Runtime) Snapshot(ctx context.Context, rv runtime.VM, dir string) (err error) {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	defer func() {
		if err != nil {
			err = fmt.Errorf("microvm: snapshot %s to %s: %w", v.ID(), dir, err)
		}
	}()
	switch {
	case v.snapshotted:
		return errors.New("the VM was snapshotted already (and is stopped for good)")
	case v.rec.Restored != "":
		return errors.New("the VM was restored from a snapshot; snapshotting a restored VM (pause/resume) is not supported yet")
	case v.exited():
		return errors.New("QEMU has exited")
	case v.diskPath() != v.path(overlayFile):
		return fmt.Errorf("the VM writes to %s, outside its state directory; SwitchDisk(\"\") first", v.diskPath())
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	if _, err := os.Stat(dir); err == nil {
		return errors.New("the directory exists")
	}
	// Everything is written into a temporary directory beside dir, which is
	// renamed to dir once complete.
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+".tmp-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	state := filepath.Join(tmp, snapStateFile)
	if strings.ContainsRune(state, '\'') {
		return fmt.Errorf("path %q holds a single quote: QEMU's exec: URI passes it to a shell", state)
	}

	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return err
	}
	defer q.Close()
	started := time.Now()
	if err := q.execute(ctx, "stop", nil, nil); err != nil {
		return err
	}
	moved := false
	defer func() {
		// A failed save leaves the VM as it was, unless its files have been
		// handed over already.
		if err != nil && !moved {
			bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			q.execute(bg, "migrate_cancel", nil, nil) // a no-op unless a migration runs
			q.execute(bg, "cont", nil, nil)
		}
	}()
	if err := migrate(ctx, q, v.done, "migrate", "exec:cat > '"+state+"'"); err != nil {
		return err
	}
	// The migration flushed and released the disk, and the vCPUs stay
	// stopped, so neither RAM nor disk changes from here on. QEMU reports
	// the end before it settles in run state postmigrate; wait for that, so
	// the VM's state after Snapshot is always the same.
	saveTime := time.Since(started)
	if err := waitStatus(ctx, q, "postmigrate"); err != nil {
		return err
	}
	moved = true
	v.snapshotted = true
	for from, to := range map[string]string{v.path(memFile): snapMemFile, v.diskPath(): snapDiskFile} {
		if err := os.Rename(from, filepath.Join(tmp, to)); err != nil {
			if errors.Is(err, syscall.EXDEV) {
				return fmt.Errorf("move %s: the snapshot directory must be on the file system of the runtime's root %s", from, r.root)
			}
			return fmt.Errorf("move %s: %w", from, err)
		}
	}
	hw := v.rec.Hardware
	for _, f := range []*fileID{&hw.Kernel, &hw.Initramfs} {
		if *f, err = identify(f.Path); err != nil {
			return err
		}
	}
	if hw.RootDisk, err = identify(hw.RootDisk.Path); err != nil {
		return err
	}
	disk, err := identify(filepath.Join(tmp, snapDiskFile))
	if err != nil {
		return err
	}
	disk.Path = snapDiskFile
	m := Manifest{Hardware: hw, Disk: disk, CreatedAt: time.Now().UTC(), SaveTime: Duration(saveTime)}
	if err := writeJSON(filepath.Join(tmp, snapManifestFile), m); err != nil {
		return err
	}
	// The RAM file stays readable by restores only; nothing writes it again.
	if err := os.Chmod(filepath.Join(tmp, snapMemFile), 0o400); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return nil
}

// migrate runs a migration command ("migrate" out, or "migrate-incoming")
// with uri and waits for it to end. The RAM file is shared by both sides, so
// the stream skips it (x-ignore-shared).
func migrate(ctx context.Context, q *qmp, exited <-chan struct{}, command, uri string) error {
	caps := map[string]any{"capabilities": []map[string]any{
		{"capability": "x-ignore-shared", "state": true},
		{"capability": "events", "state": true},
	}}
	if err := q.execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return err
	}
	events, cancel := q.subscribe("MIGRATION")
	defer cancel()
	if err := q.execute(ctx, command, map[string]any{"uri": uri}, nil); err != nil {
		return err
	}
	for {
		select {
		case ev := <-events:
			var st struct {
				Status string `json:"status"`
			}
			json.Unmarshal(ev.Data, &st)
			switch st.Status {
			case "completed":
				return nil
			case "failed", "cancelled":
				var info struct {
					ErrorDesc string `json:"error-desc"`
				}
				q.execute(ctx, "query-migrate", nil, &info)
				return fmt.Errorf("%s %s: %s: %s", command, uri, st.Status, info.ErrorDesc)
			}
		case <-exited:
			return fmt.Errorf("%s %s: %s exited", command, uri, Binary)
		case <-q.done:
			return fmt.Errorf("%s %s: QMP connection lost", command, uri)
		case <-ctx.Done():
			return fmt.Errorf("%s %s: %w", command, uri, ctx.Err())
		}
	}
}

// waitStatus polls QEMU's run state until it is want.
func waitStatus(ctx context.Context, q *qmp, want string) error {
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := q.execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if st.Status == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("run state %s, waiting for %s: %w", st.Status, want, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// restore loads the snapshot's device state into the new, paused QEMU and
// lets the vCPUs run.
func (v *VM) restore(ctx context.Context, q *qmp, snapshot string) error {
	state := filepath.Join(snapshot, snapStateFile)
	if strings.ContainsRune(state, '\'') {
		return fmt.Errorf("path %q holds a single quote: QEMU's exec: URI passes it to a shell", state)
	}
	if err := migrate(ctx, q, v.done, "migrate-incoming", "exec:cat '"+state+"'"); err != nil {
		return fmt.Errorf("restore %s: %w", snapshot, err)
	}
	if err := q.execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("restore %s: %w", snapshot, err)
	}
	return nil
}

// checkSnapshot reads spec.Snapshot's manifest and checks that this runtime
// and spec can restore it: the same QEMU and machine, the sizes spec asks
// for, and boot files and disks unchanged since the save.
func (r *Runtime) checkSnapshot(spec runtime.Spec) (*Manifest, error) {
	m, err := ReadManifest(spec.Snapshot)
	if err != nil {
		return nil, err
	}
	hw := m.Hardware
	var bad []string
	differ := func(what string, snap, here any, hereIs string) {
		if fmt.Sprint(snap) != fmt.Sprint(here) {
			bad = append(bad, fmt.Sprintf("%s is %v in the snapshot, %v %s", what, snap, here, hereIs))
		}
	}
	differ("QEMU", hw.QEMU, r.qemu, "here")
	differ("machine", hw.Machine, machineOptions, "here")
	differ("acceleration", hw.Accel, r.accel, "here")
	differ("CPU model", hw.CPU, cpuModel(r.accel), "here")
	differ("guest MAC", hw.MAC, spec.Slot.GuestMAC.String(), "in the slot")
	if spec.CPUs != 0 {
		differ("CPU count", hw.CPUs, spec.CPUs, "asked")
	}
	if spec.MemoryMiB != 0 {
		differ("memory (MiB)", hw.MemoryMiB, spec.MemoryMiB, "asked")
	}
	for _, f := range []struct {
		what  string
		saved fileID
		asked string
	}{
		{"kernel", hw.Kernel, spec.Kernel},
		{"initramfs", hw.Initramfs, spec.Initramfs},
		{"root disk", hw.RootDisk, spec.RootDisk},
		{"disk overlay", fileID{Path: filepath.Join(spec.Snapshot, m.Disk.Path), Size: m.Disk.Size, ModTime: m.Disk.ModTime}, ""},
	} {
		if f.asked != "" {
			if abs, _ := filepath.Abs(f.asked); abs != f.saved.Path {
				bad = append(bad, fmt.Sprintf("%s is %s in the snapshot, %s asked", f.what, f.saved.Path, f.asked))
				continue
			}
		}
		now, err := identify(f.saved.Path)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", f.what, err))
		} else if now.Size != f.saved.Size || !now.ModTime.Equal(f.saved.ModTime) {
			bad = append(bad, fmt.Sprintf("%s %s changed since the save (size %d, modified %s; then %d, %s)",
				f.what, f.saved.Path, now.Size, now.ModTime.Format(time.RFC3339Nano), f.saved.Size, f.saved.ModTime.Format(time.RFC3339Nano)))
		}
	}
	if fi, err := os.Stat(filepath.Join(spec.Snapshot, snapMemFile)); err != nil {
		bad = append(bad, fmt.Sprintf("memory file: %v", err))
	} else if fi.Size() != int64(hw.MemoryMiB)<<20 {
		bad = append(bad, fmt.Sprintf("memory file holds %d bytes, not the %d MiB of the VM", fi.Size(), hw.MemoryMiB))
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("snapshot %s does not match: %s", spec.Snapshot, strings.Join(bad, "; "))
	}
	return m, nil
}
