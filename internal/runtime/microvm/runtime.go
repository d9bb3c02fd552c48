package microvm

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/envd/guestinit"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/transfer"
)

// Files in a VM's state directory, <Root>/<id>/.
const (
	recordFile   = "vm.json"       // record: what Adopt and Snapshot need
	pidFile      = "pid"           // QEMU's pid, written once it started
	overlayFile  = "overlay.qcow2" // the root disk's copy-on-write overlay
	memFile      = "mem"           // guest RAM of a VM that owns it (share=on): cold booted or resumed
	transferFile = "transfer"      // the transfer disk (internal/transfer): new and empty at every start
	qmpFile      = "qmp.sock"      // QMP control socket
	serialFile   = "serial.log"    // the guest console: kernel and init's boot log
	qemuLogFile  = "qemu.log"      // QEMU's own stdout and stderr
)

// Config configures a Runtime.
type Config struct {
	// Root holds one state directory per VM, <Root>/<id>: it must be on the
	// same file system as the directories snapshots are written to (a snapshot
	// takes over the VM's memory file and disk overlay by rename, and a resume
	// takes them back).
	Root string
	// Accel is "auto" (KVM where it works, else TCG; the default), "kvm" or "tcg".
	Accel string
	// GuestASLR is "auto" (the default: on under KVM, off under TCG), "on" or
	// "off": whether cold-booted guests randomize their processes' address
	// spaces (off: the kernel's norandmaps). TCG (QEMU 7.2) finds the code it
	// translated by virtual address, so under ASLR every new process in the
	// guest translates its code anew: a command starts 3-5 times slower. A
	// restored VM keeps the setting of the VM its snapshot was taken from.
	GuestASLR string
	// TransferDiskSize is the size in bytes of the transfer disk cold-booted
	// VMs get (internal/transfer: uploads pass through it); 0 is
	// DefaultTransferDiskSize. The file is sparse: it takes host disk only
	// while uploads pass through. A restored VM gets a disk of its
	// snapshot's size, as the saved guest knows it.
	TransferDiskSize int64
	// Log receives warnings (TCG); nil discards them.
	Log *slog.Logger
}

// DefaultTransferDiskSize is Config.TransferDiskSize unless set: room for
// the slots of a few large uploads at once.
const DefaultTransferDiskSize = 1 << 30

// Runtime runs VMs as QEMU microvm processes, one per sandbox, each started
// inside its sandbox's network namespace and controlled over QMP. It
// implements runtime.Runtime.
type Runtime struct {
	root   string
	accel  Accel
	tscKHz int
	cpu    string // the guest CPU model of cold boots: cpuModel(accel)
	qemu   string // QEMU's version, as --version prints it
	aslr   bool   // cold boots randomize guest address spaces
	// transferSize is the transfer disk of cold boots, in bytes: whole slots.
	transferSize int64
	log          *slog.Logger
}

var _ runtime.Runtime = (*Runtime)(nil)

// tcgWarning is printed once per process: every Runtime would say the same.
var tcgWarning sync.Once

