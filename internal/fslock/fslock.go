// Package fslock serializes work on a data directory across processes with
// an flock(2) on a lock file: image and template builds, the image store.
package fslock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// pollEvery is how often a waiter tries again: flock cannot be interrupted
// by a context, so waiting is polling.
const pollEvery = 200 * time.Millisecond

// Lock takes an exclusive lock on the file at path (made, with its
// directory, when missing), waiting while another holder has it until ctx
// ends. waiting, when not nil, is called once if the lock is taken by
// someone else. The returned func releases the lock.
func Lock(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if waiting != nil {
			waiting()
			waiting = nil
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for the lock %s: %w", path, ctx.Err())
		case <-time.After(pollEvery):
		}
	}
}

// Held reports whether another holder has the lock on the existing file at
// path: a lock file that marks work in progress (a running template build)
// is alive while its holder runs, and stale once it died. An error wrapping
// fs.ErrNotExist says the file is gone.
func Held(path string) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", path, err)
	}
	defer f.Close()
	switch err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); {
	case err == nil:
		return false, nil // closing f releases it
	case errors.Is(err, unix.EWOULDBLOCK):
		return true, nil
	default:
		return false, fmt.Errorf("lock %s: %w", path, err)
	}
}
