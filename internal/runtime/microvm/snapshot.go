package microvm

import (
	"cmp"
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

// A snapshot directory holds a stopped VM, ready to be restored:
//
//	mem            (memory "file") the guest's RAM, the VM's memory file itself
//	               (share=on, so the migration stream skipped it:
//	               x-ignore-shared); restores map it copy-on-write (share=off)
//	               and never write it, or a resume takes it over (share=on)
//	state          QEMU's device state, from `migrate exec:cat > state` (QEMU
//	               7.2 has no file: URI): tens of KB; with memory "stream" also
//	               every non-zero page of the guest's RAM (a VM whose RAM was
//	               private, or a Checkpoint); none with memory "none"
//	rootfs.qcow2   the VM's disk overlay as of the save, over DiskBacking: the
//	               guest's page cache and file system state in the RAM match
//	               it, so every restore writes to its own overlay over this one
//	               (memory "file") or to its own copy of it (the others)
//	manifest.json  Manifest: what a restoring QEMU must reproduce
//
// The VM's transfer disk is not saved: it holds only upload bytes in flight,
// which a stopped VM's envd no longer reads. Every restore gets a new, empty
// one of the recorded size.
const (
	snapMemFile      = "mem"
	snapStateFile    = "state"
	snapDiskFile     = "rootfs.qcow2"
	snapManifestFile = "manifest.json"
)

// MemoryForm says where a snapshot keeps the guest's RAM.
type MemoryForm string

const (
	// MemoryInFile: the RAM is the file mem, the device state alone is in
	// state. Snapshot of a VM whose RAM is a file of its own (cold booted or
	// resumed) writes it in milliseconds.
	MemoryInFile MemoryForm = "file"
	// MemoryInState: the RAM is in the migration stream, state. Snapshot of
	// a VM with private RAM, and Checkpoint, write it; the save and each
	// restore copy every non-zero page (a restore into anonymous memory).
	MemoryInState MemoryForm = "stream"
	// NoMemory: the disk alone (SaveDisk); a restore cold boots.
	NoMemory MemoryForm = "none"
)

// Manifest describes a snapshot (manifest.json).
type Manifest struct {
	// Hardware is the saved VM's; a restore reproduces it exactly.
	Hardware hardware `json:"hardware"`
	// Memory says where the RAM is; empty in manifests older than the field,
	// which are all MemoryInFile.
	Memory MemoryForm `json:"memory,omitempty"`
	// Disk is the overlay as saved (rootfs.qcow2): a restore checks it is unchanged.
	Disk fileID `json:"disk"`
	// DiskBacking is the image the overlay is over, as of the save; nil in
	// older manifests, whose overlay is over Hardware.RootDisk.
	DiskBacking *fileID `json:"diskBacking,omitempty"`
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
	// TransferDisk is the size in bytes of the transfer disk, a device the
	// saved guest knows; 0 (absent) in snapshots of VMs without one, whose
	// restores get none. Its content is never saved: each VM's is its own.
	TransferDisk int64 `json:"transferDisk,omitempty"`
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
		QEMU: r.qemu, Machine: machineOptions, Accel: m.Accel, CPU: m.CPU,
		CPUs: max(m.CPUs, 1), MemoryMiB: m.memoryMiB(), MAC: m.MAC.String(),
		Kernel: fileID{Path: m.Kernel}, Initramfs: fileID{Path: m.Initramfs},
		Cmdline:  m.cmdline(),
		RootDisk: fileID{Path: root}, RootFormat: format,
		TransferDisk: r.transferSize,
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
	switch m.Memory {
	case "":
		m.Memory = MemoryInFile
	case MemoryInFile, MemoryInState, NoMemory:
	default:
		return nil, fmt.Errorf("snapshot %s: memory %q is not one of file, stream, none (a newer warren wrote it?)", dir, m.Memory)
	}
	if m.DiskBacking == nil {
		m.DiskBacking = &m.Hardware.RootDisk
	}
	return &m, nil
}

// Snapshot saves the VM into dir and leaves it stopped for good. A VM whose
// RAM is a file of its own (cold booted, or resumed from a MemoryInFile
// snapshot) is saved in milliseconds: its vCPUs stop, a migration that skips
// the shared RAM file (x-ignore-shared) writes the device state, and the RAM
// file and the disk overlay move into dir (MemoryInFile). A VM with private
// RAM (a template's clone, or restored from a MemoryInState snapshot) writes
// its RAM into the migration stream instead (MemoryInState): that takes as
// long as copying its non-zero pages. The VM's
// memory and disk are the snapshot's now: Kill it next. dir appears complete
// or not at all; on error the VM runs on with its files in place.
func (r *Runtime) Snapshot(ctx context.Context, rv runtime.VM, dir string) error {
	return r.save(ctx, rv, dir, false)
}

// Checkpoint saves the VM into dir (MemoryInState, with a copy of the disk
// overlay) and lets it continue: its vCPUs stop for the migration and the
// copy, then run on. dir appears complete or not at all.
func (r *Runtime) Checkpoint(ctx context.Context, rv runtime.VM, dir string) error {
	return r.save(ctx, rv, dir, true)
}

// save is Snapshot (keepRunning false) and Checkpoint (true).
func (r *Runtime) save(ctx context.Context, rv runtime.VM, dir string, keepRunning bool) (err error) {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	what := map[bool]string{false: "snapshot", true: "checkpoint"}[keepRunning]
	defer func() {
		if err != nil {
			err = fmt.Errorf("microvm: %s %s to %s: %w", what, v.ID(), dir, err)
		}
	}()
	if err := v.saveable(); err != nil {
		return err
	}
	tmp, err := workDirFor(&dir)
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
	// The fast path: the RAM file is the snapshot's memory as it is.
	inFile := !keepRunning && v.rec.SharedMemory
	form := map[bool]MemoryForm{true: MemoryInFile, false: MemoryInState}[inFile]

	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return err
	}
	defer q.Close()
	started := time.Now()
	if err := q.execute(ctx, "stop", nil, nil); err != nil {
		return err
	}
	var moved moves
	running := false // whether the vCPUs run again
	defer func() {
		if err == nil || running {
			return
		}
		// A failed save leaves the VM as it was: its files back in place,
		// the migration (if any) cancelled, the vCPUs running. cont after a
		// completed migration takes the disk back (QEMU re-activates it).
		bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if uerr := moved.undo(); uerr != nil {
			err = errors.Join(err, fmt.Errorf("the VM stays stopped: %w", uerr))
			v.snapshotted = true
			return
		}
		q.execute(bg, "migrate_cancel", nil, nil) // a no-op unless a migration runs
		if cerr := q.execute(bg, "cont", nil, nil); cerr != nil {
			err = errors.Join(err, fmt.Errorf("the VM stays stopped: %w", cerr))
		}
	}()
	if err := migrate(ctx, q, v.done, "migrate", "exec:cat > '"+state+"'", inFile); err != nil {
		return err
	}
	// The migration flushed and released the disk, and the vCPUs stay
	// stopped, so neither RAM nor disk changes from here on. QEMU reports
	// the end before it settles in run state postmigrate; wait for that.
	if err := waitStatus(ctx, q, "postmigrate"); err != nil {
		return err
	}
	disk := filepath.Join(tmp, snapDiskFile)
	if keepRunning {
		if err := copySparse(v.path(overlayFile), disk); err != nil {
			return err
		}
		// The VM takes its disk back and runs on.
		if err := q.execute(ctx, "cont", nil, nil); err != nil {
			return err
		}
		running = true
	} else {
		if err := moved.move(v.path(overlayFile), disk); err != nil {
			return err
		}
		if inFile {
			if err := moved.move(v.path(memFile), filepath.Join(tmp, snapMemFile)); err != nil {
				return err
			}
		}
	}
	saveTime := time.Since(started)
	if err := r.writeManifest(v, tmp, form, saveTime); err != nil {
		return err
	}
	if inFile {
		// The RAM file stays readable by restores only; nothing writes it again.
		if err := os.Chmod(filepath.Join(tmp, snapMemFile), 0o400); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	if !keepRunning {
		v.snapshotted = true
	}
	return nil
}

// SaveDisk stops the VM for good (QEMU quits, which flushes the disk
// overlay) and moves its disk overlay into dir with a manifest (NoMemory):
// a Start of dir cold boots the VM's kernel and command line on that disk.
// The guest's page cache is not saved: have the guest sync first. dir
// appears complete or not at all; on error after QEMU quit, the overlay
// stays in the VM's state directory (until Kill).
func (r *Runtime) SaveDisk(ctx context.Context, rv runtime.VM, dir string) (err error) {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	defer func() {
		if err != nil {
			err = fmt.Errorf("microvm: save the disk of %s to %s: %w", v.ID(), dir, err)
		}
	}()
	if err := v.saveable(); err != nil {
		return err
	}
	tmp, err := workDirFor(&dir)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return err
	}
	started := time.Now()
	// QEMU may close the socket before it answers; its exit decides.
	q.execute(ctx, "quit", nil, nil)
	q.Close()
	select {
	case <-v.done:
	case <-ctx.Done():
		return fmt.Errorf("%s did not quit: %w", Binary, ctx.Err())
	}
	v.snapshotted = true
	var moved moves
	defer func() {
		if err != nil {
			moved.undo()
		}
	}()
	if err := moved.move(v.path(overlayFile), filepath.Join(tmp, snapDiskFile)); err != nil {
		return err
	}
	if err := r.writeManifest(v, tmp, NoMemory, time.Since(started)); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// saveable checks that v can still be saved.
func (v *VM) saveable() error {
	switch {
	case v.snapshotted:
		return errors.New("the VM was saved already (and is stopped for good)")
	case v.exited():
		return errors.New("QEMU has exited")
	case v.diskPath() != v.path(overlayFile):
		// A template build's layer: it must stay where it is.
		return fmt.Errorf("the VM writes to %s, outside its state directory; SwitchDisk(\"\") first", v.diskPath())
	}
	return nil
}

// workDirFor makes *dir absolute, checks that it does not exist and makes
// the temporary directory beside it that a save fills and renames to *dir.
func workDirFor(dir *string) (string, error) {
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return "", err
	}
	*dir = abs
	if _, err := os.Stat(abs); err == nil {
		return "", errors.New("the directory exists")
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o755); err != nil {
		return "", err
	}
	return os.MkdirTemp(filepath.Dir(abs), "."+filepath.Base(abs)+".tmp-")
}

