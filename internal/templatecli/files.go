package templatecli

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ReadDockerignore returns the patterns of dir/.dockerignore, as the SDK
// reads them: trimmed lines, without empty lines and "#" comments. The SDK
// hands them to node-glob as ignore patterns, so "!" exceptions are plain
// names and a directory's contents are skipped only with "dir/**".
func ReadDockerignore(dir string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(dir, ".dockerignore"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") {
			out = append(out, line)
		}
	}
	return out, nil
}

// checkSource refuses a COPY source that is absolute or leaves the context
// directory (the SDK's validateRelativePath).
func checkSource(src string) error {
	if filepath.IsAbs(src) {
		return fmt.Errorf("source %q: absolute paths are not allowed; use a path relative to the context directory", src)
	}
	if c := filepath.Clean(src); c == ".." || strings.HasPrefix(c, "../") {
		return fmt.Errorf("source %q leaves the context directory", src)
	}
	return nil
}

// FilesHash is the cache key of a COPY of src to dest from the context
// directory dir, computed exactly as the e2b SDK's calculateFilesHash does
// (so the server's file cache is shared with SDK builds): SHA-256 over
// "COPY <src> <dest>", then for each selected entry in order its relative
// path, st_mode and size in decimal, and its content (regular files) or link
// target (symlinks, not followed).
func FilesHash(dir, src, dest string, ignore []string) (string, error) {
	if err := checkSource(src); err != nil {
		return "", err
	}
	files, err := selectFiles(dir, src, ignore)
	if err != nil {
		return "", fmt.Errorf("COPY %s: no files found in %s", src, filepath.Join(dir, src))
	}
	h := sha256.New()
	io.WriteString(h, "COPY "+src+" "+dest)
	for _, f := range files {
		io.WriteString(h, f.rel)
		full := filepath.Join(dir, filepath.FromSlash(f.rel))
		info := f.info
		if info.Mode()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(full)
			if err != nil {
				return "", err
			}
			hashStat(h, info)
			io.WriteString(h, target)
			continue
		}
		// A path below a followed symlinked directory: stat, like the SDK.
		if info, err = os.Stat(full); err != nil {
			return "", err
		}
		hashStat(h, info)
		if info.Mode().IsRegular() {
			if err := hashFile(h, full); err != nil {
				return "", err
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashStat adds Node's stats.mode (the raw st_mode) and stats.size.
func hashStat(w io.Writer, info fs.FileInfo) {
	mode := uint64(info.Mode().Perm())
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		mode = uint64(st.Mode)
	}
	io.WriteString(w, strconv.FormatUint(mode, 10))
	io.WriteString(w, strconv.FormatInt(info.Size(), 10))
}

func hashFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// WriteTarGz writes the upload archive of a COPY of src: a gzip tar of the
// same entries FilesHash covers, in the same order, named relative to dir
// ("./" for dir itself, "name/" for directories), symlinks kept as links.
// It is what the SDK uploads (node-tar with noDirRecurse).
func WriteTarGz(w io.Writer, dir, src string, ignore []string) error {
	if err := checkSource(src); err != nil {
		return err
	}
	files, err := selectFiles(dir, src, ignore)
	if err != nil {
		return fmt.Errorf("COPY %s: no files found in %s", src, filepath.Join(dir, src))
	}
	zw := gzip.NewWriter(w)
	tw := tar.NewWriter(zw)
	for _, f := range files {
		if err := addToTar(tw, dir, f.rel); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

func addToTar(tw *tar.Writer, dir, rel string) error {
	full := filepath.Join(dir, filepath.FromSlash(rel))
	info, err := os.Lstat(full)
	if err != nil {
		return err
	}
	link := ""
	if info.Mode()&fs.ModeSymlink != 0 {
		if link, err = os.Readlink(full); err != nil {
			return err
		}
	}
	if !info.Mode().IsRegular() && !info.IsDir() && link == "" {
		return nil // sockets, devices, pipes: nothing to copy
	}
	hdr, err := tar.FileInfoHeader(info, link)
	if err != nil {
		return fmt.Errorf("%s: %w", full, err)
	}
	name := rel
	if name == "" {
		name = "."
	}
	if info.IsDir() {
		name += "/"
	}
	hdr.Name = name
	hdr.ModTime = hdr.ModTime.Truncate(1e9)
	hdr.Uname, hdr.Gname = "", ""
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if !info.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(full)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(tw, bufio.NewReader(f)); err != nil {
		return fmt.Errorf("%s: %w", full, err)
	}
	return nil
}
