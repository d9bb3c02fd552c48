package files

import (
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/formdata"
)

// Uploads are written in chunks of chunkSize bytes with O_DIRECT where the
// file system allows it. In a microVM the guest's buffered write path is the
// slow part of an upload: every 4 KiB page is copied into the page cache,
// allocated by ext4 and later written back, and a 100 MiB file passes the
// guest's dirty limit, so the writer waits for writeback anyway. Under TCG
// that ran at 50–80 MB/s, while O_DIRECT writes of 1 MiB reach the virtio-blk
// device at ~220 MB/s without the guest copying the data at all (QEMU reads
// it from guest memory). Larger chunks also mean fewer syscalls and virtio
// requests, each of which costs much more under emulation: through the
// transfer disk, 4 MiB chunks (and slots) took QEMU ~350 ms of CPU per
// 100 MiB uploaded against ~500 with 1 MiB ones.
const (
	chunkSize = 4 << 20
	// directAlign is the alignment O_DIRECT wants of the buffer's address,
	// the file offset and the length: a page, which covers every block size
	// envd meets.
	directAlign = 4096
)

// chunks recycles the aligned chunk buffers of finished uploads.
var chunks = sync.Pool{New: func() any { return alignedChunk() }}

// alignedChunk is a chunkSize buffer whose first byte is directAlign-aligned.
func alignedChunk() *[]byte {
	raw := make([]byte, chunkSize+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(&raw[0]))%directAlign)) % directAlign
	b := raw[skip : skip+chunkSize : skip+chunkSize]
	return &b
}

// writeUpload copies src into f, a new empty file, and returns the first
// error of either side; src's errors are returned as they are (callers tell
// them apart with a readTracker). Reading and writing overlap: one chunk
// fills from src while the one before is written (an O_DIRECT write waits
// for the device, during which the guest's CPU would otherwise idle). Every
// chunk but the last is whole, so the file offset stays aligned for O_DIRECT
// until the tail, which is written through the page cache.
func writeUpload(f *os.File, src io.Reader) error {
	w := &chunkWriter{f: f}
	// tmpfs (the guest's /tmp) and some other file systems refuse O_DIRECT:
	// they get buffered writes.
	w.direct = w.setDirect(true) == nil

	const inFlight = 2
	free := make(chan *[]byte, inFlight)
	for range inFlight {
		free <- chunks.Get().(*[]byte)
	}
	defer func() {
		for range inFlight {
			chunks.Put(<-free)
		}
	}()
	type chunk struct {
		buf *[]byte
		n   int
	}
	full := make(chan chunk, inFlight)
	var failed atomic.Bool // the writer failed: stop reading
	written := make(chan error, 1)
	go func() {
		var err error
		for c := range full {
			if err == nil {
				if err = w.write((*c.buf)[:c.n]); err != nil {
					failed.Store(true)
				}
			}
			free <- c.buf
		}
		written <- err
	}()

	var rerr error
	for !failed.Load() {
		buf := <-free
		n, err := formdata.Fill(src, *buf)
		full <- chunk{buf, n}
		if err != nil {
			if err != io.EOF {
				rerr = err
			}
			break
		}
	}
	close(full)
	if err := <-written; err != nil {
		return err
	}
	if rerr != nil {
		return rerr
	}
	return w.trim()
}

// reserveStep is how far ahead of its O_DIRECT writes an upload's file is
// allocated. A direct write past the end of the file costs ext4 much more
// than one into allocated blocks (it serializes, updates the size and puts
// the inode on the orphan list in the journal for each write): in a guest
// under TCG, 100 MiB in 1 MiB writes took 0.17–0.42 s appending and
// 0.11–0.24 s into fallocated space.
const reserveStep = 16 << 20

// chunkWriter writes chunks to f, with O_DIRECT while direct.
type chunkWriter struct {
	f      *os.File
	direct bool
	off    int64 // bytes written
	// reserved is how far the file is allocated ahead of off (fallocate
	// also sets its size, which trim takes back); -1 once the file system
	// turned fallocate down.
	reserved int64
}

// reserve allocates the file through at least end, a reserveStep at a time.
func (w *chunkWriter) reserve(end int64) {
	if w.reserved < 0 || end <= w.reserved {
		return
	}
	to := (end + reserveStep - 1) / reserveStep * reserveStep
	if err := unix.Fallocate(int(w.f.Fd()), 0, w.reserved, to-w.reserved); err != nil {
		// Not supported, or no space for the reserve: plain writes tell
		// whether the data itself fits.
		w.reserved = -1
		return
	}
	w.reserved = to
}

// trim cuts what reserve allocated beyond the data.
func (w *chunkWriter) trim() error {
	if w.reserved > w.off {
		return w.f.Truncate(w.off)
	}
	return nil
}

// write writes p: its whole blocks with O_DIRECT when on, the rest (the
// file's tail) buffered.
func (w *chunkWriter) write(p []byte) error {
	if whole := len(p) &^ (directAlign - 1); w.direct && whole > 0 {
		w.reserve(w.off + int64(whole))
		n, err := w.f.Write(p[:whole])
		w.off += int64(n)
		if !errors.Is(err, syscall.EINVAL) {
			if err != nil {
				return err
			}
			p = p[whole:]
		}
		// EINVAL: the file system wants another alignment after all; it
		// wrote nothing, and gets the chunk buffered below.
	}
	if len(p) == 0 {
		return nil
	}
	if w.direct {
		if err := w.setDirect(false); err != nil {
			return err
		}
		w.direct = false
	}
	n, err := w.f.Write(p)
	w.off += int64(n)
	return err
}

// setDirect turns O_DIRECT on or off for f.
func (w *chunkWriter) setDirect(on bool) error {
	fd := int(w.f.Fd())
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		flags |= unix.O_DIRECT
	} else {
		flags &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
	return err
}
