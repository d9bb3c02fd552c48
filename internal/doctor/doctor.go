// Package doctor checks whether a host can run warren and says how to fix
// what it cannot: QEMU, the guest kernel, which kind of KVM the host has,
// network namespaces, nftables, forwarding, the data directory and the
// tools that build the base image.
//
// Every check is a pure classification of facts (a file's text, a command's
// output, an error) plus a small probe that gathers them, so the
// classifications are tested with made-up facts and the probes on the host.
package doctor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/blob"
	"github.com/warren-sh/warren/internal/guest"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// Status is a check's verdict.
type Status string

// The verdicts: WARN works with a cost (speed, a feature), FAIL does not work.
const (
	OK   Status = "OK"
	Warn Status = "WARN"
	Fail Status = "FAIL"
)

// Check is one finding.
type Check struct {
	// Name is short and stable ("qemu", "kvm", ...).
	Name   string `json:"name"`
	Status Status `json:"status"`
	// Detail says what was found.
	Detail string `json:"detail"`
	// Fix is what to do about a WARN or FAIL: a command where there is one.
	Fix string `json:"fix,omitempty"`
}

// Report is everything doctor found.
type Report struct {
	DataDir string  `json:"dataDir"`
	KVM     KVMKind `json:"kvm"`
	Checks  []Check `json:"checks"`
}

// Failed counts the checks that failed.
func (r *Report) Failed() int {
	n := 0
	for _, c := range r.Checks {
		if c.Status == Fail {
			n++
		}
	}
	return n
}

