package guest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/warren-sh/warren/internal/envd/guestinit"
)

// BuildInitramfs writes the initramfs for k to out: a newc cpio archive
// holding envd as /init, the Modules with their dependencies, and the order
// to load them in (the layout guestinit reads). It is uncompressed: under TCG
// the guest unpacked the 14 MB archive in 0.36 s, the same archive gzipped
// (-6, 7.2 MB) in 1.55 s.
func BuildInitramfs(k *Kernel, envdPath, out string) error {
	mods, err := ModuleOrder(k.ModulesDir, Modules)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".initramfs-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err := writeInitramfs(bw, envdPath, mods); err != nil {
		tmp.Close()
		return fmt.Errorf("build initramfs %s: %w", out, err)
	}
	if err := bw.Flush(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}

func writeInitramfs(w io.Writer, envdPath string, mods []Module) error {
	c := &cpioWriter{w: w}
	modDir := strings.TrimPrefix(guestinit.ModulesDir, "/")
	for _, dir := range []string{"dev", "proc", "sys", "newroot", "lib", modDir} {
		if err := c.dir(dir, 0o755); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console as init's stdin, stdout and stderr before
	// devtmpfs is mounted; without the node init would run deaf and mute.
	if err := c.charDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := c.file("init", 0o755, envdPath); err != nil {
		return err
	}
	var order strings.Builder
	for _, m := range mods {
		if err := c.file(modDir+"/"+m.Name+".ko", 0o644, m.Path); err != nil {
			return err
		}
		order.WriteString(m.Name + "\n")
	}
	if err := c.data(strings.TrimPrefix(guestinit.ModuleOrderFile, "/"), 0o644, []byte(order.String())); err != nil {
		return err
	}
	return c.close()
}

// cpioWriter writes the "newc" cpio format the kernel unpacks into its
// initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
// Every entry is owned by root with mtime 0, so the archive depends only on
// its contents.
type cpioWriter struct {
	w   io.Writer
	ino uint32
}

const (
	cpioDir  = 0o040000
	cpioFile = 0o100000
	cpioChar = 0o020000
)

func (c *cpioWriter) dir(name string, perm uint32) error {
	return c.header(name, cpioDir|perm, 0, 0, 0, 2)
}

func (c *cpioWriter) charDev(name string, perm, major, minor uint32) error {
	return c.header(name, cpioChar|perm, 0, major, minor, 1)
}

func (c *cpioWriter) data(name string, perm uint32, b []byte) error {
	if err := c.header(name, cpioFile|perm, len(b), 0, 0, 1); err != nil {
		return err
	}
	if _, err := c.w.Write(b); err != nil {
		return err
	}
	return c.pad(len(b))
}

// file copies the host file src into the archive as name.
func (c *cpioWriter) file(name string, perm uint32, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", src)
	}
	size := int(fi.Size())
	if err := c.header(name, cpioFile|perm, size, 0, 0, 1); err != nil {
		return err
	}
	n, err := io.Copy(c.w, f)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if int(n) != size {
		return fmt.Errorf("%s changed size while being archived", src)
	}
	return c.pad(size)
}

// close writes the trailer entry that ends the archive.
func (c *cpioWriter) close() error {
	c.ino = 0
	return c.header("TRAILER!!!", 0, 0, 0, 0, 1)
}

func (c *cpioWriter) header(name string, mode uint32, size int, rmajor, rminor, nlink uint32) error {
	if name != "TRAILER!!!" {
		c.ino++
	}
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
	// rdevmajor, rdevminor, namesize (with its NUL), check.
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	if _, err := io.WriteString(c.w, hdr+name+"\x00"); err != nil {
		return err
	}
	return c.pad(len(hdr) + len(name) + 1)
}

// pad aligns the stream to 4 bytes after n bytes of header or data.
func (c *cpioWriter) pad(n int) error {
	if r := n % 4; r != 0 {
		_, err := c.w.Write(make([]byte, 4-r))
		return err
	}
	return nil
}