// New checks the host (QEMU, acceleration) and makes Root.
func New(cfg Config) (*Runtime, error) {
	if cfg.Root == "" {
		return nil, errors.New("microvm: no state root directory given")
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	r := &Runtime{root: cfg.Root, log: log}
	var why string
	switch cfg.Accel {
	case "", "auto":
		r.accel, why = DetectAccel()
	case "kvm":
		if a, why := DetectAccel(); a != KVM {
			return nil, fmt.Errorf("microvm: --vm-accel kvm: KVM is not usable here: %s (use auto or tcg)", why)
		}
		r.accel = KVM
	case "tcg":
		r.accel, why = TCG, "asked for"
	default:
		return nil, fmt.Errorf("microvm: accel %q is not one of auto, kvm, tcg", cfg.Accel)
	}
	if r.accel == TCG {
		tcgWarning.Do(func() {
			log.Warn("microvm: VMs run under TCG, software emulation: several times slower than KVM", "reason", why)
		})
		var err error
		if r.tscKHz, err = HostTSCkHz(); err != nil {
			return nil, fmt.Errorf("microvm: %w", err)
		}
	}
	r.cpu = cpuModel(r.accel)
	switch cfg.GuestASLR {
	case "", "auto":
		r.aslr = r.accel == KVM
	case "on", "off":
		r.aslr = cfg.GuestASLR == "on"
	default:
		return nil, fmt.Errorf("microvm: guest ASLR %q is not one of auto, on, off", cfg.GuestASLR)
	}
	r.transferSize = cmp.Or(cfg.TransferDiskSize, DefaultTransferDiskSize) &^ (transfer.SlotSize - 1)
	if r.transferSize < transfer.MinSize {
		return nil, fmt.Errorf("microvm: transfer disk size %d: at least %d bytes (%d MiB)", cfg.TransferDiskSize, transfer.MinSize, transfer.MinSize>>20)
	}
	out, err := exec.Command(Binary, "--version").Output()
	if err != nil {
		return nil, fmt.Errorf("microvm: %s --version: %w (install it: apt-get install -y qemu-system-x86)", Binary, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	_, r.qemu, _ = strings.Cut(first, "version ")
	if r.qemu == "" {
		return nil, fmt.Errorf("microvm: %s --version printed %q, not a version", Binary, first)
	}
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("microvm: %w", err)
	}
	return r, nil
}

// Accel is the acceleration the runtime's VMs use.
func (r *Runtime) Accel() Accel { return r.accel }

// GuestASLR tells whether cold-booted guests randomize their address spaces
// (Config.GuestASLR).
func (r *Runtime) GuestASLR() bool { return r.aslr }

// CPUModel is the guest CPU model cold boots get (empty: QEMU's default for
// the accelerator). A snapshot records the model it booted on.
func (r *Runtime) CPUModel() string { return r.cpu }

// Version is QEMU's version: a snapshot restores only on the QEMU that saved it.
func (r *Runtime) Version() string { return r.qemu }

// TransferDiskSize is the size in bytes of the transfer disk cold boots
// get. A snapshot records it, and its restores get a disk of that size
// (none when it is 0: a snapshot from before the disk).
func (r *Runtime) TransferDiskSize() int64 { return r.transferSize }

// VM is one QEMU process. It implements runtime.VM.
type VM struct {
	rec record
	dir string

	sig  sync.Mutex // guards signalling against the process's exit
	proc *os.Process
	done chan struct{}

	ops         sync.Mutex // serializes Snapshot, Checkpoint, SaveDisk and Kill
	snapshotted bool
	background  bool // started with Spec.Background and not thawed since
	nice        int  // the nice value Thaw gives a background VM's threads
}

var _ runtime.VM = (*VM)(nil)

// ID is the VM's Spec.ID.
func (v *VM) ID() string { return v.rec.ID }

// Netns names the network namespace QEMU runs in.
func (v *VM) Netns() string { return v.rec.Netns }

// Pid is QEMU's process ID.
func (v *VM) Pid() int { return v.rec.Pid }

// StartedAt is when QEMU started.
func (v *VM) StartedAt() time.Time { return v.rec.StartedAt }

// Done is closed once QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// TransferDisk is the host's file of the VM's transfer disk, for
// transfer.Open; empty when the VM has none (restored from a snapshot taken
// before VMs had one). The file is new and empty at every Start: it is not
// part of any snapshot.
func (v *VM) TransferDisk() string {
	if v.rec.Hardware.TransferDisk == 0 {
		return ""
	}
	return v.path(transferFile)
}

// ConsoleLog is the file holding the guest's console: the kernel's and
// init's boot messages (of this VM's process: a restored VM's starts at the
// restore).
func (v *VM) ConsoleLog() string { return filepath.Join(v.dir, serialFile) }

// Status asks QEMU for the VM's run state over QMP: "running", "paused",
// "postmigrate" (after Snapshot), "inmigrate" (restoring), ...
func (v *VM) Status(ctx context.Context) (string, error) {
	q, err := dialQMP(ctx, v.path(qmpFile))
	if err != nil {
		return "", err
	}
	defer q.Close()
	var st struct {
		Status string `json:"status"`
	}
	if err := q.execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

func (v *VM) path(name string) string { return filepath.Join(v.dir, name) }

func (v *VM) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// record is a VM's vm.json.
type record struct {
	ID        string    `json:"id"`
	Netns     string    `json:"netns"`
	Pid       int       `json:"pid,omitempty"` // also in the pid file, which is written once QEMU runs
	StartedAt time.Time `json:"startedAt"`
	// Hardware is what a snapshot of the VM must record.
	Hardware hardware `json:"hardware"`
	// Restored is the snapshot the VM was restored from; empty after a cold boot.
	Restored string `json:"restored,omitempty"`
	// Disk is the file the guest's disk writes go to when it is not the
	// state directory's overlay: Spec.Overlay, then what SwitchDisk made.
	Disk string `json:"disk,omitempty"`
	// SharedMemory says the guest's RAM is the VM's own file mem (share=on),
	// which Snapshot hands over as it is; otherwise it is a private
	// copy-on-write mapping of Restored's mem.
	SharedMemory bool `json:"sharedMemory,omitempty"`
	// DiskBacking is the image the disk overlay is over.
	DiskBacking string `json:"diskBacking,omitempty"`
	// Args is QEMU's command line, for whoever debugs the VM.
	Args []string `json:"args"`
}

// validID keeps IDs usable as one path element.
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Start cold boots spec, or restores spec.Snapshot, in spec.Slot's namespace
// and returns once the VM runs. On error nothing is left: no process, no
// state directory.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (_ runtime.VM, err error) {
	if !validID.MatchString(spec.ID) {
		return nil, fmt.Errorf("microvm: VM id %q: use 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit", spec.ID)
	}
	if spec.Slot == nil {
		return nil, fmt.Errorf("microvm: start %s: no network slot", spec.ID)
	}
	dir := filepath.Join(r.root, spec.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("microvm: start %s: a VM with this id has state in %s", spec.ID, dir)
		}
		return nil, fmt.Errorf("microvm: start %s: %w", spec.ID, err)
	}
	v := &VM{dir: dir, done: make(chan struct{})}
	var moved moves // a resume's files, taken from spec.Snapshot
	defer func() {
		if err != nil {
			err = fmt.Errorf("microvm: start %s: %w", spec.ID, err)
			if v.proc != nil {
				v.signal(syscall.SIGKILL)
				<-v.done
				err = withLogTail(err, v.path(qemuLogFile))
			}
			// A failed resume leaves the saved state as it was.
			if uerr := moved.undo(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("give the snapshot its files back: %w", uerr))
			}
			os.RemoveAll(dir)
			if spec.Overlay != "" && !errors.Is(err, errOverlayExists) {
				os.Remove(spec.Overlay)
			}
		}
	}()

	v.rec = record{ID: spec.ID, Netns: spec.Slot.Name, Restored: spec.Snapshot}
	m, form, err := r.machine(spec, v, &moved)
	if err != nil {
		return nil, err
	}
	if v.rec.Args, err = m.Args(); err != nil {
		return nil, err
	}
	args := v.rec.Args
	if spec.Overlay != "" {
		v.rec.Disk = m.RootDisk
	}
	if err := writeJSON(v.path(recordFile), v.rec); err != nil {
		return nil, err
	}
	log, err := os.OpenFile(v.path(qemuLogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd := exec.Command(Binary, args...)
	// Never the caller's pipes: a caller that reads them would wait for
	// QEMU's exit. A session of its own keeps QEMU out of the node's process
	// group (a ^C to the node), so it outlives a node crash for Adopt.
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// Started from a thread inside the slot's namespace, QEMU lives there and
	// opens the slot's tap.
	start := cmd.Start
	if spec.Background {
		start = func() (err error) {
			v.nice, err = startNiced(backgroundNice, cmd.Start)
			return err
		}
		v.background = true
	}
	if err := spec.Slot.Do(start); err != nil {
		return nil, fmt.Errorf("start %s: %w", Binary, err)
	}
	v.proc = cmd.Process
	v.rec.Pid, v.rec.StartedAt = cmd.Process.Pid, time.Now()
	go func() {
		cmd.Wait()
		v.sig.Lock()
		close(v.done)
		v.sig.Unlock()
	}()
	if err := writeFileAtomic(v.path(pidFile), []byte(strconv.Itoa(v.rec.Pid)+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := writeJSON(v.path(recordFile), v.rec); err != nil {
		return nil, err
	}
	q, err := v.waitQMP(ctx)
	if err != nil {
		return nil, err
	}
	defer q.Close()
	if m.Incoming {
		if err := v.restore(ctx, q, spec.Snapshot, form); err != nil {
			return nil, err
		}
	}
	if spec.Resume {
		// The VM owns the files it took; the rest of the snapshot (its
		// device state, manifest) has served.
		moved = nil
		if err := os.RemoveAll(spec.Snapshot); err != nil {
			r.log.Warn("microvm: remove what is left of a resumed snapshot", "vm", spec.ID, "dir", spec.Snapshot, "err", err)
		}
	}
	return v, nil
}

// machine describes spec's VM in QEMU's terms, makes its disk overlay and
// fills v's hardware, memory and disk record. A restore's machine and
// hardware are the snapshot's, checked against spec; form is the snapshot's
// memory form. A resume moves the snapshot's files into v's directory and
// records the renames in moved.
func (r *Runtime) machine(spec runtime.Spec, v *VM, moved *moves) (m Machine, form MemoryForm, err error) {
	dir := v.dir
	m = Machine{
		Accel:      r.accel,
		CPU:        r.cpu,
		TSCkHz:     r.tscKHz,
		RootFormat: "qcow2",
		RootDisk:   filepath.Join(dir, overlayFile),
		Tap:        spec.Slot.TapName,
		MAC:        spec.Slot.GuestMAC,
		QMPSocket:  filepath.Join(dir, qmpFile),
		SerialLog:  filepath.Join(dir, serialFile),
	}
	if spec.Overlay != "" {
		abs, err := filepath.Abs(spec.Overlay)
		if err != nil {
			return m, "", err
		}
		if _, err := os.Lstat(abs); err == nil {
			return m, "", fmt.Errorf("%w: %s", errOverlayExists, abs)
		}
		m.RootDisk = abs
	}
	if spec.Snapshot != "" {
		return r.restoreMachine(spec, v, m, moved)
	}
	if spec.Resume {
		return m, "", errors.New("Resume needs a Snapshot")
	}
	for name, val := range map[string]string{"Kernel": spec.Kernel, "Initramfs": spec.Initramfs, "RootDisk": spec.RootDisk} {
		if val == "" {
			return m, "", fmt.Errorf("a cold boot needs Spec.%s", name)
		}
	}
	root, err := filepath.Abs(spec.RootDisk)
	if err != nil {
		return m, "", err
	}
	format, err := diskFormat(root)
	if err != nil {
		return m, "", err
	}
	if err := WriteOverlay(m.RootDisk, root, format); err != nil {
		return m, "", err
	}
	m.CPUs, m.MemoryMiB = spec.CPUs, spec.MemoryMiB
	// Absolute: a snapshot's manifest names them for restores from anywhere.
	if m.Kernel, err = filepath.Abs(spec.Kernel); err != nil {
		return m, "", err
	}
	if m.Initramfs, err = filepath.Abs(spec.Initramfs); err != nil {
		return m, "", err
	}
	m.Network = guestinit.Network{Addr: spec.Slot.GuestPrefix, Gateway: spec.Slot.GuestGateway}
	m.Hostname, m.InitSecret = spec.Hostname, spec.InitSecret
	m.NoASLR = !r.aslr
	// A cold-booted VM keeps its RAM in a shared file, so that Snapshot can
	// hand the file over instead of copying the memory.
	m.MemoryFile, m.MemoryShared = filepath.Join(dir, memFile), true
	if m.TransferDisk, err = newTransferDisk(dir, r.transferSize); err != nil {
		return m, "", err
	}
	v.rec.Hardware, v.rec.SharedMemory, v.rec.DiskBacking = r.hardwareOf(m, root, format), true, root
	return m, "", nil
}

// newTransferDisk makes the empty transfer disk of size bytes in the VM
// directory dir and returns its path; none when size is 0 (a restore of a
// snapshot from before the disk).
func newTransferDisk(dir string, size int64) (string, error) {
	if size == 0 {
		return "", nil
	}
	p := filepath.Join(dir, transferFile)
	if err := transfer.Create(p, size); err != nil {
		return "", fmt.Errorf("transfer disk: %w", err)
	}
	return p, nil
}

// restoreMachine is machine for a restore of spec.Snapshot. The guest's RAM:
//
//   - memory in a file, not a resume (a template's clones): the file mapped
//     copy-on-write, shared by every clone;
//   - memory in a file, a resume: the file taken over (share=on), so the
//     VM's next Snapshot hands it over again in milliseconds;
//   - memory in the stream: anonymous RAM that the stream fills. (A new
//     share=on file would make the next Snapshot fast, but filling it took
//     3 s and 565 MiB of RSS for a 512 MiB guest with 88 MiB of non-zero
//     pages, against 0.2-0.6 s and 150 MiB: QEMU 7.2 reads every zero page of
//     the target, which allocates page cache for the whole file);
//   - no memory: a new share=on file, as at a cold boot.
//
// The disk: an overlay over the snapshot's (memory in a file, not a resume),
// the snapshot's taken over (a resume), or a copy of it, so that the VM does
// not depend on the snapshot once Start returns.
func (r *Runtime) restoreMachine(spec runtime.Spec, v *VM, m Machine, moved *moves) (Machine, MemoryForm, error) {
	snap, err := r.checkSnapshot(spec)
	if err != nil {
		return m, "", err
	}
	hw := snap.Hardware
	m.CPUs, m.MemoryMiB = hw.CPUs, hw.MemoryMiB
	m.Kernel, m.Initramfs, m.Append = hw.Kernel.Path, hw.Initramfs.Path, hw.Cmdline
	m.Incoming = snap.Memory != NoMemory
	if m.Incoming {
		// The saved guest chose its code paths (and its idle and timer
		// devices) by the CPU it booted on: it restores on that model,
		// whatever cold boots use today.
		m.CPU = hw.CPU
	} else {
		// A cold boot on the saved disk: today's model and transfer disk,
		// recorded as such.
		hw.CPU, hw.TransferDisk = m.CPU, r.transferSize
	}
	// The saved guest knows its transfer disk's size (or that it had none):
	// the device must be as it was. Its content is not saved: a new, empty
	// file serves.
	if m.TransferDisk, err = newTransferDisk(v.dir, hw.TransferDisk); err != nil {
		return m, "", err
	}
	v.rec.Hardware, v.rec.DiskBacking = hw, snap.DiskBacking.Path
	disk, mem := filepath.Join(spec.Snapshot, snapDiskFile), filepath.Join(spec.Snapshot, snapMemFile)
	switch {
	case snap.Memory == MemoryInFile && !spec.Resume:
		m.MemoryFile = mem
		// The disk as it was at the save, under this VM's own overlay.
		v.rec.DiskBacking = disk
		return m, snap.Memory, WriteOverlay(m.RootDisk, disk, "qcow2")
	case snap.Memory == MemoryInFile:
		m.MemoryFile, m.MemoryShared = v.path(memFile), true
		if err := moved.move(mem, m.MemoryFile); err != nil {
			return m, "", err
		}
	case snap.Memory == NoMemory:
		m.MemoryFile, m.MemoryShared = v.path(memFile), true
	}
	v.rec.SharedMemory = m.MemoryShared
	if spec.Resume {
		return m, snap.Memory, moved.move(disk, m.RootDisk)
	}
	return m, snap.Memory, copySparse(disk, m.RootDisk)
}

// diskFormat tells a qcow2 image (by its magic) from a raw one.
func diskFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("root disk: %w", err)
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err == nil && binary.BigEndian.Uint32(magic[:]) == qcowMagic {
		return "qcow2", nil
	}
	return "raw", nil
}

// waitQMP connects to the new QEMU's QMP socket, which appears once QEMU has
// set up the machine.
func (v *VM) waitQMP(ctx context.Context) (*qmp, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		q, err := dialQMP(ctx, v.path(qmpFile))
		if err == nil {
			return q, nil
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("%s exited at start", Binary)
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP socket: %w (last: %v)", ctx.Err(), err)
		case <-time.After(time.Millisecond):
		}
	}
}

// signal sends sig to QEMU unless it has exited (and its pid may be reused).
func (v *VM) signal(sig syscall.Signal) error {
	v.sig.Lock()
	defer v.sig.Unlock()
	if v.exited() {
		return nil
	}
	return v.proc.Signal(sig)
}

// Kill asks QEMU to quit, kills it if it has not within a second, waits for
// it to exit and removes the VM's state directory.
func (r *Runtime) Kill(ctx context.Context, rv runtime.VM) error {
	v, err := r.own(rv)
	if err != nil {
		return err
	}
	v.ops.Lock()
	defer v.ops.Unlock()
	if !v.exited() {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		if q, err := dialQMP(qctx, v.path(qmpFile)); err == nil {
			// QEMU may close the socket before it answers; the wait decides.
			q.execute(qctx, "quit", nil, nil)
			q.Close()
		}
		select {
		case <-v.done:
		case <-qctx.Done():
		}
		cancel()
		if err := v.signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("microvm: kill %s (pid %d): %w", v.ID(), v.Pid(), err)
		}
		select {
		case <-v.done:
		case <-ctx.Done():
			return fmt.Errorf("microvm: kill %s: pid %d has not exited: %w", v.ID(), v.Pid(), ctx.Err())
		}
	}
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("microvm: kill %s: remove state: %w", v.ID(), err)
	}
	return nil
}