// WriteText prints the report for a person: one line per check, its fix
// indented below.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "warren doctor: data dir %s\n\n", r.DataDir)
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-4s  %-18s  %s\n", c.Status, c.Name, c.Detail)
		if c.Fix != "" {
			fmt.Fprintf(&b, "      %-18s  fix: %s\n", "", c.Fix)
		}
	}
	if n := r.Failed(); n > 0 {
		fmt.Fprintf(&b, "\n%d check(s) failed: warren cannot run sandboxes here until they are fixed\n", n)
	} else {
		fmt.Fprintf(&b, "\nwarren can run sandboxes here (KVM: %s)\n", r.KVM)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// MinFreeDisk is the free space below which the data directory gets a WARN:
// the base template alone takes about 2 GiB, each sandbox's disk overlay grows
// with what it writes.
const MinFreeDisk = 5 << 30

// Run checks this host for a node whose data lives in dataDir.
func Run(ctx context.Context, dataDir string) *Report {
	r := &Report{DataDir: dataDir}
	r.Checks = append(r.Checks, checkRoot(os.Geteuid()))
	r.Checks = append(r.Checks, checkQEMU(ctx), checkQEMUImg(ctx))
	r.Checks = append(r.Checks, checkKernel(ctx, dataDir))
	kind, c := ClassifyKVM(gatherKVMFacts())
	r.KVM = kind
	r.Checks = append(r.Checks, c)
	netnsErr, nftErr := probeNetns()
	r.Checks = append(r.Checks, classifyNetns(netnsErr), classifyNftables(netnsErr, nftErr))
	fwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	r.Checks = append(r.Checks, classifyIPForward(string(fwd), err))
	r.Checks = append(r.Checks, checkForwardPolicy(ctx))
	r.Checks = append(r.Checks, checkDataDir(dataDir), checkDisk(dataDir), checkStorage(ctx, dataDir))
	r.Checks = append(r.Checks, checkBuildTools())
	return r
}

// --- root

func checkRoot(euid int) Check {
	c := Check{Name: "root"}
	if euid == 0 {
		c.Status, c.Detail = OK, "running as root"
		return c
	}
	c.Status, c.Detail = Fail, fmt.Sprintf("running as uid %d", euid)
	c.Fix = "run warren as root (sudo warren ...): it creates network namespaces, nftables tables and tap devices"
	return c
}

// --- QEMU

func checkQEMU(ctx context.Context) Check {
	out, err := command(ctx, microvm.Binary, "--version")
	if err != nil {
		return Check{Name: "qemu", Status: Fail, Detail: fmt.Sprintf("%s: %v", microvm.Binary, err),
			Fix: "apt-get install -y qemu-system-x86"}
	}
	machines, _ := command(ctx, microvm.Binary, "-machine", "help")
	return classifyQEMU(out, machines)
}

// classifyQEMU reads `qemu-system-x86_64 --version` and `-machine help`.
func classifyQEMU(version, machines string) Check {
	c := Check{Name: "qemu"}
	first, _, _ := strings.Cut(version, "\n")
	_, v, ok := strings.Cut(first, "version ")
	if !ok {
		c.Status, c.Detail = Fail, fmt.Sprintf("%s --version printed %q, not a version", microvm.Binary, first)
		c.Fix = "apt-get install --reinstall -y qemu-system-x86"
		return c
	}
	if !hasMachine(machines, "microvm") {
		c.Status, c.Detail = Fail, fmt.Sprintf("QEMU %s has no microvm machine type", v)
		c.Fix = "install Debian's QEMU, which has it: apt-get install -y qemu-system-x86"
		return c
	}
	c.Status, c.Detail = OK, fmt.Sprintf("QEMU %s with the microvm machine", v)
	return c
}

func hasMachine(help, name string) bool {
	for _, line := range strings.Split(help, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}

func checkQEMUImg(ctx context.Context) Check {
	out, err := command(ctx, "qemu-img", "--version")
	if err != nil {
		return Check{Name: "qemu-img", Status: Warn, Detail: fmt.Sprintf("qemu-img: %v", err),
			Fix: "apt-get install -y qemu-utils (warren writes its disk overlays itself; qemu-img inspects them and the tests use it)"}
	}
	first, _, _ := strings.Cut(out, "\n")
	return Check{Name: "qemu-img", Status: OK, Detail: strings.TrimSpace(first)}
}

// --- guest kernel

func checkKernel(ctx context.Context, dataDir string) Check {
	cached, _ := filepath.Glob(filepath.Join(dataDir, "kernels", "linux-image-*", "boot", "vmlinu*"))
	var policy string
	var err error
	if len(cached) == 0 {
		policy, err = command(ctx, "apt-cache", "policy", guest.KernelPackage)
	}
	return classifyKernel(dataDir, cached, policy, err)
}

// classifyKernel decides from the kernels cached in dataDir or, without
// one, from `apt-cache policy linux-image-cloud-amd64`.
func classifyKernel(dataDir string, cached []string, aptPolicy string, aptErr error) Check {
	c := Check{Name: "guest kernel"}
	if len(cached) > 0 {
		pkg := filepath.Base(filepath.Dir(filepath.Dir(cached[0])))
		c.Status, c.Detail = OK, fmt.Sprintf("cached: %s in %s", pkg, filepath.Join(dataDir, "kernels"))
		return c
	}
	if aptErr != nil {
		c.Status, c.Detail = Fail, fmt.Sprintf("no kernel cached in %s and apt-cache failed: %v", filepath.Join(dataDir, "kernels"), aptErr)
		c.Fix = "warren fetches Debian's " + guest.KernelPackage + " with apt: run it on Debian 12 (bookworm)"
		return c
	}
	candidate := aptCandidate(aptPolicy)
	if candidate == "" {
		c.Status, c.Detail = Fail, fmt.Sprintf("no kernel cached and apt knows no candidate for %s", guest.KernelPackage)
		c.Fix = "apt-get update (with Debian's main repository in /etc/apt/sources.list)"
		return c
	}
	c.Status = OK
	c.Detail = fmt.Sprintf("not cached yet; %s %s is fetched on first start (apt-get download, never installed)", guest.KernelPackage, candidate)
	return c
}

// aptCandidate reads the Candidate line of `apt-cache policy`; "" for none.
func aptCandidate(policy string) string {
	for _, line := range strings.Split(policy, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate:"); ok {
			v = strings.TrimSpace(v)
			if v == "(none)" {
				return ""
			}
			return v
		}
	}
	return ""
}

// --- KVM

// KVMKind is the kind of KVM a host offers.
type KVMKind string

// The kinds of KVM.
const (
	// KVMHardware is KVM on the CPU's virtualization extensions (vmx/svm):
	// microVMs run at native speed.
	KVMHardware KVMKind = "hardware"
	// KVMParavirtual is a /dev/kvm without hardware extensions (kvm-pvm, a
	// nested "Pagetable-based Virtual Machine"): it runs only guest kernels
	// built for it, so microVMs run under TCG.
	KVMParavirtual KVMKind = "paravirtual"
	// KVMNone is no usable KVM: microVMs run under TCG.
	KVMNone KVMKind = "none"
)

// KVMFacts is what the KVM check looks at.
type KVMFacts struct {
	// CPUInfo is /proc/cpuinfo.
	CPUInfo string
	// DevKVM is the error opening /dev/kvm read-write; nil if it opened.
	DevKVM error
	// PVMModule says whether /sys/module/kvm_pvm exists.
	PVMModule bool
	// KernelLog is the kernel's log (dmesg), or what of it could be read.
	KernelLog string
}

func gatherKVMFacts() KVMFacts {
	var f KVMFacts
	b, _ := os.ReadFile("/proc/cpuinfo")
	f.CPUInfo = string(b)
	if kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		f.DevKVM = err
	} else {
		kvm.Close()
	}
	_, err := os.Stat("/sys/module/kvm_pvm")
	f.PVMModule = err == nil
	f.KernelLog = kernelLog()
	return f
}