// writeManifest writes the manifest of v's save into tmp, whose disk is in
// place: the boot files and disks identified as they are now.
func (r *Runtime) writeManifest(v *VM, tmp string, form MemoryForm, saveTime time.Duration) (err error) {
	hw := v.rec.Hardware
	for _, f := range []*fileID{&hw.Kernel, &hw.Initramfs, &hw.RootDisk} {
		if *f, err = identify(f.Path); err != nil {
			return err
		}
	}
	backing, err := identify(cmp.Or(v.rec.DiskBacking, hw.RootDisk.Path))
	if err != nil {
		return fmt.Errorf("the disk overlay's backing image: %w", err)
	}
	disk, err := identify(filepath.Join(tmp, snapDiskFile))
	if err != nil {
		return err
	}
	disk.Path = snapDiskFile
	m := Manifest{Hardware: hw, Memory: form, Disk: disk, DiskBacking: &backing, CreatedAt: time.Now().UTC(), SaveTime: Duration(saveTime)}
	return writeJSON(filepath.Join(tmp, snapManifestFile), m)
}

// moves records renames so that they can be undone, last first.
type moves [][2]string

// move renames from to to and records it.
func (ms *moves) move(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		if errors.Is(err, syscall.EXDEV) {
			return fmt.Errorf("move %s to %s: the snapshot directory must be on the file system of the runtime's root", from, to)
		}
		return fmt.Errorf("move %s: %w", from, err)
	}
	*ms = append(*ms, [2]string{from, to})
	return nil
}