// own checks that rv is a VM of this runtime.
func (r *Runtime) own(rv runtime.VM) (*VM, error) {
	v, ok := rv.(*VM)
	if !ok || v == nil {
		return nil, fmt.Errorf("microvm: %T is not a microvm VM", rv)
	}
	if filepath.Dir(v.dir) != filepath.Clean(r.root) {
		return nil, fmt.Errorf("microvm: VM %s lives in %s, not in this runtime's %s", v.ID(), v.dir, r.root)
	}
	return v, nil
}

// Stats reads QEMU's memory use from /proc/<pid>/smaps_rollup and its CPU
// time from /proc/<pid>/stat.
func (r *Runtime) Stats(ctx context.Context, rv runtime.VM) (*runtime.Stats, error) {
	v, err := r.own(rv)
	if err != nil {
		return nil, err
	}
	v.sig.Lock() // the pid is QEMU's while it has not exited
	defer v.sig.Unlock()
	if v.exited() {
		return nil, fmt.Errorf("microvm: stats of %s: QEMU has exited", v.ID())
	}
	return processStats(v.Pid())
}

func processStats(pid int) (*runtime.Stats, error) {
	s := &runtime.Stats{}
	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return nil, fmt.Errorf("microvm: stats: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(rollup))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "Rss:":
			s.RSS = kb << 10
		case "Pss:":
			s.PSS = kb << 10
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, fmt.Errorf("microvm: stats: %w", err)
	}
	// The command name may hold spaces; the fields after it are fixed:
	// utime and stime are the 14th and 15th, in clock ticks (USER_HZ, 100).
	_, rest, _ := bytes.Cut(stat, []byte(") "))
	f := strings.Fields(string(rest))
	if len(f) < 13 {
		return nil, fmt.Errorf("microvm: stats: /proc/%d/stat is short: %q", pid, stat)
	}
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	s.CPUTime = time.Duration(ut+st) * 10 * time.Millisecond
	return s, nil
}