// kernelLog reads the kernel's ring buffer (as dmesg does; root only).
func kernelLog() string {
	n, err := unix.Klogctl(unix.SYSLOG_ACTION_SIZE_BUFFER, nil)
	if err != nil || n <= 0 {
		return ""
	}
	buf := make([]byte, n)
	n, err = unix.Klogctl(unix.SYSLOG_ACTION_READ_ALL, buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// ClassifyKVM tells hardware KVM from a paravirtual one (kvm-pvm) and from
// none, the way the microvm runtime picks its accelerator.
func ClassifyKVM(f KVMFacts) (KVMKind, Check) {
	c := Check{Name: "kvm"}
	flags := cpuFlags(f.CPUInfo)
	hw := flags["vmx"] || flags["svm"]
	pvm := f.PVMModule || strings.Contains(f.KernelLog, "kvm-pvm") || strings.Contains(f.KernelLog, "kvm_pvm")
	const tcg = "microVMs run under TCG, software emulation, several times slower than KVM"
	switch {
	case pvm || (!hw && f.DevKVM == nil):
		c.Status = Warn
		c.Detail = "paravirtual (kvm-pvm): /dev/kvm cannot run a stock guest kernel: " + tcg
		if !pvm {
			c.Detail = "paravirtual: /dev/kvm opens but the CPU has no vmx/svm, so it cannot run a stock guest kernel: " + tcg
		}
		c.Fix = "for KVM speed, run warren on a host whose CPU exposes VT-x/AMD-V: bare metal, or a cloud VM with nested virtualization enabled"
		return KVMParavirtual, c
	case hw && f.DevKVM == nil:
		c.Status, c.Detail = OK, "hardware (vmx/svm, /dev/kvm opens): microVMs run under KVM"
		return KVMHardware, c
	case hw:
		c.Status = Warn
		c.Detail = fmt.Sprintf("the CPU has vmx/svm but /dev/kvm: %v; %s", f.DevKVM, tcg)
		c.Fix = "modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD); if it fails, enable virtualization in the firmware setup"
		return KVMNone, c
	default:
		c.Status = Warn
		c.Detail = "none: the CPU has no vmx/svm and there is no usable /dev/kvm; " + tcg
		c.Fix = "enable VT-x/AMD-V in the firmware setup, or on a cloud VM pick an instance type with nested virtualization"
		return KVMNone, c
	}
}

// cpuFlags returns the flags line of the first CPU in cpuinfo.
func cpuFlags(cpuinfo string) map[string]bool {
	flags := map[string]bool{}
	for _, line := range strings.Split(cpuinfo, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			for _, f := range strings.Fields(v) {
				flags[f] = true
			}
			break
		}
	}
	return flags
}

// --- network namespaces and nftables

// probeNetns creates a network namespace on a thread of its own and, inside
// it, an nftables table over netlink: the host's own rules are not touched.
// The thread is never unlocked, so it exits with its goroutine and the
// namespace goes with it.
func probeNetns() (netnsErr, nftErr error) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		goruntime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			netnsErr = fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			netnsErr = fmt.Errorf("open the new namespace: %w", err)
			return
		}
		defer unix.Close(fd)
		nftErr = probeNftables(fd)
	}()
	<-done
	return netnsErr, nftErr
}

func probeNftables(netnsFd int) error {
	c, err := nftables.New(nftables.WithNetNSFd(netnsFd))
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Name: "warren-doctor", Family: nftables.TableFamilyINet})
	policy := nftables.ChainPolicyAccept
	c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add a table and a chain: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("list tables: %w", err)
	}
	for _, got := range tables {
		if got.Name == t.Name {
			return nil
		}
	}
	return errors.New("the table just added is not listed")
}

func classifyNetns(err error) Check {
	if err != nil {
		return Check{Name: "network namespaces", Status: Fail, Detail: err.Error(),
			Fix: "run as root on a kernel with CONFIG_NET_NS; inside a container, give it CAP_SYS_ADMIN and CAP_NET_ADMIN (or run warren on the host)"}
	}
	return Check{Name: "network namespaces", Status: OK, Detail: "a new network namespace can be created"}
}

