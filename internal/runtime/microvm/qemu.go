// Package microvm runs sandboxes as QEMU microvm virtual machines: Debian's
// cloud kernel, warren's initramfs with envd as init, a virtio-blk root disk and
// virtio-net on a tap device inside the sandbox's network namespace.
package microvm

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/warren-sh/warren/internal/envd/guestinit"
	"github.com/warren-sh/warren/internal/transfer"
)

// Binary is the QEMU system emulator warren runs (Debian's qemu-system-x86).
const Binary = "qemu-system-x86_64"

// Accel is how QEMU runs guest code.
type Accel string

const (
	// KVM runs the guest on the CPU's hardware virtualization.
	KVM Accel = "kvm"
	// TCG emulates the CPU in software: several times slower, works anywhere.
	TCG Accel = "tcg"
)

// DetectAccel picks KVM when the CPU advertises hardware virtualization (vmx
// or svm) and /dev/kvm opens, TCG otherwise; why names the reason for TCG so
// callers can warn. A /dev/kvm without vmx/svm is a paravirtual one (such as
// kvm-pvm) that cannot run a stock kernel.
func DetectAccel() (accel Accel, why string) {
	flags, err := cpuFlags()
	if err != nil {
		return TCG, fmt.Sprintf("cannot read CPU flags: %v", err)
	}
	if !flags["vmx"] && !flags["svm"] {
		return TCG, "the CPU has no hardware virtualization (vmx/svm); a /dev/kvm here cannot run a stock guest kernel"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return TCG, fmt.Sprintf("/dev/kvm: %v", err)
	}
	f.Close()
	return KVM, ""
}

// cpuFlags returns the flags of the first CPU in /proc/cpuinfo.
func cpuFlags() (map[string]bool, error) {
	v, err := cpuinfo("flags")
	if err != nil {
		return nil, err
	}
	flags := map[string]bool{}
	for _, f := range strings.Fields(v) {
		flags[f] = true
	}
	return flags, nil
}

// HostTSCkHz is the host's TSC frequency in kHz. Under TCG the guest's TSC is
// the host's, and the guest kernel must be told its rate (tsc_early_khz):
// calibrating it under emulation is slow and can hang. It reads /proc/cpuinfo's
// "cpu MHz", which is the TSC rate on hosts with a constant TSC.
func HostTSCkHz() (int, error) {
	v, err := cpuinfo("cpu MHz")
	if err != nil {
		return 0, err
	}
	mhz, err := strconv.ParseFloat(v, 64)
	if err != nil || mhz <= 0 {
		return 0, fmt.Errorf("/proc/cpuinfo: cpu MHz %q is not a frequency", v)
	}
	return int(mhz * 1000), nil
}

// cpuinfo returns the first value of key in /proc/cpuinfo.
func cpuinfo(key string) (string, error) {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("/proc/cpuinfo has no %q line", key)
}

