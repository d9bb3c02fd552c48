package microvm

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// copySparse copies the file src to dst (which must not exist), skipping
// src's holes: a disk overlay or a memory file is mostly holes, and dst stays
// as sparse as src. Data extents are copied with copy_file_range, in the
// kernel (a reflink where the file system shares blocks).
func copySparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
			err = fmt.Errorf("copy %s to %s: %w", src, dst, err)
		}
	}()
	size := fi.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		if err := copyRange(in, out, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return out.Sync()
}

// copyRange copies n bytes at off from in to the same offset in out.
func copyRange(in, out *os.File, off, n int64) error {
	for n > 0 {
		src, dst := off, off
		c, err := unix.CopyFileRange(int(in.Fd()), &src, int(out.Fd()), &dst, int(min(n, 1<<30)), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
				// A kernel or file system without copy_file_range here: copy through user space.
				_, err := io.Copy(io.NewOffsetWriter(out, off), io.NewSectionReader(in, off, n))
				return err
			}
			return fmt.Errorf("copy_file_range: %w", err)
		}
		if c == 0 {
			return fmt.Errorf("copy_file_range: %d bytes short at %d", n, off)
		}
		off, n = off+int64(c), n-int64(c)
	}
	return nil
}
