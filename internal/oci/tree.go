package oci

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// root is a directory tree that holds an image's file system and is written
// as if it were "/": every path is resolved with openat2's RESOLVE_IN_ROOT, so
// a symlink in the tree, absolute (/etc/resolv.conf -> /run/...) or relative
// (../../..), resolves inside the tree, never onto the host. The last component
// of a path that is written is never followed: a write replaces a symlink
// instead of writing through it.
type root struct {
	dir string
	fd  int // O_PATH descriptor of dir
}

func openRoot(dir string) (*root, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open tree %s: %w", dir, err)
	}
	return &root{dir: dir, fd: fd}, nil
}

func (r *root) Close() error { return unix.Close(r.fd) }

// relPath turns an image path (/etc/passwd, ./etc/passwd, etc/passwd) into a
// clean path relative to the root; "." is the root itself.
func relPath(p string) string {
	p = path.Clean("/" + p)
	if p == "/" {
		return "."
	}
	return p[1:]
}

// open resolves p inside the root, following symlinks inside it.
func (r *root) open(p string, flags int) (int, error) {
	how := &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC),
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	for {
		fd, err := unix.Openat2(r.fd, relPath(p), how)
		// EAGAIN: a concurrent rename raced the resolution; nothing else
		// writes the tree, but the kernel asks for a retry all the same.
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: "/" + relPath(p), Err: err}
		}
		return fd, nil
	}
}

// stat is lstat of p's last component, with the directories above it resolved
// inside the root. ok is false when p does not exist.
func (r *root) stat(p string) (st unix.Stat_t, ok bool, err error) {
	dirfd, base, err := r.parent(p, false)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			return st, false, nil
		}
		return st, false, err
	}
	defer unix.Close(dirfd)
	if base == "" {
		err = unix.Fstat(dirfd, &st)
	} else {
		err = unix.Fstatat(dirfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	}
	if errors.Is(err, unix.ENOENT) {
		return st, false, nil
	}
	if err != nil {
		return st, false, fmt.Errorf("stat /%s: %w", relPath(p), err)
	}
	return st, true, nil
}

// statFollow is stat of p with every symlink followed inside the root.
func (r *root) statFollow(p string) (st unix.Stat_t, ok bool) {
	fd, err := r.open(p, unix.O_PATH)
	if err != nil {
		return st, false
	}
	defer unix.Close(fd)
	return st, unix.Fstat(fd, &st) == nil
}

// isExecutable reports whether p is, after symlinks, a regular file with an
// execute bit.
func (r *root) isExecutable(p string) bool {
	st, ok := r.statFollow(p)
	return ok && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Mode&0o111 != 0
}

// readFile reads p, following symlinks inside the root.
func (r *root) readFile(p string) ([]byte, error) {
	fd, err := r.open(p, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "/"+relPath(p))
	defer f.Close()
	return io.ReadAll(f)
}

// parent returns a descriptor of p's directory (resolved inside the root,
// created with mode 0755 and owner root where missing if create is set) and
// p's last component; base is "" when p is the root itself.
func (r *root) parent(p string, create bool) (dirfd int, base string, err error) {
	rel := relPath(p)
	if rel == "." {
		fd, err := unix.Dup(r.fd)
		return fd, "", err
	}
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		fd, err := unix.Dup(r.fd)
		return fd, base, err
	}
	if !create {
		fd, err := r.open(dir, unix.O_PATH|unix.O_DIRECTORY)
		return fd, base, err
	}
	fd, err := r.mkdirAll(dir, 0o755, 0, 0)
	return fd, base, err
}

// mkdirAll makes directory p and its missing parents (mode, uid, gid for the
// ones it creates) and returns an O_PATH descriptor of it. Existing path
// components are used as they are, symlinks resolved inside the root.
func (r *root) mkdirAll(p string, mode uint32, uid, gid int) (int, error) {
	rel := relPath(p)
	cur, err := unix.Dup(r.fd)
	if err != nil {
		return -1, err
	}
	if rel == "." {
		return cur, nil
	}
	comps := strings.Split(rel, "/")
	for i, c := range comps {
		sub := strings.Join(comps[:i+1], "/")
		next, err := r.open(sub, unix.O_PATH|unix.O_DIRECTORY)
		if errors.Is(err, unix.ENOENT) {
			// mkdirat never follows a symlink in the last component: a
			// dangling symlink here fails with EEXIST instead of
			// creating its target.
			if err := unix.Mkdirat(cur, c, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(cur)
				return -1, fmt.Errorf("mkdir /%s: %w", sub, err)
			} else if err == nil {
				if err := setOwnerMode(cur, c, uid, gid, mode, true); err != nil {
					unix.Close(cur)
					return -1, err
				}
			}
			next, err = r.open(sub, unix.O_PATH|unix.O_DIRECTORY)
		}
		unix.Close(cur)
		if err != nil {
			return -1, fmt.Errorf("directory /%s: %w", sub, err)
		}
		cur = next
	}
	return cur, nil
}

