package oci

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// unpackStats counts what unpack wrote.
type unpackStats struct {
	Entries, Bytes int64
	// Skipped are entries unpack left out (hard links to missing files,
	// entries shadowed by an upper layer's path), for the log.
	Skipped int
}

// unpack writes the flattened image file system read from tr into r. The
// stream is mutate.Extract's: the top layer's entries come first and a path
// appears at most once, so a path that already exists was written by an upper
// layer and wins (a directory made implicitly for a child is the exception:
// its own entry still sets its owner and mode). Hard links are made at the
// end, once the files they name exist.
func unpack(ctx context.Context, r *root, tr *tar.Reader, log *slog.Logger) (unpackStats, error) {
	var st unpackStats
	type link struct{ name, target string }
	var links []link
	for {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return st, fmt.Errorf("read image layers: %w", err)
		}
		name := relPath(hdr.Name)
		if name == "." {
			continue // the root's own metadata: "/" stays root-owned 0755
		}
		if hdr.Typeflag == tar.TypeLink {
			links = append(links, link{name, relPath(hdr.Linkname)})
			continue
		}
		wrote, err := unpackEntry(r, name, hdr, tr)
		if err != nil {
			return st, err
		}
		if !wrote {
			st.Skipped++
			log.Debug("image unpack: kept the upper layer's entry", "path", "/"+name)
			continue
		}
		st.Entries++
		st.Bytes += hdr.Size
	}
	for _, l := range links {
		if err := r.hardlink(l.target, l.name); err != nil {
			st.Skipped++
			log.Warn("image unpack: hard link left out", "path", "/"+l.name, "target", "/"+l.target, "err", err)
			continue
		}
		st.Entries++
	}
	return st, nil
}

// unpackEntry writes one entry; wrote is false when an upper layer's entry
// is already at name.
func unpackEntry(r *root, name string, hdr *tar.Header, data io.Reader) (wrote bool, err error) {
	dirfd, base, err := r.parent(name, true)
	if err != nil {
		return false, fmt.Errorf("unpack /%s: %w", name, err)
	}
	defer unix.Close(dirfd)
	mode := uint32(hdr.Mode) & 0o7777
	var existing unix.Stat_t
	exists := unix.Fstatat(dirfd, base, &existing, unix.AT_SYMLINK_NOFOLLOW) == nil
	if exists && !(hdr.Typeflag == tar.TypeDir && existing.Mode&unix.S_IFMT == unix.S_IFDIR) {
		return false, nil
	}
	fail := func(err error) (bool, error) { return false, fmt.Errorf("unpack /%s: %w", name, err) }
	switch hdr.Typeflag {
	case tar.TypeDir:
		if !exists {
			if err := unix.Mkdirat(dirfd, base, 0o700); err != nil {
				return fail(err)
			}
		}
		if err := setOwnerMode(dirfd, base, hdr.Uid, hdr.Gid, mode, true); err != nil {
			return fail(err)
		}
	case tar.TypeReg, tar.TypeRegA:
		fd, err := unix.Openat(dirfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return fail(err)
		}
		f := os.NewFile(uintptr(fd), "/"+name)
		_, err = io.Copy(f, data)
		if err == nil {
			err = f.Chown(hdr.Uid, hdr.Gid)
		}
		if err == nil {
			err = unix.Fchmod(fd, mode)
		}
		if err == nil {
			err = setXattrs(fd, hdr)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fail(err)
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, dirfd, base); err != nil {
			return fail(err)
		}
		if err := setOwnerMode(dirfd, base, hdr.Uid, hdr.Gid, 0, false); err != nil {
			return fail(err)
		}
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(dirfd, base, kind|0o600, int(dev)); err != nil {
			return fail(err)
		}
		if err := setOwnerMode(dirfd, base, hdr.Uid, hdr.Gid, mode, true); err != nil {
			return fail(err)
		}
	default:
		// Sockets and other oddities have no place in an image.
		return false, nil
	}
	if hdr.Typeflag != tar.TypeDir {
		// Directory times change as their children arrive; files keep theirs.
		ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
		if err := unix.UtimesNanoAt(dirfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(err)
		}
	}
	return true, nil
}

// setXattrs sets a regular file's extended attributes from PAX records (file
// capabilities such as ping's cap_net_raw live there).
func setXattrs(fd int, hdr *tar.Header) error {
	for k, v := range hdr.PAXRecords {
		attr, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if err := unix.Fsetxattr(fd, attr, []byte(v), 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", attr, err)
		}
	}
	return nil
}

// hardlink makes name a hard link to target; neither's last component is
// followed, and both resolve inside the root.
func (r *root) hardlink(target, name string) error {
	tdir, tbase, err := r.parent(target, false)
	if err != nil {
		return err
	}
	defer unix.Close(tdir)
	ndir, nbase, err := r.parent(name, true)
	if err != nil {
		return err
	}
	defer unix.Close(ndir)
	if tbase == "" || nbase == "" {
		return fmt.Errorf("hard link to or from /")
	}
	var st unix.Stat_t
	if unix.Fstatat(ndir, nbase, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
		return fmt.Errorf("/%s exists already", path.Clean(name))
	}
	return unix.Linkat(tdir, tbase, ndir, nbase, 0)
}
