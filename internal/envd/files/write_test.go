package files

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"testing"
)

// TestWriteUpload checks the chunked O_DIRECT copy at the sizes around its
// block and chunk boundaries, on a file system that takes O_DIRECT (the test's
// temporary directory, ext4 here) and on tmpfs, which may refuse it.
func TestWriteUpload(t *testing.T) {
	dirs := map[string]string{"temp dir": t.TempDir()}
	if shm, err := os.MkdirTemp("/dev/shm", "warren-files-test-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(shm) })
		dirs["tmpfs"] = shm
	}
	sizes := []int{0, 1, directAlign - 1, directAlign, directAlign + 1, chunkSize - 1, chunkSize, chunkSize + 1, 3*chunkSize + directAlign + 7}
	data := make([]byte, sizes[len(sizes)-1])
	rand.NewChaCha8([32]byte{7}).Read(data)
	for name, dir := range dirs {
		for _, size := range sizes {
			f, err := os.CreateTemp(dir, "upload-")
			if err != nil {
				t.Fatal(err)
			}
			// Short reads, as from a connection: fill must gather whole chunks.
			src := &shortReader{r: bytes.NewReader(data[:size]), max: 100_000}
			if err := writeUpload(f, src); err != nil {
				t.Fatalf("%s, %d bytes: %v", name, size, err)
			}
			f.Close()
			got, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[:size]) {
				t.Errorf("%s, %d bytes: the file has %d bytes, not the ones sent", name, size, len(got))
			}
			os.Remove(f.Name())
		}
	}
}

// TestWriteUploadReadError checks that a body that fails mid-way ends the
// copy with the body's own error.
func TestWriteUploadReadError(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "upload-")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cut := errors.New("connection cut")
	src := io.MultiReader(bytes.NewReader(make([]byte, 2*chunkSize+5)), &failingReader{cut})
	if err := writeUpload(f, src); !errors.Is(err, cut) {
		t.Fatalf("writeUpload = %v, want %v", err, cut)
	}
	if err := writeUpload(f, &failingReader{io.ErrUnexpectedEOF}); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("writeUpload of a cut multipart part = %v, want io.ErrUnexpectedEOF", err)
	}
}

// shortReader returns at most max bytes per Read, as a network connection does.
type shortReader struct {
	r   io.Reader
	max int
}

func (s *shortReader) Read(p []byte) (int, error) { return s.r.Read(p[:min(len(p), s.max)]) }

type failingReader struct{ err error }

func (f *failingReader) Read([]byte) (int, error) { return 0, f.err }