// Machine is one VM as QEMU sees it: everything its command line needs.
type Machine struct {
	Accel Accel
	// CPU is the guest CPU model (-cpu); empty: the accelerator's default
	// (cpuModel). A restore must repeat its snapshot's: the saved guest
	// kernel chose its code paths by the CPU's features.
	CPU       string
	CPUs      int // 0: 1
	MemoryMiB int // 0: 256
	// TSCkHz is the host TSC rate (HostTSCkHz); required under TCG.
	TSCkHz int

	Kernel    string // guest.Kernel.Image: vmlinux with a PVH entry (a bzImage boots too, slower)
	Initramfs string // guest.BuildInitramfs
	// RootDisk is the guest's /dev/vda, an ext4 image; RootFormat is its QEMU
	// format ("raw", or "qcow2" for an overlay).
	RootDisk, RootFormat string
	// TransferDisk, when set, is the VM's transfer disk (internal/transfer):
	// a raw file the host writes upload bytes into and the guest reads, a
	// second virtio-blk device with the serial transfer.Serial. A restore
	// must have it exactly when its snapshot had it, of the same size.
	TransferDisk string

	// Tap is the tap device in QEMU's network namespace that carries eth0;
	// MAC is the guest's (netns.Slot.GuestMAC). The MAC must be the same in
	// every VM: a restored guest keeps the neighbour cache of its snapshot,
	// and clones given a new MAC answered only after ~44 s (notes/MEASURED.md).
	Tap string
	MAC net.HardwareAddr
	// Network is the guest's eth0 address and gateway; Hostname its hostname;
	// InitSecret envd's --init-secret. They reach init as kernel arguments.
	Network    guestinit.Network
	Hostname   string
	InitSecret string
	// NoASLR turns off the guest's address space randomization (the
	// kernel's norandmaps; see Config.GuestASLR).
	NoASLR bool
	// Append, when set, is the whole kernel command line instead of one built
	// from the fields above: a restore repeats its snapshot's.
	Append string

	// MemoryFile, when set, holds the guest's RAM (memory-backend-file);
	// otherwise the RAM is anonymous memory (memory-backend-ram).
	// MemoryShared writes the guest's RAM to the file (share=on), which lets a
	// snapshot skip copying it (a new file, or a paused VM's own memory);
	// otherwise the file is a snapshot's memory, mapped copy-on-write
	// (share=off) and never written.
	MemoryFile   string
	MemoryShared bool
	// Incoming starts the VM paused, waiting for a migration stream
	// (migrate-incoming over QMP): a restore. The stream fills the RAM, or,
	// when it skips a shared RAM block (x-ignore-shared), MemoryFile is it.
	// A stream that skipped the RAM needs the snapshot's MemoryFile.
	Incoming bool

	QMPSocket string // unix socket QEMU listens on for QMP
	SerialLog string // file that receives the guest console
}

// machineOptions is microvm's -M value. qboot (Debian's microvm firmware) and
// ACPI stay on: the cloud kernel finds the virtio-mmio slots only through the
// ACPI DSDT. The RTC stays too (rtc=off cost 2 s); pit/pic off and no option
// ROMs save boot time.
const machineOptions = "microvm,x-option-roms=off,isa-serial=on,pit=off,pic=off"

// cpuModel is the guest CPU cold boots get per accelerator: under KVM the
// host's, under TCG tcgCPU. A restore repeats its snapshot's model instead
// (Machine.CPU), so changing this one leaves saved VMs restorable.
func cpuModel(a Accel) string { return map[Accel]string{KVM: "host", TCG: tcgCPU}[a] }

// tcgCPU is the guest CPU under TCG: qemu64 with what x86-64-v3 needs. E2B's
// sandboxes run on the host's CPU (Firecracker on KVM), so templates expect
// at least x86-64-v2 (RHEL 9 and its rebuilds: glibc refuses to start below
// it) and usually v3 (AVX2 wheels such as polars; numpy picks its code paths
// by the CPU). QEMU 7.2's TCG implements every flag here without a warning.
//
// qemu64 rather than a named model: it is AMD, and the guest kernel treats an
// Intel model without microcode (Haswell, Skylake...) as open to Meltdown and
// MDS, so it isolates its page tables (a CR3 switch, which TCG answers with a
// whole TLB flush, on every system call and interrupt) and clears CPU buffers
// on every return to user space; a named model also brings features TCG lacks
// (x2apic, tsc-deadline, pcid, invpcid) and warns about them.
//
// Left out, though TCG has them (-cpu max enables them all):
//   - erms: the guest kernel (memcpy, copy_to_user, clear_page) and glibc's
//     memcpy then copy with rep movsb, which TCG runs one byte per
//     iteration: under -cpu max a guest read /dev/zero at 255 MB/s against
//     1.4-2.4 GB/s under max without erms, and 100 MiB uploads through the
//     SDK ran at 49 MiB/s against 78 (BENCHMARKS.md);
//   - the rest of max (monitor/mwait, pku, smap/smep/umip, mpx, rdtscp,
//     rdrand, adx...): nothing x86-64-v3 or the wheels above need. max
//     idles no busier than this model (an AMD guest idles in hlt, not
//     mwait, and its tick stops alike), but its features change with QEMU's
//     version, a list of flags does not.
const tcgCPU = "qemu64" +
	// x86-64-v2; qemu64 has its SSE3, CMPXCHG16B and LAHF/SAHF already.
	",+ssse3,+sse4.1,+sse4.2,+popcnt" +
	// x86-64-v3: abm is LZCNT; xsave makes the guest kernel enable the AVX
	// state (OSXSAVE), without which AVX is unusable.
	",+avx,+avx2,+bmi1,+bmi2,+fma,+f16c,+abm,+movbe,+xsave" +
	// Every CPU with AVX has XSAVEOPT, and without it (CPUID leaf 0xD.1
	// empty) the guest kernel hangs early in boot, where it turns XSAVE on
	// (at a CR4 write), under QEMU 7.2's TCG.
	",+xsaveopt" +
	// PCLMULQDQ and AES-NI: every x86-64-v3 CPU has them; polars' wheels
	// require PCLMULQDQ, and crypto libraries pick them at run time.
	",+pclmulqdq,+aes" +
	// ARAT (the local APIC timer keeps running in idle): without it the
	// kernel needs a broadcast timer for one-shot ticks, and with pit=off
	// and no HPET it has none, so it ticks periodically at HZ on every vCPU
	// even when idle (~250 interrupts a second each, 110-130 ms of host CPU
	// a second per idle guest). With it the tick stops in idle (NO_HZ_IDLE).
	",+arat"