// List returns the IDs of the VMs with a state directory under Root.
func (r *Runtime) List(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(r.root)
	if err != nil {
		return nil, fmt.Errorf("microvm: list: %w", err)
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && validID.MatchString(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// Adopt rebuilds the handle of the VM with this id from its state directory.
// A VM whose QEMU is gone comes back with Done closed; Kill removes its state.
// An id without a state directory is an error (os.ErrNotExist).
func (r *Runtime) Adopt(ctx context.Context, id string) (runtime.VM, error) {
	if !validID.MatchString(id) {
		return nil, fmt.Errorf("microvm: adopt: VM id %q is not valid", id)
	}
	dir := filepath.Join(r.root, id)
	v := &VM{dir: dir, done: make(chan struct{})}
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("microvm: adopt %s: %w", id, err)
	}
	b, err := os.ReadFile(v.path(recordFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			// Start died before it wrote the record: nothing can run.
			v.rec.ID = id
			close(v.done)
			return v, nil
		}
		return nil, fmt.Errorf("microvm: adopt %s: %w", id, err)
	}
	if err := json.Unmarshal(b, &v.rec); err != nil {
		return nil, fmt.Errorf("microvm: adopt %s: %s: %w", id, v.path(recordFile), err)
	}
	// The pid file is written once QEMU runs; without it, look for a QEMU
	// that names this VM's socket (Start died between the two).
	pid := 0
	if b, err := os.ReadFile(v.path(pidFile)); err == nil {
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if pid == 0 || !isQEMUOf(pid, v.path(qmpFile)) {
		pid = findQEMUOf(v.path(qmpFile))
	}
	if pid == 0 {
		close(v.done)
		return v, nil
	}
	v.rec.Pid = pid
	// os.FindProcess holds a pidfd: signals reach this process even if its
	// pid is later reused. QEMU is not our child, so its exit is watched
	// through another pidfd instead of wait.
	if v.proc, err = os.FindProcess(pid); err != nil {
		return nil, fmt.Errorf("microvm: adopt %s: %w", id, err)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			close(v.done)
			return v, nil
		}
		return nil, fmt.Errorf("microvm: adopt %s: pidfd_open %d: %w", id, pid, err)
	}
	if !isQEMUOf(pid, v.path(qmpFile)) { // the pid was reused before the pidfd pinned it
		unix.Close(fd)
		close(v.done)
		return v, nil
	}
	go func() {
		defer unix.Close(fd)
		for {
			// A pidfd turns readable when its process exits.
			_, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, -1)
			if err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		v.sig.Lock()
		close(v.done)
		v.sig.Unlock()
	}()
	return v, nil
}

// isQEMUOf reports whether pid is a QEMU serving the QMP socket qmpSocket.
func isQEMUOf(pid int, qmpSocket string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	want := "unix:" + escape(qmpSocket) + ","
	for i, a := range args {
		if a == "-qmp" && i+1 < len(args) && strings.HasPrefix(args[i+1], want) {
			return true
		}
	}
	return false
}

// findQEMUOf returns the pid of the QEMU serving qmpSocket, or 0.
func findQEMUOf(qmpSocket string) int {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && isQEMUOf(pid, qmpSocket) {
			return pid
		}
	}
	return 0
}

// withLogTail adds the end of QEMU's own output to err: QEMU says there why
// it refused to start or restore.
func withLogTail(err error, log string) error {
	b, rerr := os.ReadFile(log)
	if rerr != nil || len(bytes.TrimSpace(b)) == 0 {
		return err
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return fmt.Errorf("%w; %s said: %s", err, Binary, bytes.TrimSpace(b))
}

// writeJSON writes v as indented JSON to p atomically.
func writeJSON(p string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", p, err)
	}
	return writeFileAtomic(p, append(b, '\n'), 0o600)
}

// writeFileAtomic writes data to a temporary file next to p and renames it
// over p: readers see the old file or the new one, never a torn one.
func writeFileAtomic(p string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}
