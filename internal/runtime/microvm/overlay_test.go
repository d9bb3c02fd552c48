package microvm

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestWriteOverlay checks the Go-written qcow2 overlay with qemu-img itself:
// it must pass `qemu-img check`, report the backing file, format and size
// `qemu-img create` would, and read through to the backing file's data.
func TestWriteOverlay(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("needs qemu-img (apt-get install -y qemu-utils) to check the overlay")
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.ext4")
	// Odd size, and data at the start and past the first L2 table's reach.
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("first block"), 0)
	f.WriteAt([]byte("past 512 MiB"), l2Coverage+4096)
	f.Truncate(l2Coverage + 3<<20 + 512)
	f.Close()

	upper := filepath.Join(dir, "upper.qcow2")
	for _, tc := range []struct {
		name, path, backing, format string
		size                        int64
	}{
		{"over a raw image", filepath.Join(dir, "over-raw.qcow2"), raw, "raw", l2Coverage + 3<<20 + 512},
		{"over a qcow2 overlay", upper, filepath.Join(dir, "over-raw.qcow2"), "qcow2", l2Coverage + 3<<20 + 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := WriteOverlay(tc.path, tc.backing, tc.format); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("qemu-img", "check", tc.path).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check: %v\n%s", err, out)
			}
			out, err := exec.Command("qemu-img", "info", "--output=json", tc.path).Output()
			if err != nil {
				t.Fatalf("qemu-img info: %v", err)
			}
			var info struct {
				Format      string `json:"format"`
				VirtualSize int64  `json:"virtual-size"`
				Backing     string `json:"backing-filename"`
				BackingFmt  string `json:"backing-filename-format"`
			}
			if err := json.Unmarshal(out, &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "qcow2" || info.VirtualSize != tc.size || info.Backing != tc.backing || info.BackingFmt != tc.format {
				t.Errorf("qemu-img info = %+v, want qcow2 of %d bytes over %s (%s)", info, tc.size, tc.backing, tc.format)
			}
		})
	}

	t.Run("reads through to the backing data", func(t *testing.T) {
		out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", upper, raw).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img compare of the overlay chain with its raw base: %v\n%s", err, out)
		}
	})

	t.Run("refuses", func(t *testing.T) {
		for _, tc := range []struct{ name, path, backing, format, want string }{
			{"an existing file", raw, raw, "raw", "exists"},
			{"a relative backing path", filepath.Join(dir, "x1"), "base.ext4", "raw", "not an absolute path"},
			{"a missing backing file", filepath.Join(dir, "x2"), filepath.Join(dir, "none"), "raw", "no such file"},
			{"an unknown format", filepath.Join(dir, "x3"), raw, "vmdk", "not one of raw, qcow2"},
			{"a raw file as qcow2", filepath.Join(dir, "x4"), raw, "qcow2", "not a qcow2 image"},
		} {
			err := WriteOverlay(tc.path, tc.backing, tc.format)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: WriteOverlay = %v, want an error containing %q", tc.name, err, tc.want)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, "x3")); err == nil {
			t.Error("a failed WriteOverlay left a file behind")
		}
	})
}

// TestBackingFile reads the backing file names of overlays as WriteOverlay
// and qemu-img write them, relative ones resolved as QEMU does, and finds
// none in raw images.
func TestBackingFile(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.ext4")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mid := filepath.Join(dir, "mid.qcow2")
	if err := WriteOverlay(mid, raw, "raw"); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{raw: "", mid: raw}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		top := filepath.Join(dir, "top.qcow2")
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", top).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		want[top] = mid
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("QF"), 0o644)
	want[short] = ""
	for path, backing := range want {
		got, err := BackingFile(path)
		if err != nil || got != backing {
			t.Errorf("BackingFile(%s) = %q, %v; want %q", filepath.Base(path), got, err, backing)
		}
	}
	if _, err := BackingFile(filepath.Join(dir, "none")); !os.IsNotExist(err) {
		t.Errorf("BackingFile of a missing file: %v, want not-exist", err)
	}
}