// Args returns QEMU's command line (without the binary).
func (m Machine) Args() ([]string, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	cpus, mem := max(m.CPUs, 1), m.memoryMiB()
	machine := machineOptions
	var memory []string
	// The RAM block is "ram" whatever backs it: a migration stream names it.
	if m.MemoryFile != "" {
		// x-ignore-shared skips a shared RAM block in the migration stream:
		// the file already is the memory.
		share := map[bool]string{true: "on", false: "off"}[m.MemoryShared]
		memory = []string{"-object", fmt.Sprintf("memory-backend-file,id=ram,size=%dM,mem-path=%s,share=%s", mem, escape(m.MemoryFile), share)}
	} else {
		memory = []string{"-object", fmt.Sprintf("memory-backend-ram,id=ram,size=%dM", mem)}
	}
	machine += ",memory-backend=ram"
	args := []string{
		"-M", machine,
		"-accel", string(m.Accel),
		"-cpu", cmp.Or(m.CPU, cpuModel(m.Accel)),
		"-smp", strconv.Itoa(cpus),
		"-m", strconv.Itoa(mem),
	}
	args = append(args, memory...)
	args = append(args,
		"-nodefaults", "-no-user-config", "-display", "none",
		// A guest reset (or panic=-1) ends QEMU instead of rebooting.
		"-no-reboot",
		"-serial", "file:"+m.SerialLog,
		"-kernel", m.Kernel,
		"-initrd", m.Initramfs,
		"-append", m.cmdline(),
		// cache=unsafe: the guest's flushes (ext4's journal commits, every
		// fsync in it) do not reach the host's disk, as under Firecracker's
		// default. A sandbox's disk lives no longer than the host's uptime
		// anyway (its memory does not survive a host crash either), and each
		// forwarded flush made QEMU fdatasync the overlay: a 100 MiB write in
		// the guest took 0.7-1.1 s instead of 0.2-0.5 whenever a journal
		// commit fell into it. QEMU still writes its own caches (qcow2
		// metadata) to the file when it stops or migrates, so a saved disk
		// is whole.
		"-drive", "id=root,if=none,format="+m.RootFormat+",cache=unsafe,file="+escape(m.RootDisk),
		"-device", "virtio-blk-device,drive=root",
		"-netdev", "tap,id=net0,ifname="+escape(m.Tap)+",script=no,downscript=no",
		"-device", "virtio-net-device,netdev=net0,mac="+m.MAC.String(),
		"-qmp", "unix:"+escape(m.QMPSocket)+",server=on,wait=off",
	)
	if m.TransferDisk != "" {
		args = append(args, transferArgs(m.TransferDisk)...)
	}
	if m.Incoming {
		// -S keeps the restored VM paused until the runtime says cont.
		args = append(args, "-incoming", "defer", "-S")
	}
	return args, nil
}

