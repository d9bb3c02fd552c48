package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

const (
	blockSize = 4096
	inodeSize = 256
	// bytesPerInode is one inode per 8 KiB instead of mke2fs's 16 KiB: users
	// fill sandboxes with node_modules and site-packages, millions of small
	// files, and run out of inodes long before blocks otherwise.
	bytesPerInode = 8192
	mib           = 1 << 20
	// GiB is a gibibyte, for sizes in options.
	GiB = 1 << 30
)

// treeUsage is what a directory tree needs in an ext4 file system.
type treeUsage struct {
	// Bytes is the data of files, directories and long symlinks, in whole blocks.
	Bytes int64
	// Inodes is the number of distinct inodes (hard links count once).
	Inodes int64
}

// measureTree walks root without following symlinks or leaving its file system.
func measureTree(root string) (treeUsage, error) {
	var u treeUsage
	type key struct{ dev, ino uint64 }
	seen := map[key]bool{}
	var rootDev uint64
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		if p == root {
			rootDev = st.Dev
		} else if d.IsDir() && st.Dev != rootDev {
			return fmt.Errorf("%s is a mount point; unmount it before building an image", p)
		}
		k := key{st.Dev, st.Ino}
		if seen[k] {
			return nil
		}
		seen[k] = true
		u.Inodes++
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG, syscall.S_IFDIR:
			u.Bytes += roundUp(st.Size, blockSize)
		case syscall.S_IFLNK:
			// Targets shorter than 60 bytes live in the inode itself.
			if st.Size >= 60 {
				u.Bytes += blockSize
			}
		}
		return nil
	})
	if err != nil {
		return u, fmt.Errorf("measure %s: %w", root, err)
	}
	return u, nil
}

// imageSize is the size of an ext4 image that holds a tree of usage u and
// leaves about free bytes free. It is an estimate that errs large; the build
// checks the real free space after mkfs and grows the image if it fell short.
func imageSize(u treeUsage, free int64) int64 {
	// Extent blocks, directory growth and allocation slack: about 1/16 of the data.
	data := u.Bytes + u.Bytes/16 + free
	inodes := max(data/bytesPerInode, u.Inodes+u.Inodes/4)
	total := data + inodes*inodeSize
	// Group descriptors, bitmaps and reserved GDT blocks for online growth.
	total += total / 64
	total += journalBytes(total)
	return roundUp(total, mib)
}

// journalBytes is the journal mke2fs creates for a file system of this size
// (ext2fs_default_journal_size in e2fsprogs 1.47, 4 KiB blocks).
func journalBytes(size int64) int64 {
	blocks := size / blockSize
	var j int64
	switch {
	case blocks < 32768:
		j = 1024
	case blocks < 256*1024:
		j = 4096
	case blocks < 512*1024:
		j = 8192
	case blocks < 4096*1024:
		j = 16384
	case blocks < 8192*1024:
		j = 32768
	case blocks < 16384*1024:
		j = 65536
	case blocks < 32768*1024:
		j = 131072
	default:
		j = 262144
	}
	return j * blockSize
}

func roundUp(n, to int64) int64 {
	return (n + to - 1) / to * to
}

// mkfs creates the image file at path (sparse, size bytes) holding tree.
func mkfs(ctx context.Context, p *progress, tools map[string]string, tree, path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create image: %w", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("size image %s: %w", path, err)
	}
	// -m 0: no blocks reserved for root, so the free space is the users';
	// -b 4096: the sizing math assumes 4 KiB blocks, which mke2fs would lower
	// for small file systems.
	return run(ctx, newToolOutput(p, "mkfs.ext4"), tools["mkfs.ext4"],
		"-q", "-F", "-t", "ext4", "-L", Label, "-b", strconv.Itoa(blockSize),
		"-i", strconv.Itoa(bytesPerInode), "-I", strconv.Itoa(inodeSize), "-m", "0",
		"-d", tree, path)
}

