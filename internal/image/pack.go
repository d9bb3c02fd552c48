package image

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"
)

// ext4Tools are the host programs PackTree runs.
var ext4Tools = []hostTool{
	{"mkfs.ext4", "e2fsprogs"},
	{"e2fsck", "e2fsprogs"},
	{"resize2fs", "e2fsprogs"},
	{"dumpe2fs", "e2fsprogs"},
}

// PackTree packs the directory tree into a new ext4 image at path (which must
// not exist) the way the base image is packed: label Label, no blocks reserved
// for root, an inode per 8 KiB, at least freeBytes free, checked with e2fsck.
// The tree is copied as it is (owners, modes, device nodes, xattrs, symlinks
// unresolved); it must not contain mount points. log receives the phases and
// tool output; nothing is logged when nil. It returns the image's apparent size.
func PackTree(ctx context.Context, tree, path string, freeBytes int64, log *slog.Logger) (int64, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	p := &progress{log: log, start: time.Now()}
	tools, err := toolPaths(ext4Tools)
	if err != nil {
		return 0, err
	}
	u, err := measureTree(tree)
	if err != nil {
		return 0, err
	}
	size := imageSize(u, freeBytes)
	p.phase("mkfs.ext4", "content", u.Bytes, "inodes", u.Inodes, "size", size)
	if err := mkfs(ctx, p, tools, tree, path, size); err != nil {
		return 0, err
	}
	if err := ensureFree(ctx, p, tools, path, freeBytes); err != nil {
		return 0, err
	}
	p.phase("checking file system")
	if err := fsck(ctx, p, tools, path); err != nil {
		return 0, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("stat image: %w", err)
	}
	return fi.Size(), nil
}