// undo renames everything back.
func (ms *moves) undo() error {
	var errs []error
	for i := len(*ms) - 1; i >= 0; i-- {
		m := (*ms)[i]
		if err := os.Rename(m[1], m[0]); err != nil {
			errs = append(errs, fmt.Errorf("move %s back: %w", m[1], err))
		}
	}
	*ms = nil
	return errors.Join(errs...)
}

// maxBandwidth lifts QEMU's default cap on migration speed (128 MiB/s in
// 7.2, meant for live migration over a network): a save to a local file with
// the vCPUs stopped should go as fast as the host can copy.
const maxBandwidth = 1 << 40

// migrate runs a migration command ("migrate" out, or "migrate-incoming")
// with uri and waits for it to end. ignoreShared skips a shared RAM file
// (x-ignore-shared): the file is the memory, the stream holds devices only.
// Both sides of one stream must agree on it.
func migrate(ctx context.Context, q *qmp, exited <-chan struct{}, command, uri string, ignoreShared bool) error {
	caps := map[string]any{"capabilities": []map[string]any{
		{"capability": "x-ignore-shared", "state": ignoreShared},
		{"capability": "events", "state": true},
	}}
	if err := q.execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return err
	}
	if command == "migrate" {
		if err := q.execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": maxBandwidth}, nil); err != nil {
			return err
		}
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

// restore loads the snapshot's device state (and, in form MemoryInState, its
// RAM) into the new, paused QEMU and lets the vCPUs run.
func (v *VM) restore(ctx context.Context, q *qmp, snapshot string, form MemoryForm) error {
	state := filepath.Join(snapshot, snapStateFile)
	if strings.ContainsRune(state, '\'') {
		return fmt.Errorf("path %q holds a single quote: QEMU's exec: URI passes it to a shell", state)
	}
	if err := migrate(ctx, q, v.done, "migrate-incoming", "exec:cat '"+state+"'", form == MemoryInFile); err != nil {
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
	// The CPU model is not compared: a restore repeats the snapshot's
	// (restoreMachine), which the same QEMU runs under the same accel.
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
		{"the disk overlay's backing image", *m.DiskBacking, ""},
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
	if m.Memory == MemoryInFile {
		if fi, err := os.Stat(filepath.Join(spec.Snapshot, snapMemFile)); err != nil {
			bad = append(bad, fmt.Sprintf("memory file: %v", err))
		} else if fi.Size() != int64(hw.MemoryMiB)<<20 {
			bad = append(bad, fmt.Sprintf("memory file holds %d bytes, not the %d MiB of the VM", fi.Size(), hw.MemoryMiB))
		}
	}
	if m.Memory != NoMemory {
		if _, err := os.Stat(filepath.Join(spec.Snapshot, snapStateFile)); err != nil {
			bad = append(bad, fmt.Sprintf("device state: %v", err))
		}
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("snapshot %s does not match: %s", spec.Snapshot, strings.Join(bad, "; "))
	}
	return m, nil
}
