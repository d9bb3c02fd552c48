// Package blob is where a node keeps saved sandbox state: paused sandboxes
// (paused/<sandboxID>) and snapshots (snapshots/<id>), one directory per key.
//
// Only local storage exists for now (Local): a directory on the node's data
// file system, so that the VM runtime can move a VM's memory file and disk
// into an entry, and back, by rename. Object storage (S3) comes later, as
// another implementation that stages entries through a Local.
package blob

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// Local keeps each entry as the directory Root/<key>.
type Local struct {
	// Root must be on the file system of the VM runtime's state root.
	Root string
}

// keyPart is one element of a key: what a sandbox or snapshot ID may be.
var keyPart = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// CheckKey checks that key is slash-separated elements of letters, digits,
// '-', '_' and '.' (each starting with a letter or digit): a relative path
// that stays inside Root.
func CheckKey(key string) error {
	if key == "" {
		return errors.New("blob: empty key")
	}
	for _, part := range strings.Split(key, "/") {
		if !keyPart.MatchString(part) {
			return fmt.Errorf("blob: key %q: element %q is not 1-128 letters, digits, '-', '_' or '.' starting with a letter or digit", key, part)
		}
	}
	return nil
}

// Path is the directory of the entry key (which need not exist). key must
// pass CheckKey.
func (l *Local) Path(key string) string {
	return filepath.Join(l.Root, filepath.FromSlash(key))
}

// Exists reports whether the entry key exists.
func (l *Local) Exists(ctx context.Context, key string) (bool, error) {
	if err := CheckKey(key); err != nil {
		return false, err
	}
	_, err := os.Stat(l.Path(key))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("blob: %w", err)
	}
	return true, nil
}

// Delete removes the entry key; no error if it does not exist. The entry is
// first renamed aside, so that it is gone at once for readers, even if the
// removal of a large entry is interrupted (the next Delete of the key or
// Clean finishes it).
func (l *Local) Delete(ctx context.Context, key string) error {
	if err := CheckKey(key); err != nil {
		return err
	}
	p := l.Path(key)
	aside, err := os.MkdirTemp(filepath.Dir(p), "."+filepath.Base(p)+".deleting-")
	if errors.Is(err, fs.ErrNotExist) {
		return nil // not even the parent exists
	}
	if err != nil {
		return fmt.Errorf("blob: delete %s: %w", key, err)
	}
	dst := filepath.Join(aside, "entry")
	if err := os.Rename(p, dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		os.Remove(aside)
		return fmt.Errorf("blob: delete %s: %w", key, err)
	}
	if err := os.RemoveAll(aside); err != nil {
		return fmt.Errorf("blob: delete %s: %w", key, err)
	}
	return nil
}

// Size is the disk space the entry key takes, in bytes: allocated blocks,
// so a sparse memory file counts for the pages it holds.
func (l *Local) Size(ctx context.Context, key string) (int64, error) {
	if err := CheckKey(key); err != nil {
		return 0, err
	}
	n, err := diskUsage(l.Path(key))
	if err != nil {
		return 0, fmt.Errorf("blob: size of %s: %w", key, err)
	}
	return n, nil
}

// Usage is the disk space the entries take, by the first element of their
// keys ("paused", "snapshots"). Unfinished work (saves in progress,
// interrupted deletes) counts too: it takes the space.
func (l *Local) Usage(ctx context.Context) (map[string]int64, error) {
	out := map[string]int64{}
	entries, err := os.ReadDir(l.Root)
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("blob: usage: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() || !keyPart.MatchString(e.Name()) {
			continue
		}
		n, err := diskUsage(filepath.Join(l.Root, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("blob: usage: %w", err)
		}
		out[e.Name()] = n
	}
	return out, nil
}

// Clean removes what interrupted work left under Root: the temporary
// directories of saves that did not finish (".<name>.tmp-*", see the VM
// runtime) and of deletes (".<name>.deleting-*"). Call it only when nothing
// writes entries, at the node's start.
func (l *Local) Clean(ctx context.Context) error {
	var errs []error
	err := filepath.WalkDir(l.Root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if p == l.Root || !d.IsDir() {
			return nil
		}
		name := d.Name()
		if strings.HasPrefix(name, ".") && (strings.Contains(name, ".tmp-") || strings.Contains(name, ".deleting-")) {
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, err)
			}
			return filepath.SkipDir
		}
		// Entries are not searched: only the prefixes above them hold work
		// directories.
		if rel, _ := filepath.Rel(l.Root, p); strings.Count(rel, string(filepath.Separator)) >= 1 {
			return filepath.SkipDir
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("blob: clean: %w", err)
	}
	return nil
}

// diskUsage adds up the allocated blocks of the files under p (directories
// are not counted), counting a file with several links once.
func diskUsage(p string) (int64, error) {
	var total int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil // a few KB each; an empty prefix takes nothing
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			total += fi.Size()
			return nil
		}
		if st.Nlink > 1 {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		total += st.Blocks * 512
		return nil
	})
	return total, err
}

// DiskUsage is the disk space the files under dir take (allocated blocks,
// hard links counted once); 0 when dir does not exist.
func DiskUsage(dir string) (int64, error) {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	return diskUsage(dir)
}
