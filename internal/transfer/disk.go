package transfer

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// reserved is the start of the disk the host never hands out: a guest
// kernel reads a new disk's first blocks looking for partitions, and bytes
// there could look like a table.
const reserved = SlotSize

// MinSize is the smallest transfer disk: the reserved start and one slot.
const MinSize = reserved + SlotSize

// Create makes the transfer disk file at path: sparse, size bytes (rounded
// down to whole slots), so it costs host disk only while uploads pass through.
func Create(path string, size int64) error {
	if size < MinSize {
		return fmt.Errorf("transfer disk of %d bytes: at least %d", size, MinSize)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size &^ (SlotSize - 1)); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

// Disk is the host's side of a VM's transfer disk: it hands out slots, each
// for one SlotSize piece of an upload, until Release.
type Disk struct {
	mu     sync.Mutex
	f      *os.File
	free   []int64 // offsets of free slots; the lowest handed out last
	closed bool
	put    int64 // bytes put, ever
}

// Open opens the transfer disk file at path (made by Create).
func Open(path string) (*Disk, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	slots := (fi.Size() - reserved) / SlotSize
	if slots < 1 {
		f.Close()
		return nil, fmt.Errorf("transfer disk %s: %d bytes, at least %d", path, fi.Size(), MinSize)
	}
	d := &Disk{f: f, free: make([]int64, 0, slots)}
	for i := slots - 1; i >= 0; i-- {
		d.free = append(d.free, reserved+i*SlotSize)
	}
	return d, nil
}

// ErrClosed is Put on a closed disk: its VM is gone.
var ErrClosed = errors.New("transfer disk closed")

// Put writes p (at most SlotSize bytes) into a free slot and returns its
// offset; ok is false when every slot is taken (the caller sends p inline).
func (d *Disk) Put(p []byte) (off int64, ok bool, err error) {
	if len(p) == 0 || len(p) > SlotSize {
		return 0, false, fmt.Errorf("transfer: put of %d bytes", len(p))
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return 0, false, ErrClosed
	}
	if len(d.free) == 0 {
		d.mu.Unlock()
		return 0, false, nil
	}
	off = d.free[len(d.free)-1]
	d.free = d.free[:len(d.free)-1]
	f := d.f
	d.mu.Unlock()
	if _, err := f.WriteAt(p, off); err != nil {
		d.Release(off)
		if errors.Is(err, os.ErrClosed) {
			err = ErrClosed
		}
		return 0, false, err
	}
	d.mu.Lock()
	d.put += int64(len(p))
	d.mu.Unlock()
	return off, true, nil
}

// Written is how many bytes Put has written into the disk, ever.
func (d *Disk) Written() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.put
}

// Release gives slots back once the guest has read them, and their blocks
// back to the host's file system.
func (d *Disk) Release(offs ...int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	for _, off := range offs {
		// Best effort: a file system without hole punching keeps the blocks.
		unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, SlotSize)
		d.free = append(d.free, off)
	}
}

// Free is the number of free slots.
func (d *Disk) Free() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.free)
}

// Close closes the file; later Puts fail with ErrClosed. The file itself is
// its VM's, removed with the VM's directory.
func (d *Disk) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return d.f.Close()
}