func classifyNftables(netnsErr, nftErr error) Check {
	c := Check{Name: "nftables"}
	switch {
	case netnsErr != nil:
		c.Status, c.Detail = Fail, "not checked: no network namespace to check it in"
		c.Fix = "fix network namespaces first"
	case nftErr != nil:
		c.Status, c.Detail = Fail, fmt.Sprintf("nftables over netlink: %v", nftErr)
		c.Fix = "load the nf_tables module (modprobe nf_tables; Debian's kernel has it); the nft tool is not needed"
	default:
		c.Status, c.Detail = OK, "nftables tables and chains can be created over netlink"
	}
	return c
}

// --- forwarding

func classifyIPForward(value string, err error) Check {
	c := Check{Name: "ip_forward"}
	const persist = "echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-warren.conf && sysctl --system"
	switch {
	case err != nil:
		c.Status, c.Detail, c.Fix = Fail, fmt.Sprintf("read net.ipv4.ip_forward: %v", err), "run on Linux with IPv4 networking"
	case strings.TrimSpace(value) == "1":
		c.Status, c.Detail = OK, "net.ipv4.ip_forward = 1"
	default:
		c.Status = Warn
		c.Detail = "net.ipv4.ip_forward = " + strings.TrimSpace(value) + ": warren turns it on when the node starts, but something may turn it off again"
		c.Fix = persist
	}
	return c
}

// checkForwardPolicy looks for an iptables FORWARD chain with policy DROP
// (Docker sets one): it drops sandbox traffic to the internet, which the host
// forwards. iptables-nft chains are read over netlink; iptables-legacy's
// only through its tool, when installed.
func checkForwardPolicy(ctx context.Context) Check {
	var drop []string
	if c, err := nftables.New(); err == nil {
		if chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4); err == nil {
			for _, ch := range chains {
				if ch.Table.Name == "filter" && ch.Name == "FORWARD" && ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop {
					drop = append(drop, "iptables-nft")
				}
			}
		}
	}
	if out, err := command(ctx, "iptables-legacy", "-S", "FORWARD"); err == nil && forwardPolicyDrop(out) {
		drop = append(drop, "iptables-legacy")
	}
	return classifyForwardPolicy(drop)
}

// forwardPolicyDrop reads `iptables -S FORWARD`.
func forwardPolicyDrop(rules string) bool {
	for _, line := range strings.Split(rules, "\n") {
		if strings.TrimSpace(line) == "-P FORWARD DROP" {
			return true
		}
	}
	return false
}

// classifyForwardPolicy takes the iptables flavours whose FORWARD policy is DROP.
func classifyForwardPolicy(drop []string) Check {
	c := Check{Name: "iptables FORWARD"}
	if len(drop) == 0 {
		c.Status, c.Detail = OK, "no iptables FORWARD chain drops by default"
		return c
	}
	r := netns.DefaultRange.String()
	c.Status = Warn
	c.Detail = fmt.Sprintf("the iptables FORWARD policy is DROP (%s; Docker sets it): sandboxes with internet access get no answers", strings.Join(drop, ", "))
	c.Fix = fmt.Sprintf("let the slot range through: iptables -I FORWARD -s %s -j ACCEPT && iptables -I FORWARD -d %s -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT (with Docker, use the DOCKER-USER chain instead of FORWARD)", r, r)
	return c
}

// --- data directory and disk

// checkDataDir wants the data directory to exist (or be creatable), be a
// directory, be writable and not be world-writable: it holds VM memory
// images, the API key and the database.
func checkDataDir(dir string) Check {
	c := Check{Name: "data dir"}
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.Status, c.Detail = Warn, dir+" does not exist yet (warren up creates it)"
		c.Fix = "mkdir -p -m 0700 " + dir
		return c
	case err != nil:
		c.Status, c.Detail, c.Fix = Fail, err.Error(), "make "+dir+" readable by root, or pick another --data-dir"
		return c
	case !fi.IsDir():
		c.Status, c.Detail, c.Fix = Fail, dir+" is not a directory", "remove it or pick another --data-dir"
		return c
	case fi.Mode().Perm()&0o002 != 0:
		c.Status = Fail
		c.Detail = fmt.Sprintf("%s is world-writable (mode %04o): any user could plant files in it", dir, fi.Mode().Perm())
		c.Fix = "chmod o-w " + dir
		return c
	}
	f, err := os.CreateTemp(dir, ".doctor-")
	if err != nil {
		c.Status, c.Detail = Fail, fmt.Sprintf("%s is not writable: %v", dir, err)
		c.Fix = "make " + dir + " writable by root (a read-only mount?), or pick another --data-dir"
		return c
	}
	f.Close()
	os.Remove(f.Name())
	c.Status, c.Detail = OK, fmt.Sprintf("%s exists, writable, mode %04o", dir, fi.Mode().Perm())
	return c
}

