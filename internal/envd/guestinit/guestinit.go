// Package guestinit is envd's first job as PID 1 of a warren microVM.
//
// The VM boots Debian's cloud kernel with an initramfs that holds only envd (as
// /init), the virtio modules the kernel lacks, and a file naming their load
// order (internal/guest builds it). Boot turns that into a running system:
//
//  1. mount devtmpfs, proc and sysfs; load the modules in order;
//  2. wait for the root disk, mount it (ext4) and switch root to it, carrying
//     /dev, /proc and /sys along, as util-linux's switch_root does;
//  3. mount devpts, /dev/shm, /run and /tmp;
//  4. bring up lo and eth0 with the address the host chose, set the hostname
//     and PATH.
//
// Then envd's main starts the agent as usual; as PID 1 it also inherits every
// orphan, which the process service's wait4(-1) reaper collects.
//
// The host passes the network through kernel arguments: the kernel hands every
// unknown key=value argument to /init as an environment variable (see the Env*
// constants). A fatal error is printed to the console and powers the VM off
// (PowerOff): PID 1 must never exit, or the kernel panics.
package guestinit

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Layout of the initramfs, shared with internal/guest, which builds it.
const (
	// ModulesDir holds the kernel modules as <name>.ko.
	ModulesDir = "/lib/modules"
	// ModuleOrderFile names the modules in ModulesDir, one a line, in load order.
	ModuleOrderFile = ModulesDir + "/order"
)

// Kernel arguments /init reads (the kernel passes them as environment variables).
const (
	// EnvAddr is the guest's eth0 address with its prefix, e.g. 10.11.0.2/30.
	EnvAddr = "warren_ip"
	// EnvGateway is the default gateway, e.g. 10.11.0.1.
	EnvGateway = "warren_gw"
	// EnvHostname is the guest's hostname; DefaultHostname when absent.
	EnvHostname = "warren_hostname"
)

// DefaultHostname is the hostname when the host names none.
const DefaultHostname = "sandbox"

// RootDevice is the virtio-blk root disk: the VM's first (and only) disk.
const RootDevice = "/dev/vda"

// rootWait bounds the wait for the root disk and eth0 after their drivers load;
// under TCG both appear within milliseconds, so a miss means a missing device.
const rootWait = 10 * time.Second

// defaultPath is the PATH of a Debian root shell.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// logPrefix marks every line init prints on the serial console.
const logPrefix = "warren-init: "

// Network is the guest's eth0 configuration.
type Network struct {
	Addr    netip.Prefix
	Gateway netip.Addr // zero: no default route
}

// config is what the host told /init.
type config struct {
	net      *Network // nil: eth0 stays down
	hostname string
}

// readConfig parses the Env* variables and removes them from the environment,
// so that no process envd starts inherits them.
func readConfig() (config, error) {
	c := config{hostname: DefaultHostname}
	if v := os.Getenv(EnvHostname); v != "" {
		c.hostname = v
	}
	if v := os.Getenv(EnvAddr); v != "" {
		addr, err := netip.ParsePrefix(v)
		if err != nil || !addr.Addr().Is4() {
			return c, fmt.Errorf("%s=%q is not an IPv4 address with prefix (like 10.11.0.2/30)", EnvAddr, v)
		}
		c.net = &Network{Addr: addr}
		if v := os.Getenv(EnvGateway); v != "" {
			gw, err := netip.ParseAddr(v)
			if err != nil || !gw.Is4() || !addr.Masked().Contains(gw) {
				return c, fmt.Errorf("%s=%q is not an IPv4 address inside %s", EnvGateway, v, addr.Masked())
			}
			c.net.Gateway = gw
		}
	} else if v := os.Getenv(EnvGateway); v != "" {
		return c, fmt.Errorf("%s=%q needs %s", EnvGateway, v, EnvAddr)
	}
	for _, k := range []string{EnvAddr, EnvGateway, EnvHostname} {
		os.Unsetenv(k)
	}
	return c, nil
}

// Boot prepares the VM for envd (see the package comment) and returns; console
// receives one progress line. It refuses to run unless it is PID 1.
func Boot(console io.Writer) error {
	// Mounting over /dev or switching root anywhere else would wreck a host.
	if pid := os.Getpid(); pid != 1 {
		return fmt.Errorf("init mode needs PID 1 of a warren VM (running as PID %d)", pid)
	}
	cfg, err := readConfig()
	if err != nil {
		return err
	}
	// The kernel's environment for init has no PATH; processes envd starts
	// inherit this one.
	os.Setenv("PATH", defaultPath)

	// Each step's time goes on the ready line: boot speed is a feature.
	var phases []string
	last := time.Now()
	step := func(name string, err error) error {
		now := time.Now()
		phases = append(phases, fmt.Sprintf("%s %s", name, now.Sub(last).Round(time.Millisecond)))
		last = now
		return err
	}
	if err := step("mounts", mountEarly()); err != nil {
		return err
	}
	started := uptime() // needs /proc

	modules, err := loadModules()
	if err := step(fmt.Sprintf("%d modules", modules), err); err != nil {
		return err
	}
	if err := step("root", switchRoot()); err != nil {
		return err
	}
	if err := mountLate(); err != nil {
		return err
	}
	if err := unix.Sethostname([]byte(cfg.hostname)); err != nil {
		return fmt.Errorf("set hostname %q: %w", cfg.hostname, err)
	}
	if err := step("network", setupNetwork(cfg.net)); err != nil {
		return err
	}
	addr := "none"
	if cfg.net != nil {
		addr = cfg.net.Addr.String()
	}
	fmt.Fprintf(console, "%sready at %s since boot (init started at %s; %s): eth0 %s, hostname %s\n",
		logPrefix, uptime(), started, strings.Join(phases, ", "), addr, cfg.hostname)
	return nil
}