// superblock returns the fields dumpe2fs prints for the image's superblock,
// e.g. "Filesystem volume name", "Free blocks", "Block size".
func superblock(ctx context.Context, p *progress, tools map[string]string, path string) (map[string]string, error) {
	var buf bytes.Buffer
	out := newToolOutput(p, "dumpe2fs")
	out.quiet = true // the fields are parsed, not logged
	cmd := []string{"-h", path}
	if err := runCapture(ctx, out, &buf, tools["dumpe2fs"], cmd...); err != nil {
		return nil, err
	}
	fields := map[string]string{}
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return fields, nil
}

// freeBytes is the free space the superblock reports.
func freeBytes(sb map[string]string) (int64, error) {
	free, err1 := strconv.ParseInt(sb["Free blocks"], 10, 64)
	bs, err2 := strconv.ParseInt(sb["Block size"], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("superblock has no usable Free blocks %q / Block size %q", sb["Free blocks"], sb["Block size"])
	}
	return free * bs, nil
}

// ensureFree grows the image with resize2fs until at least want bytes are
// free: imageSize is an estimate, the promise to users is the free space.
func ensureFree(ctx context.Context, p *progress, tools map[string]string, path string, want int64) error {
	for range 3 {
		sb, err := superblock(ctx, p, tools, path)
		if err != nil {
			return err
		}
		free, err := freeBytes(sb)
		if err != nil {
			return err
		}
		if free >= want {
			return nil
		}
		fi, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("stat image: %w", err)
		}
		short := want - free
		size := roundUp(fi.Size()+short+short/16+short/bytesPerInode*inodeSize, mib)
		p.phase("growing image", "free", free, "want", want, "size", size)
		if err := os.Truncate(path, size); err != nil {
			return fmt.Errorf("grow image: %w", err)
		}
		if err := run(ctx, newToolOutput(p, "resize2fs"), tools["resize2fs"], path); err != nil {
			return err
		}
	}
	return fmt.Errorf("image %s still has less than %d bytes free after growing it", path, want)
}

// fsck checks the image read-only; any problem fails the build rather than
// shipping a file system the guest kernel may refuse.
func fsck(ctx context.Context, p *progress, tools map[string]string, path string) error {
	return run(ctx, newToolOutput(p, "e2fsck"), tools["e2fsck"], "-f", "-n", path)
}

// replaceEnvd swaps /usr/bin/envd inside the image for src, without mounting:
// envd changes far more often than the operating system around it, and a
// swap takes a second where a rebuild takes minutes.
func replaceEnvd(ctx context.Context, p *progress, tools map[string]string, path, src, wantSHA string) error {
	// debugfs's write takes a name in the current directory, gives the inode the
	// source's mode bits and uid/gid 0; sif pins the mode so a source file with
	// odd permissions cannot leak in. rm fails harmlessly when envd is absent.
	script := fmt.Sprintf("cd /usr/bin\nrm envd\nwrite %s envd\nsif envd mode 0100755\nsif envd uid 0\nsif envd gid 0\n", src)
	if strings.ContainsAny(src, " \n\"") {
		return fmt.Errorf("envd path %q has characters debugfs cannot take", src)
	}
	cmds := path + ".debugfs"
	if err := os.WriteFile(cmds, []byte(script), 0o600); err != nil {
		return fmt.Errorf("write debugfs script: %w", err)
	}
	defer os.Remove(cmds)
	if err := run(ctx, newToolOutput(p, "debugfs"), tools["debugfs"], "-w", "-f", cmds, path); err != nil {
		return err
	}
	// debugfs exits 0 even when a command fails: check what landed.
	got, err := fileSHA256InImage(ctx, p, tools, path, "/usr/bin/envd")
	if err != nil {
		return err
	}
	if got != wantSHA {
		return fmt.Errorf("envd in image %s has sha256 %s after the swap, want %s", path, got, wantSHA)
	}
	return nil
}

// fileSHA256InImage hashes a file inside the image, read with debugfs.
func fileSHA256InImage(ctx context.Context, p *progress, tools map[string]string, path, file string) (string, error) {
	h := sha256.New()
	out := newToolOutput(p, "debugfs")
	out.quiet = true
	if err := runCapture(ctx, out, h, tools["debugfs"], "-R", "cat "+file, path); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// fileSHA256 hashes a host file.
// FileSHA256 is the hex SHA-256 of a file (envd binaries, images).
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
