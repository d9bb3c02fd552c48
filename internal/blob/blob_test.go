package blob_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/warren-sh/warren/internal/blob"
)

func TestCheckKey(t *testing.T) {
	for _, tc := range []struct {
		key string
		ok  bool
	}{
		{"paused/sb-1", true},
		{"snapshots/snap_2.v1", true},
		{"", false},
		{"paused/../etc", false},
		{"/abs", false},
		{"paused//x", false},
		{"paused/.hidden", false},
		{"paused/a b", false},
	} {
		if err := blob.CheckKey(tc.key); (err == nil) != tc.ok {
			t.Errorf("CheckKey(%q) = %v, want ok %v", tc.key, err, tc.ok)
		}
	}
}

// TestLocal: entries are directories under Root; Size and Usage count
// allocated blocks (a sparse file counts for its data only); Delete is
// idempotent; Clean removes unfinished work and nothing else.
func TestLocal(t *testing.T) {
	ctx := t.Context()
	l := &blob.Local{Root: filepath.Join(t.TempDir(), "blobs")}
	if u, err := l.Usage(ctx); err != nil || len(u) != 0 {
		t.Fatalf("Usage of a missing root = %v, %v; want empty", u, err)
	}
	if err := l.Delete(ctx, "paused/none"); err != nil {
		t.Fatalf("Delete of a missing entry: %v", err)
	}

	p := l.Path("paused/sb-1")
	if want := filepath.Join(l.Root, "paused", "sb-1"); p != want {
		t.Fatalf("Path = %s, want %s", p, want)
	}
	if err := os.MkdirAll(p, 0o700); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = 1
	}
	if err := os.WriteFile(filepath.Join(p, "data"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(p, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(1 << 30) // a 1 GiB hole
	f.Close()
	if ok, err := l.Exists(ctx, "paused/sb-1"); !ok || err != nil {
		t.Errorf("Exists = %v, %v", ok, err)
	}
	n, err := l.Size(ctx, "paused/sb-1")
	if err != nil || n < 1<<20 || n > 2<<20 {
		t.Errorf("Size = %d, %v; want about 1 MiB (the hole is free)", n, err)
	}
	os.MkdirAll(l.Path("snapshots/s1"), 0o700)
	u, err := l.Usage(ctx)
	if err != nil || u["paused"] < 1<<20 || len(u) != 2 {
		t.Errorf("Usage = %v, %v; want paused ≥ 1 MiB and snapshots", u, err)
	}

	work := filepath.Join(l.Root, "paused", ".sb-2.tmp-123")
	os.MkdirAll(filepath.Join(work, "x"), 0o700)
	if err := l.Clean(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(work); !os.IsNotExist(err) {
		t.Errorf("Clean left %s (%v)", work, err)
	}
	if ok, _ := l.Exists(ctx, "paused/sb-1"); !ok {
		t.Error("Clean removed an entry")
	}

	if err := l.Delete(ctx, "paused/sb-1"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := l.Exists(ctx, "paused/sb-1"); ok {
		t.Error("the entry exists after Delete")
	}
	if entries, _ := os.ReadDir(filepath.Join(l.Root, "paused")); len(entries) != 0 {
		t.Errorf("Delete left %v", entries)
	}
	if _, err := l.Size(ctx, "../x"); err == nil {
		t.Error("Size accepted a key outside Root")
	}
}
