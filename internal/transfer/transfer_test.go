package transfer

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// body writes a framed body of two files into a transfer disk file: the first
// in slots (a whole slot and a short one) with an inline tail, the second
// inline. It returns the body, the disk and what each file must read as.
func body(t *testing.T) ([]byte, *Disk, string, [2][]byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "transfer.disk")
	if err := Create(path, 8*SlotSize); err != nil {
		t.Fatal(err)
	}
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	rng := rand.NewChaCha8([32]byte{7})
	a := make([]byte, SlotSize+5000+123)
	rng.Read(a)
	b := []byte("second file, inline")

	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(w.File("dir/a.bin"))
	for _, piece := range [][]byte{a[:SlotSize], a[SlotSize : SlotSize+5000]} {
		off, ok, err := d.Put(piece)
		if err != nil || !ok {
			t.Fatalf("Put: %v %v", ok, err)
		}
		must(w.Extent(off, len(piece)))
	}
	must(w.Inline(a[SlotSize+5000:]))
	must(w.File("b.txt"))
	must(w.Inline(b))
	return buf.Bytes(), d, path, [2][]byte{a, b}
}

func TestReaderReadsFilesFromSlotsAndInline(t *testing.T) {
	framed, _, path, want := body(t)
	dev, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	// Reads of odd sizes take the bounce path, aligned ones the direct one.
	for _, size := range []int{SlotSize, 4096, 1000, 3 * SlotSize} {
		r := NewReader(bytes.NewReader(framed), dev)
		for i, name := range []string{"dir/a.bin", "b.txt"} {
			got, err := r.NextFile()
			if err != nil || got != name {
				t.Fatalf("size %d: NextFile = %q, %v; want %q", size, got, err, name)
			}
			var out bytes.Buffer
			buf := alignedBuffer(size)
			if _, err := io.CopyBuffer(struct{ io.Writer }{&out}, struct{ io.Reader }{r}, buf); err != nil {
				t.Fatalf("size %d: read %s: %v", size, name, err)
			}
			if !bytes.Equal(out.Bytes(), want[i]) {
				t.Fatalf("size %d: %s read %d bytes, not the %d written", size, name, out.Len(), len(want[i]))
			}
		}
		if name, err := r.NextFile(); err != io.EOF {
			t.Fatalf("after the last file: %q, %v; want io.EOF", name, err)
		}
	}
}

func TestReaderSkipsUnreadFiles(t *testing.T) {
	framed, _, path, want := body(t)
	dev, _ := os.Open(path)
	defer dev.Close()
	r := NewReader(bytes.NewReader(framed), dev)
	r.NextFile()
	r.Read(make([]byte, 10))
	if name, err := r.NextFile(); err != nil || name != "b.txt" {
		t.Fatalf("NextFile = %q, %v", name, err)
	}
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, want[1]) {
		t.Fatalf("second file: %q, %v", got, err)
	}
}

func TestReaderErrors(t *testing.T) {
	var good bytes.Buffer
	w := NewWriter(&good)
	w.File("f")
	w.Inline([]byte("0123456789"))
	framed := good.Bytes()

	var failed bytes.Buffer
	w = NewWriter(&failed)
	w.File("f")
	w.Inline([]byte("abc"))
	w.Fail("malformed multipart body at part 2: boom")

	for _, tc := range []struct {
		name string
		body []byte
		dev  io.ReaderAt
		want func(error) bool
	}{
		{"cut inside inline data", framed[:len(framed)-3], nil, func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"cut inside a header", framed[:3], nil, func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"data before any file", []byte{'D', 0, 0, 0, 1, 'x'}, nil, func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"unknown kind", append(append([]byte{}, framed...), 'Z'), nil, func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"extent without a disk", append([]byte{'F', 0, 0, 0, 0}, 'X', 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 1), nil, func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"unaligned extent", append([]byte{'F', 0, 0, 0, 0}, 'X', 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1), bytes.NewReader(nil), func(err error) bool { return errors.Is(err, ErrMalformed) }},
		{"extent past the disk", append([]byte{'F', 0, 0, 0, 0}, 'X', 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 1), bytes.NewReader(nil), func(err error) bool { return err != nil && !errors.Is(err, io.EOF) }},
		{"sender failed", failed.Bytes(), nil, func(err error) bool {
			var se *SenderError
			return errors.As(err, &se) && se.Message == "malformed multipart body at part 2: boom"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.body), tc.dev)
			var err error
			for err == nil {
				if _, err = r.NextFile(); err == nil {
					_, err = io.ReadAll(r)
				}
			}
			if !tc.want(err) {
				t.Fatalf("got %v", err)
			}
		})
	}
}

func TestDiskSlots(t *testing.T) {
	path := filepath.Join(t.TempDir(), "transfer.disk")
	if err := Create(path, MinSize+SlotSize+123); err != nil {
		t.Fatal(err)
	}
	if err := Create(path, MinSize); err == nil {
		t.Fatal("Create over an existing file succeeded")
	}
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if d.Free() != 2 {
		t.Fatalf("a disk of %d bytes has %d slots, want 2", MinSize+SlotSize, d.Free())
	}
	a, ok1, _ := d.Put([]byte("a"))
	b, ok2, _ := d.Put([]byte("b"))
	_, ok3, err := d.Put([]byte("c"))
	if !ok1 || !ok2 || ok3 || err != nil {
		t.Fatalf("puts on a disk of two slots: %v %v %v (%v)", ok1, ok2, ok3, err)
	}
	if a < reserved || b < reserved || a == b || a%SlotSize != 0 || b%SlotSize != 0 {
		t.Fatalf("slots at %d and %d", a, b)
	}
	d.Release(a)
	c, ok, _ := d.Put([]byte("c"))
	if !ok || c != a {
		t.Fatalf("after a release: slot %d (%v), want %d", c, ok, a)
	}
	// A released slot's blocks go back to the file system.
	d.Release(b, c)
	if n := blocks(t, path); n != 0 {
		t.Fatalf("released disk still holds %d blocks", n)
	}
	d.Close()
	if _, _, err := d.Put([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Put after Close: %v, want ErrClosed", err)
	}
}

func blocks(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks
}
