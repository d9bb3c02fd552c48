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
