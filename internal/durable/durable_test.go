package durable

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

func TestSyncTree(t *testing.T) {
	root := filepath.Join(t.TempDir(), "entry")
	for _, p := range []string{"a", "vm/disk", "vm/deep/mem"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, p), []byte(p), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/nonexistent", filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	// Read-only files and a dangling link are fine: fsync needs no write access.
	if err := SyncTree(context.Background(), root); err != nil {
		t.Fatalf("SyncTree: %v", err)
	}
	if err := SyncTree(context.Background(), filepath.Join(root, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("SyncTree of a missing directory: %v, want ErrNotExist", err)
	}
	if err := Sync(filepath.Join(root, "vm/disk")); err != nil {
		t.Errorf("Sync: %v", err)
	}
	if err := Sync(filepath.Join(root, "nofile")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Sync of a missing file: %v, want ErrNotExist", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := SyncTree(ctx, root); !errors.Is(err, context.Canceled) {
		t.Errorf("SyncTree with a cancelled context: %v, want context.Canceled", err)
	}
}

func TestWriteFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "synced")
	if err := WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "x" {
		t.Errorf("read back %q, %v", b, err)
	}
	if err := WriteFile(p, nil, 0o600); !errors.Is(err, os.ErrExist) {
		t.Errorf("WriteFile over an existing file: %v, want ErrExist", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "x" {
		t.Errorf("a refused WriteFile changed the file to %q", b)
	}
}

func TestBootID(t *testing.T) {
	id, err := BootID()
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`).MatchString(id) {
		t.Errorf("BootID = %q, want a UUID", id)
	}
}
