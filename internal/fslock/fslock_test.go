package fslock

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"testing"
	"time"
)

func TestLockExcludesAndWaits(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sub", "x.lock")
	unlock, err := Lock(t.Context(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A second holder (another open file description: as another process)
	// waits, says so once, and gives up with its context.
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	waited := 0
	if _, err := Lock(ctx, p, func() { waited++ }); err == nil {
		t.Fatal("a second Lock got the held lock")
	}
	if waited != 1 {
		t.Errorf("waiting called %d times, want 1", waited)
	}
	// Released, it is taken at once.
	done := make(chan error, 1)
	go func() {
		u, err := Lock(t.Context(), p, nil)
		if err == nil {
			u()
		}
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	unlock()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the waiter did not get the released lock")
	}
}

func TestHeld(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.lock")
	if _, err := Held(p); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Held of a missing file: %v, want not-exist", err)
	}
	unlock, err := Lock(t.Context(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if held, err := Held(p); !held || err != nil {
		t.Errorf("Held of a held lock = %v, %v; want true", held, err)
	}
	unlock()
	if held, err := Held(p); held || err != nil {
		t.Errorf("Held of a released lock = %v, %v; want false", held, err)
	}
	// Held's probe does not keep the lock.
	u, err := Lock(t.Context(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	u()
}

func TestTryLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sub", "x.lock")
	unlock, ok, err := TryLock(p)
	if err != nil || !ok {
		t.Fatalf("TryLock of a free lock = %v, %v; want it taken", ok, err)
	}
	// Held by another open file description (as by another process): no
	// wait, no error, not taken.
	if _, ok, err := TryLock(p); ok || err != nil {
		t.Errorf("TryLock of a held lock = %v, %v; want false, no error", ok, err)
	}
	if _, err := Lock(canceled(t), p, nil); err == nil {
		t.Error("Lock got the lock TryLock holds")
	}
	unlock()
	u, ok, err := TryLock(p)
	if err != nil || !ok {
		t.Fatalf("TryLock of a released lock = %v, %v; want it taken", ok, err)
	}
	u()
}

// canceled is a context that is done already: Lock tries once.
func canceled(t *testing.T) context.Context {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	return ctx
}
