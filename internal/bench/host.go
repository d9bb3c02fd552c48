package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine describes the host a bench ran on.
type Machine struct {
	CPUModel    string
	Cores       int
	MemTotalMiB int
	Kernel      string
	OS          string
	Accel       string // kvm or tcg, as the microVM runtime chose
	AccelWhy    string // why that accelerator (the runtime's detection)
	QEMU        string
	Node        string
	Go          string
	LoadBefore  string
	LoadAfter   string
}

// describeMachine reads what the report says about the host.
func describeMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), LoadBefore: loadAvg()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if kb, err := meminfo("MemTotal"); err == nil {
		m.MemTotalMiB = int(kb >> 10)
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	return m
}

func loadAvg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// meminfo reads one /proc/meminfo field, in kB.
func meminfo(field string) (uint64, error) {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/meminfo has no %s line", field)
}

// memAvailableMiB is the host's MemAvailable.
func memAvailableMiB() (float64, error) {
	kb, err := meminfo("MemAvailable")
	return float64(kb) / 1024, err
}

// vmProcess is one QEMU process's memory and CPU use.
type vmProcess struct {
	Pid      int
	PSS, RSS float64 // MiB
	CPU      time.Duration
	// Warm says the VM was started for the node's warm pool (its state
	// directory is warm-*): waiting frozen there, or claimed by a sandbox.
	Warm bool
}

// vmProcesses finds the QEMU processes of the VMs under root (the server's
// microVM state directory: each QEMU's command line names its QMP socket
// there) and reads their PSS, RSS and CPU time.
func vmProcesses(root string) ([]vmProcess, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return nil, err
	}
	needle := []byte(filepath.Clean(root) + "/")
	var out []vmProcess
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte("qemu-system")) || !bytes.Contains(cmdline, needle) {
			continue
		}
		p, err := readProcess(pid)
		if err != nil {
			continue // exited meanwhile
		}
		p.Warm = bytes.Contains(cmdline, append(needle, "warm-"...))
		out = append(out, p)
	}
	return out, nil
}

func readProcess(pid int) (vmProcess, error) {
	p := vmProcess{Pid: pid}
	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return p, err
	}
	sc := bufio.NewScanner(bytes.NewReader(rollup))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "Rss:":
			p.RSS = kb / 1024
		case "Pss:":
			p.PSS = kb / 1024
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return p, err
	}
	// utime and stime are the 14th and 15th fields, in USER_HZ (100) ticks;
	// the command name before them may hold spaces.
	_, rest, _ := bytes.Cut(stat, []byte(") "))
	f := strings.Fields(string(rest))
	if len(f) < 13 {
		return p, fmt.Errorf("/proc/%d/stat is short", pid)
	}
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	p.CPU = time.Duration(ut+st) * 10 * time.Millisecond
	return p, nil
}