// setOwnerMode sets the owner and permission bits of name in dirfd without
// following a symlink. The mode is set after the owner: chown clears setuid.
func setOwnerMode(dirfd int, name string, uid, gid int, mode uint32, setMode bool) error {
	if err := unix.Fchownat(dirfd, name, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown %s: %w", name, err)
	}
	if !setMode {
		return nil
	}
	// fchmodat follows symlinks; callers only pass names they just made as
	// directories, files or device nodes, and nothing else writes the tree.
	if err := unix.Fchmodat(dirfd, name, mode&0o7777, 0); err != nil {
		return fmt.Errorf("chmod %s: %w", name, err)
	}
	return nil
}

// writeFile replaces p with a regular file holding data (a symlink or file
// there is removed first, never written through), owned by uid:gid with mode.
func (r *root) writeFile(p string, data []byte, mode uint32, uid, gid int) error {
	return r.writeFrom(p, strings.NewReader(string(data)), mode, uid, gid)
}

// writeFrom is writeFile with the content read from src.
func (r *root) writeFrom(p string, src io.Reader, mode uint32, uid, gid int) error {
	dirfd, base, err := r.parent(p, true)
	if err != nil {
		return fmt.Errorf("write /%s: %w", relPath(p), err)
	}
	defer unix.Close(dirfd)
	if base == "" {
		return fmt.Errorf("write /: not a file")
	}
	if err := unix.Unlinkat(dirfd, base, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("write /%s: replace: %w", relPath(p), err)
	}
	fd, err := unix.Openat(dirfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write /%s: %w", relPath(p), err)
	}
	f := os.NewFile(uintptr(fd), "/"+relPath(p))
	_, err = io.Copy(f, src)
	if err == nil {
		err = f.Chown(uid, gid)
	}
	if err == nil {
		err = unix.Fchmod(fd, mode&0o7777)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write /%s: %w", relPath(p), err)
	}
	return nil
}

// ensureDir makes directory p with mode and owner if it is missing; an
// existing directory (or symlink to one) is left as it is.
func (r *root) ensureDir(p string, mode uint32, uid, gid int) error {
	fd, err := r.mkdirAll(p, mode, uid, gid)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

// copyTree copies the directory src into dst (both inside the root; dst is
// created) with every copy owned by uid:gid: how useradd fills a home from
// /etc/skel. Symlinks are copied as links, other special files skipped.
func (r *root) copyTree(src, dst string, uid, gid int) error {
	fd, err := r.open(src, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	dir := os.NewFile(uintptr(fd), src)
	entries, err := dir.ReadDir(-1)
	if err != nil {
		dir.Close()
		return fmt.Errorf("read %s: %w", src, err)
	}
	defer dir.Close()
	for _, e := range entries {
		s, d := path.Join(src, e.Name()), path.Join(dst, e.Name())
		var st unix.Stat_t
		if err := unix.Fstatat(fd, e.Name(), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("stat %s: %w", s, err)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if err := r.ensureDir(d, st.Mode&0o7777, uid, gid); err != nil {
				return err
			}
			if err := r.copyTree(s, d, uid, gid); err != nil {
				return err
			}
		case unix.S_IFREG:
			in, err := unix.Openat(fd, e.Name(), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open %s: %w", s, err)
			}
			f := os.NewFile(uintptr(in), s)
			err = r.writeFrom(d, f, st.Mode&0o777, uid, gid)
			f.Close()
			if err != nil {
				return err
			}
		case unix.S_IFLNK:
			target, err := readlinkat(fd, e.Name())
			if err != nil {
				return fmt.Errorf("readlink %s: %w", s, err)
			}
			if err := r.symlink(target, d, uid, gid); err != nil {
				return err
			}
		}
	}
	return nil
}

// symlink makes p a symlink to target, replacing what is there unless it is a directory.
func (r *root) symlink(target, p string, uid, gid int) error {
	dirfd, base, err := r.parent(p, true)
	if err != nil {
		return err
	}
	defer unix.Close(dirfd)
	if err := unix.Unlinkat(dirfd, base, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("symlink /%s: replace: %w", relPath(p), err)
	}
	if err := unix.Symlinkat(target, dirfd, base); err != nil {
		return fmt.Errorf("symlink /%s: %w", relPath(p), err)
	}
	return unix.Fchownat(dirfd, base, uid, gid, unix.AT_SYMLINK_NOFOLLOW)
}

func readlinkat(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}
