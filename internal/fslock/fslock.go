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
	f, err := openLockFile(path)
	if err != nil {
		return nil, err
	}
	for {
		ok, err := tryFlock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if ok {
			return func() { f.Close() }, nil
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

// TryLock takes the lock on the file at path (made, with its directory,
// when missing) if no one holds it; ok is false, with no error, when
// someone does. For work that would rather skip than wait for a holder
// that may hold on for minutes.
func TryLock(path string) (unlock func(), ok bool, err error) {
	f, err := openLockFile(path)
	if err != nil {
		return nil, false, err
	}
	ok, err = tryFlock(f)
	if err != nil || !ok {
		f.Close()
		if err != nil {
			return nil, false, fmt.Errorf("lock %s: %w", path, err)
		}
		return nil, false, nil
	}
	return func() { f.Close() }, true, nil
}

func openLockFile(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// tryFlock takes the lock on f unless another open file description holds it.
func tryFlock(f *os.File) (bool, error) {
	switch err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EWOULDBLOCK):
		return false, nil
	default:
		return false, err
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
	defer f.Close() // releases the lock if the probe took it
	ok, err := tryFlock(f)
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", path, err)
	}
	return !ok, nil
}
