package bench

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/fslock"
)

// A second run on a data dir that a run holds waits for it, rather than
// reset its store or remove its VMs' directories.
func TestRunWaitsForTheRunHoldingItsDataDir(t *testing.T) {
	dir := t.TempDir()
	if err := claimDataDir(dir); err != nil {
		t.Fatal(err)
	}
	unlock, err := fslock.Lock(t.Context(), filepath.Join(dir, runLockFile), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	var progress bytes.Buffer
	_, err = Run(ctx, Options{DataDir: dir, TTI: 1, Burst: 1, RTT: 1, Progress: &progress})
	if err == nil || !strings.Contains(err.Error(), runLockFile) || !strings.Contains(err.Error(), "deadline") {
		t.Errorf("Run beside another run's lock: %v, want it to wait for %s until its context ends", err, runLockFile)
	}
	if !strings.Contains(progress.String(), "waiting for another bench run") {
		t.Errorf("Run did not say it waits: %q", progress.String())
	}
}
