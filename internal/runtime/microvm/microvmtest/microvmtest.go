// Package microvmtest holds helpers for tests that run real microVMs or
// check their disks.
package microvmtest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/warren-sh/warren/internal/runtime/microvm"
)

// ReapLeftovers kills the QEMUs of earlier test binaries that died without
// their cleanups (a timeout panic: QEMU runs in a session of its own and
// outlives its starter on purpose) and removes their work directories. Work
// directories are dir/<prefix><pid>-*, named for the test process that made
// them; only those whose process is gone are touched, QEMUs by pid.
func ReapLeftovers(dir, prefix string) {
	dead := func(owner string) bool {
		pid, err := strconv.Atoi(owner)
		return err == nil && syscall.Kill(pid, 0) != nil
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !bytes.HasPrefix(b, []byte(microvm.Binary+"\x00")) {
			continue
		}
		if _, rest, ok := strings.Cut(string(b), "/"+prefix); ok {
			if owner, _, _ := strings.Cut(rest, "-"); dead(owner) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(dir, prefix+"*"))
	for _, d := range dirs {
		if owner, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), prefix), "-"); dead(owner) {
			os.RemoveAll(d)
		}
	}
}

// OpenChain checks that every file along a disk's backing chain (qcow2
// headers naming backing files) is there, as QEMU opens them: an error
// names what is missing or unreadable.
func OpenChain(disk string) error {
	for p := disk; p != ""; {
		next, err := microvm.BackingFile(p)
		if err != nil {
			return fmt.Errorf("backing chain of %s: %w", disk, err)
		}
		p = next
	}
	return nil
}