// transferArgs attach the transfer disk at path. The guest only reads it
// (read-only=on: it cannot write slots the host hands out), and the host
// writes the file behind QEMU's back, so QEMU must keep no copy of its own:
// raw, read through the host's page cache (cache=writeback), where the
// host's writes land, with O_DIRECT in the guest to skip the guest's cache.
//
// It comes last on the command line, so that the root disk stays the
// guest's /dev/vda: microvm gives each -device the next free virtio-mmio
// transport from the top (root 0xfeb02e00, net the one below, this disk the
// next), its ACPI table lists them in that order, and the guest probes them
// so (virtio0, virtio1...). Put before the root disk, this disk became vda
// and init failed to mount the root. TestTransferDisk checks vda and vdb.
func transferArgs(path string) []string {
	return []string{
		"-drive", "id=transfer,if=none,format=raw,read-only=on,cache=writeback,file=" + escape(path),
		"-device", "virtio-blk-device,drive=transfer,serial=" + transfer.Serial,
	}
}

func (m Machine) memoryMiB() int {
	if m.MemoryMiB == 0 {
		return 256
	}
	return m.MemoryMiB
}

// cmdline is the guest kernel's command line. Unknown key=value arguments
// reach envd's init as environment variables (guestinit.Env*, and envd's own
// WARREN_ENVD_* settings).
func (m Machine) cmdline() string {
	if m.Append != "" {
		return m.Append
	}
	args := []string{
		"console=ttyS0", "quiet", "8250.nr_uarts=1",
		// A kernel panic resets at once, which ends QEMU (-no-reboot).
		"panic=-1",
	}
	if m.Accel == TCG {
		// Without these the kernel may hang calibrating the TSC under TCG.
		args = append(args, "tsc_early_khz="+strconv.Itoa(m.TSCkHz), "tsc=reliable")
	}
	if m.NoASLR {
		args = append(args, "norandmaps")
	}
	args = append(args, guestinit.EnvAddr+"="+m.Network.Addr.String())
	if m.Network.Gateway.IsValid() {
		args = append(args, guestinit.EnvGateway+"="+m.Network.Gateway.String())
	}
	if m.Hostname != "" {
		args = append(args, guestinit.EnvHostname+"="+m.Hostname)
	}
	if m.InitSecret != "" {
		// envd reads it from its environment (cmd/envd); processes it starts
		// get their environment from envd, not this one.
		args = append(args, "WARREN_ENVD_INIT_SECRET="+m.InitSecret)
	}
	return strings.Join(args, " ")
}

func (m Machine) validate() error {
	var errs []error
	switch m.Accel {
	case KVM:
	case TCG:
		if m.TSCkHz <= 0 && m.Append == "" {
			errs = append(errs, errors.New("TSCkHz is required under TCG (see HostTSCkHz)"))
		}
	default:
		errs = append(errs, fmt.Errorf("accel %q is not one of kvm, tcg", m.Accel))
	}
	if m.RootFormat != "raw" && m.RootFormat != "qcow2" {
		errs = append(errs, fmt.Errorf("root disk format %q is not one of raw, qcow2", m.RootFormat))
	}
	for name, v := range map[string]string{
		"Kernel": m.Kernel, "Initramfs": m.Initramfs, "RootDisk": m.RootDisk,
		"Tap": m.Tap, "QMPSocket": m.QMPSocket, "SerialLog": m.SerialLog,
	} {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	if len(m.MAC) != 6 {
		errs = append(errs, fmt.Errorf("MAC %q is not an Ethernet address", m.MAC))
	}
	if m.Append == "" {
		if !m.Network.Addr.IsValid() || !m.Network.Addr.Addr().Is4() {
			errs = append(errs, fmt.Errorf("network address %v is not an IPv4 prefix", m.Network.Addr))
		}
		if m.Network.Gateway.IsValid() && !m.Network.Addr.Masked().Contains(m.Network.Gateway) {
			errs = append(errs, fmt.Errorf("gateway %s is outside %s", m.Network.Gateway, m.Network.Addr.Masked()))
		}
		for name, v := range map[string]string{"hostname": m.Hostname, "init secret": m.InitSecret} {
			if strings.ContainsAny(v, " \t\n\"") {
				errs = append(errs, fmt.Errorf("%s %q contains white space or quotes (it is a kernel argument)", name, v))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid machine: %w", err)
	}
	return nil
}

// escape doubles commas, QEMU's escape inside a comma-separated option value.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }
