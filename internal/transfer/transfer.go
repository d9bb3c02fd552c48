// Package transfer carries upload bodies from the host into a sandbox through
// a block device instead of the guest's network stack.
//
// Every microVM has a second virtio-blk disk, the transfer disk: a sparse file
// on the host that the guest sees as a raw device (virtio serial Serial). For
// POST /files the node's proxy writes the body's bytes into free slots of that
// file and sends envd, over the usual connection, a small framed description
// of the body instead of the body: which file starts where, and which slots
// hold its bytes. envd reads the slots with O_DIRECT into its O_DIRECT write
// buffers, so neither copy runs on the guest's CPU: QEMU moves the bytes from
// the host file into guest memory and from there into the root disk. Under
// TCG, where every byte the guest touches costs emulated instructions, that is
// what makes an upload run near the host's speed instead of the guest's.
//
// The framed body (Content-Type ContentType) is a sequence of frames, each a
// kind byte and a big-endian header:
//
//	'F' u32 n, n bytes   a file starts; its name (a multipart part's filename,
//	                     empty for an application/octet-stream body)
//	'D' u32 n, n bytes   the file's next n bytes, inline
//	'X' u64 off, u32 n   the file's next n bytes, on the transfer disk at off
//	'E' u32 n, n bytes   the sender failed (the client's body was malformed):
//	                     the message to answer with; the body ends
//
// A file's bytes are its D and X frames up to the next F or the end. Slots are
// SlotSize bytes at SlotSize-aligned offsets, so X frames fit O_DIRECT.
package transfer

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unsafe"
)

const (
	// ContentType marks a framed upload body.
	ContentType = "application/vnd.warren.transfer"
	// Serial is the transfer disk's virtio serial, how the guest finds it.
	Serial = "warren-transfer"
	// SlotSize is the unit the host allocates on the disk, and the most
	// bytes one X frame carries.
	SlotSize = 4 << 20
	// Align is what O_DIRECT asks of offsets, lengths and buffer addresses.
	Align = 4096
	// maxName bounds an F frame's name, maxInline a D frame and maxMessage an
	// E frame, so a bad body cannot make the reader allocate much.
	maxName    = 64 << 10
	maxInline  = SlotSize
	maxMessage = 64 << 10
)

const (
	kindFile   = 'F'
	kindInline = 'D'
	kindExtent = 'X'
	kindError  = 'E'
)

// Writer writes a framed body.
type Writer struct {
	w   io.Writer
	hdr [13]byte
}

// NewWriter returns a Writer that writes frames to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// File starts a file named name.
func (w *Writer) File(name string) error { return w.bytes(kindFile, []byte(name)) }

// Inline adds p to the current file.
func (w *Writer) Inline(p []byte) error {
	for len(p) > 0 {
		n := min(len(p), maxInline)
		if err := w.bytes(kindInline, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// Extent adds the n bytes at off on the transfer disk to the current file.
func (w *Writer) Extent(off int64, n int) error {
	if off < 0 || off%Align != 0 || n <= 0 || n > SlotSize {
		return fmt.Errorf("transfer: bad extent %d+%d", off, n)
	}
	w.hdr[0] = kindExtent
	binary.BigEndian.PutUint64(w.hdr[1:9], uint64(off))
	binary.BigEndian.PutUint32(w.hdr[9:13], uint32(n))
	_, err := w.w.Write(w.hdr[:13])
	return err
}

// Fail ends the body with an error message for the client.
func (w *Writer) Fail(msg string) error {
	if len(msg) > maxMessage {
		msg = msg[:maxMessage]
	}
	return w.bytes(kindError, []byte(msg))
}

func (w *Writer) bytes(kind byte, p []byte) error {
	w.hdr[0] = kind
	binary.BigEndian.PutUint32(w.hdr[1:5], uint32(len(p)))
	if _, err := w.w.Write(w.hdr[:5]); err != nil {
		return err
	}
	_, err := w.w.Write(p)
	return err
}

// SenderError is an E frame: the sender's reason the body ends early.
type SenderError struct{ Message string }

func (e *SenderError) Error() string { return e.Message }

// ErrMalformed wraps every error about the frames themselves.
var ErrMalformed = errors.New("malformed transfer body")

// Reader reads a framed body: NextFile moves to a file, Read reads its bytes.
type Reader struct {
	br  *bufio.Reader
	dev io.ReaderAt

	kind      byte    // the current data frame's kind, 0 between frames
	off       int64   // an X frame's next disk offset
	remaining int64   // bytes left in the current data frame
	inFile    bool    // a file has started: data frames are allowed
	next      *string // an F frame read: the file after the current one
	err       error   // sticky; io.EOF once the body ended
	bounce    []byte
}

// NewReader reads frames from r; X frames read dev, the transfer disk (opened
// with O_DIRECT in a guest: reads of it are Align-aligned).
func NewReader(r io.Reader, dev io.ReaderAt) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 64<<10), dev: dev}
}

// NextFile skips what is left of the current file and returns the next one's
// name; io.EOF when the body has no more files.
func (r *Reader) NextFile() (string, error) {
	for {
		if r.next != nil {
			name := *r.next
			r.next, r.inFile = nil, true
			return name, nil
		}
		if r.err != nil {
			return "", r.err
		}
		if r.kind == kindInline && r.remaining > 0 {
			if _, err := r.br.Discard(int(r.remaining)); err != nil {
				r.err = truncated(err)
				continue
			}
		}
		r.remaining = 0 // an extent is skipped without reading it
		if err := r.frame(); err != nil {
			r.err = err
		}
	}
}

// Read reads the current file's bytes; io.EOF at the file's end.
func (r *Reader) Read(p []byte) (int, error) {
	for r.remaining == 0 {
		if r.next != nil || r.err == io.EOF {
			return 0, io.EOF
		}
		if r.err != nil {
			return 0, r.err
		}
		if err := r.frame(); err != nil {
			r.err = err
		}
	}
	if len(p) == 0 {
		return 0, nil
	}
	want := int(min(int64(len(p)), r.remaining))
	var n int
	var err error
	if r.kind == kindInline {
		if n, err = io.ReadFull(r.br, p[:want]); err != nil {
			err = truncated(err)
		}
	} else {
		n, err = r.readExtent(p[:want])
	}
	r.remaining -= int64(n)
	r.off += int64(n)
	if err != nil {
		r.err = err
	}
	return n, err
}

// scratch is the aligned bounce buffer for unaligned extent reads.
func (r *Reader) scratch() []byte {
	if r.bounce == nil {
		r.bounce = alignedBuffer(SlotSize)
	}
	return r.bounce
}

// readExtent reads p (at most what is left of the X frame) from the disk:
// straight into p when p and the offset are aligned, else through an aligned
// bounce buffer.
func (r *Reader) readExtent(p []byte) (int, error) {
	if r.dev == nil {
		return 0, fmt.Errorf("%w: an extent frame, and no transfer disk", ErrMalformed)
	}
	if whole := len(p) &^ (Align - 1); whole > 0 && r.off%Align == 0 && aligned(p) {
		n, err := r.dev.ReadAt(p[:whole], r.off)
		if n == whole {
			err = nil
		}
		return n, diskError(err)
	}
	b := r.scratch()
	start := r.off &^ (Align - 1)
	skip := int(r.off - start)
	span := min(len(b), (skip+len(p)+Align-1)&^(Align-1))
	n, err := r.dev.ReadAt(b[:span], start)
	if n < skip+1 {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, diskError(err)
	}
	return copy(p, b[skip:n]), nil
}

// ErrDisk wraps failed reads of the transfer disk.
var ErrDisk = errors.New("read the transfer disk")

func diskError(err error) error {
	if err == nil {
		return nil
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%w: %w", ErrDisk, err)
}

// frame reads the next frame's header: a data frame becomes current, an F
// frame ends the file (next), an E frame the body.
func (r *Reader) frame() error {
	kind, err := r.br.ReadByte()
	if err == io.EOF {
		return io.EOF
	}
	if err != nil {
		return err
	}
	var hdr [12]byte
	switch kind {
	case kindFile, kindInline, kindError:
		if _, err := io.ReadFull(r.br, hdr[:4]); err != nil {
			return truncated(err)
		}
		n := int64(binary.BigEndian.Uint32(hdr[:4]))
		switch kind {
		case kindInline:
			if !r.inFile || n > maxInline {
				return fmt.Errorf("%w: inline frame of %d bytes outside a file or too long", ErrMalformed, n)
			}
			r.kind, r.remaining = kind, n
			return nil
		case kindFile:
			if n > maxName {
				return fmt.Errorf("%w: file name of %d bytes", ErrMalformed, n)
			}
		case kindError:
			if n > maxMessage {
				return fmt.Errorf("%w: error message of %d bytes", ErrMalformed, n)
			}
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(r.br, b); err != nil {
			return truncated(err)
		}
		if kind == kindError {
			return &SenderError{Message: string(b)}
		}
		name := string(b)
		r.next = &name
		return nil
	case kindExtent:
		if _, err := io.ReadFull(r.br, hdr[:12]); err != nil {
			return truncated(err)
		}
		off := int64(binary.BigEndian.Uint64(hdr[:8]))
		n := int64(binary.BigEndian.Uint32(hdr[8:12]))
		if !r.inFile || off < 0 || off%Align != 0 || n == 0 || n > SlotSize {
			return fmt.Errorf("%w: extent %d+%d", ErrMalformed, off, n)
		}
		r.kind, r.off, r.remaining = kind, off, n
		return nil
	}
	return fmt.Errorf("%w: unknown frame kind %q", ErrMalformed, kind)
}

func truncated(err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: cut short", ErrMalformed)
	}
	return err
}

func aligned(p []byte) bool { return uintptr(unsafe.Pointer(&p[0]))%Align == 0 }

// alignedBuffer is n bytes starting at an Align-aligned address.
func alignedBuffer(n int) []byte {
	raw := make([]byte, n+Align)
	skip := (Align - int(uintptr(unsafe.Pointer(&raw[0]))%Align)) % Align
	return raw[skip : skip+n : skip+n]
}
