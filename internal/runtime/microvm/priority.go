package microvm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// backgroundNice is the nice value of a Spec.Background VM until its Thaw:
// the lowest CPU priority, so the VM runs on what the host's other work
// leaves (a warm pool's refill never slows the creates that emptied it).
const backgroundNice = 19

// threadNice is the calling thread's nice value (Linux keeps one per thread).
func threadNice() (int, error) {
	// The raw system call answers 20 - nice (1..40), x/sys/unix passes it on.
	prio, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return 0, fmt.Errorf("read this thread's nice value: %w", err)
	}
	return 20 - prio, nil
}

// startNiced runs start, which forks a process, on a thread whose nice value
// is nice for the moment, so the process and every thread it ever creates
// start with it. It returns the nice value the thread had (the caller's
// priority, which a later setNice gives the process back).
func startNiced(nice int, start func() error) (prev int, err error) {
	goruntime.LockOSThread()
	if prev, err = threadNice(); err != nil {
		goruntime.UnlockOSThread()
		return 0, err
	}
	if err := unix.Setpriority(unix.PRIO_PROCESS, 0, nice); err != nil {
		goruntime.UnlockOSThread()
		return 0, fmt.Errorf("lower this thread's priority to nice %d: %w", nice, err)
	}
	err = start()
	if unix.Setpriority(unix.PRIO_PROCESS, 0, prev) == nil {
		goruntime.UnlockOSThread()
	}
	// Else the thread stays locked: Go ends it with its goroutine rather than
	// run other work at the lowered priority.
	return prev, err
}

// setNice gives every thread of process pid the nice value nice. Threads the
// process starts meanwhile inherit their creator's value, so it passes over
// the threads until one pass changes none.
func setNice(pid, nice int) error {
	tasks := filepath.Join("/proc", strconv.Itoa(pid), "task")
	for range 10 {
		entries, err := os.ReadDir(tasks)
		if err != nil {
			return fmt.Errorf("list the threads of process %d: %w", pid, err)
		}
		changed := 0
		for _, e := range entries {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
			if errors.Is(err, unix.ESRCH) {
				continue // the thread ended
			}
			if err != nil {
				return fmt.Errorf("read the nice value of thread %d of process %d: %w", tid, pid, err)
			}
			if 20-prio == nice {
				continue
			}
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("set the nice value of thread %d of process %d to %d: %w", tid, pid, nice, err)
			}
			changed++
		}
		if changed == 0 {
			return nil
		}
	}
	return fmt.Errorf("set the nice value of process %d to %d: its threads kept changing", pid, nice)
}