// uptime is the time since the kernel started, from /proc/uptime.
func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	secs, _, _ := strings.Cut(string(b), " ")
	return secs + "s"
}

// PowerOff prints why PID 1 stops (err, or nil for a clean stop) on the
// console and powers the VM off. It never returns: PID 1 exiting would panic
// the kernel instead of stopping the VM.
func PowerOff(console io.Writer, err error) {
	if err != nil {
		fmt.Fprintf(console, "%sfatal: %v\n", logPrefix, err)
	}
	fmt.Fprintf(console, "%spowering off\n", logPrefix)
	unix.Sync()
	// Power off needs ACPI (microvm has it); if it fails, a reset stops QEMU
	// too, since warren runs it with -no-reboot.
	perr := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	rerr := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	fmt.Fprintf(console, "%scannot power off (%v) or reset (%v); halting here\n", logPrefix, perr, rerr)
	for {
		time.Sleep(time.Hour)
	}
}

// mountEarly mounts what module loading and device discovery need.
func mountEarly() error {
	for _, m := range []struct {
		fstype, target string
		flags          uintptr
	}{
		{"devtmpfs", "/dev", unix.MS_NOSUID},
		{"proc", "/proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"sysfs", "/sys", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
	} {
		if err := mount(m.fstype, m.target, m.fstype, m.flags, ""); err != nil {
			return err
		}
	}
	return nil
}

// loadModules loads the initramfs's modules in the order its builder computed
// from their depends= fields, then frees their files (the initramfs is RAM).
func loadModules() (int, error) {
	order, err := os.ReadFile(ModuleOrderFile)
	if err != nil {
		return 0, fmt.Errorf("read module order: %w", err)
	}
	names := strings.Fields(string(order))
	for _, name := range names {
		path := filepath.Join(ModulesDir, name+".ko")
		if err := loadModule(path); err != nil {
			return 0, fmt.Errorf("load module %s: %w", name, err)
		}
		os.Remove(path)
	}
	return len(names), nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if errors.Is(err, unix.EEXIST) {
		return nil // built in, or loaded already
	}
	return err
}

// switchRoot mounts the root disk on /newroot and makes it /, moving the early
// mounts along. The initramfs root cannot be pivot_root'ed, so this is
// util-linux switch_root's sequence: move the new root over / and chroot.
func switchRoot() error {
	if err := waitFor(RootDevice, func() bool { _, err := os.Stat(RootDevice); return err == nil }); err != nil {
		return err
	}
	if err := os.MkdirAll("/newroot", 0o755); err != nil {
		return err
	}
	if err := mount(RootDevice, "/newroot", "ext4", 0, ""); err != nil {
		return err
	}
	for _, dir := range []string{"/dev", "/proc", "/sys"} {
		target := "/newroot" + dir
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("root disk: %w", err)
		}
		if err := unix.Mount(dir, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s to %s: %w", dir, target, err)
		}
	}
	if err := os.Chdir("/newroot"); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move /newroot to /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot to the root disk: %w", err)
	}
	return os.Chdir("/")
}

// mountLate mounts what a Debian userland expects beside /dev, /proc and /sys.
func mountLate() error {
	ptsOpts := "newinstance,ptmxmode=0666,mode=0620"
	if gid, ok := groupID("/etc/group", "tty"); ok {
		ptsOpts += ",gid=" + strconv.Itoa(gid)
	}
	for _, m := range []struct {
		fstype, target string
		flags          uintptr
		data           string
	}{
		{"devpts", "/dev/pts", unix.MS_NOSUID | unix.MS_NOEXEC, ptsOpts},
		{"tmpfs", "/dev/shm", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
		{"tmpfs", "/tmp", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := mount(m.fstype, m.target, m.fstype, m.flags, m.data); err != nil {
			return err
		}
	}
	// devtmpfs lacks the /dev/fd links that shells use for process substitution.
	for link, target := range map[string]string{
		"/dev/fd":     "/proc/self/fd",
		"/dev/stdin":  "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, link); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// setupNetwork brings up lo and, when configured, eth0 with its address and
// default route.
func setupNetwork(n *Network) error {
	if err := linkUp("lo"); err != nil {
		return err
	}
	if n == nil {
		return nil
	}
	var index int
	if err := waitFor("eth0", func() bool {
		i, err := linkIndex("eth0")
		index = i
		return err == nil
	}); err != nil {
		return err
	}
	if err := addAddr(index, n.Addr); err != nil {
		return fmt.Errorf("eth0 address %s: %w", n.Addr, err)
	}
	if err := linkUp("eth0"); err != nil {
		return err
	}
	if n.Gateway.IsValid() {
		if err := addDefaultRoute(index, n.Gateway); err != nil {
			return fmt.Errorf("default route via %s: %w", n.Gateway, err)
		}
	}
	return nil
}

func mount(source, target, fstype string, flags uintptr, data string) error {
	if err := unix.Mount(source, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", source, fstype, target, err)
	}
	return nil
}

// waitFor polls ready until it holds or rootWait passes; devices appear
// asynchronously after their driver loads.
func waitFor(what string, ready func() bool) error {
	deadline := time.Now().Add(rootWait)
	for !ready() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s (is the device attached to the VM?)", what, rootWait)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// groupID finds a group's gid in an /etc/group file.
func groupID(file, name string) (int, bool) {
	f, err := os.Open(file)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) >= 3 && fields[0] == name {
			gid, err := strconv.Atoi(fields[2])
			return gid, err == nil
		}
	}
	return 0, false
}