// checkDisk measures the file system that holds (or will hold) dir.
func checkDisk(dir string) Check {
	p := dir
	var st unix.Statfs_t
	for {
		if err := unix.Statfs(p, &st); err == nil {
			break
		} else if parent := filepath.Dir(p); parent == p {
			return Check{Name: "disk", Status: Fail, Detail: fmt.Sprintf("statfs %s: %v", p, err), Fix: "pick another --data-dir"}
		} else {
			p = parent
		}
	}
	return classifyDisk(dir, st.Bavail*uint64(st.Bsize))
}

func classifyDisk(dir string, free uint64) Check {
	c := Check{Name: "disk", Detail: fmt.Sprintf("%s free for %s", gib(free), dir)}
	if free < MinFreeDisk {
		c.Status = Warn
		c.Detail += fmt.Sprintf(", less than %s: the base template alone takes about 2 GiB", gib(MinFreeDisk))
		c.Fix = "free space there, or use --data-dir on a larger file system"
		return c
	}
	c.Status = OK
	return c
}

// --- storage

// checkStorage says what warren's data takes on disk: paused sandboxes,
// snapshots and fork copies (the node's blobs), templates with their layer
// cache, and imported images. Deleting a sandbox, snapshot or template gives
// its part back.
func checkStorage(ctx context.Context, dataDir string) Check {
	blobs, err := (&blob.Local{Root: filepath.Join(dataDir, "blobs")}).Usage(ctx)
	if err != nil {
		return Check{Name: "storage", Status: Warn, Detail: err.Error()}
	}
	parts := map[string]int64{}
	for _, k := range []string{"paused", "snapshots", "forks"} {
		parts[k] = blobs[k]
	}
	for _, d := range []struct{ name, dir string }{
		{"templates", "templates"}, {"layer cache", "templates/layers"}, {"images", "images"},
	} {
		n, err := blob.DiskUsage(filepath.Join(dataDir, d.dir))
		if err != nil {
			return Check{Name: "storage", Status: Warn, Detail: err.Error()}
		}
		parts[d.name] = n
	}
	return classifyStorage(parts)
}

func classifyStorage(parts map[string]int64) Check {
	var b strings.Builder
	for i, k := range []string{"paused", "snapshots", "forks", "templates", "layer cache", "images"} {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %s", k, size(parts[k]))
	}
	b.WriteString(" (the layer cache is part of templates)")
	return Check{Name: "storage", Status: OK, Detail: b.String()}
}

// size writes n bytes in the largest unit that keeps it above 1.
func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func gib(b uint64) string { return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30)) }

// --- build tools

// buildTools are the host programs that build the base image, and their packages.
var buildTools = []struct{ name, pkg string }{
	{"debootstrap", "debootstrap"},
	{"mkfs.ext4", "e2fsprogs"},
	{"debugfs", "e2fsprogs"},
	{"e2fsck", "e2fsprogs"},
	{"resize2fs", "e2fsprogs"},
	{"dumpe2fs", "e2fsprogs"},
}

// sbinDirs are searched after $PATH: a non-login shell may not have sbin on it.
var sbinDirs = []string{"/usr/sbin", "/sbin"}

func checkBuildTools() Check {
	var missing []string
	for _, t := range buildTools {
		if !haveTool(t.name) {
			missing = append(missing, t.name)
		}
	}
	return classifyBuildTools(missing)
}

func classifyBuildTools(missing []string) Check {
	c := Check{Name: "image tools"}
	if len(missing) == 0 {
		c.Status, c.Detail = OK, "debootstrap and e2fsprogs are installed"
		return c
	}
	var pkgs []string
	for _, t := range buildTools {
		for _, m := range missing {
			if t.name == m && !slices.Contains(pkgs, t.pkg) {
				pkgs = append(pkgs, t.pkg)
			}
		}
	}
	c.Status = Fail
	c.Detail = "missing " + strings.Join(missing, ", ") + ": the base template's Debian image cannot be built"
	c.Fix = "apt-get install -y " + strings.Join(pkgs, " ")
	return c
}

func haveTool(name string) bool {
	if _, err := exec.LookPath(name); err == nil {
		return true
	}
	for _, d := range sbinDirs {
		if fi, err := os.Stat(filepath.Join(d, name)); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return true
		}
	}
	return false
}

// command runs a program for its output, bounded in time.
func command(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		if msg := strings.TrimSpace(errb.String()); msg != "" {
			return "", fmt.Errorf("%w: %s", err, msg)
		}
		return "", err
	}
	return out.String(), nil
}
