// Package durable puts what a node keeps on its disk for good: the files of a
// template build, a snapshot or a paused sandbox are written through the page
// cache (QEMU writes most of them), and a rename publishes them at once; what
// the rename publishes only survives a host crash once it and the files are
// synced. Until then a crash can leave a published entry whose files are
// empty or partly written, which a later resume would trust.
package durable

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// SyncTree makes everything under root durable: each regular file's data,
// then each directory (its entries), deepest first, root last, then root's
// parent, which holds the name root was renamed to. Between files it stops
// with ctx's error once ctx is done.
func SyncTree(ctx context.Context, root string) error {
	var dirs []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		switch {
		case d.IsDir():
			dirs = append(dirs, p)
			return nil
		case d.Type().IsRegular():
			return syncPath(p)
		}
		return nil // a symbolic link: its target is not ours to sync
	})
	if err != nil {
		return fmt.Errorf("durable: sync %s: %w", root, err)
	}
	slices.Reverse(dirs)
	for _, d := range append(dirs, filepath.Dir(root)) {
		if err := syncPath(d); err != nil {
			return fmt.Errorf("durable: sync %s: %w", root, err)
		}
	}
	return nil
}

// Sync syncs the file or directory at p: a file's data and size, a
// directory's entries (names created, renamed or removed in it).
func Sync(p string) error {
	if err := syncPath(p); err != nil {
		return fmt.Errorf("durable: %w", err)
	}
	return nil
}

// WriteFile writes data to a new file p (it must not exist), syncs it and its
// directory.
func WriteFile(p string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("durable: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncPath(filepath.Dir(p))
	}
	if err != nil {
		os.Remove(p)
		return fmt.Errorf("durable: write %s: %w", p, err)
	}
	return nil
}

func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// BootID is the identity of the host's current boot (the kernel's random
// boot_id): state written in an earlier boot and never synced may be torn.
func BootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("durable: read the boot ID: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
