// Package ocitest builds OCI images and image archives for tests: small ones
// from file lists (BusyboxImage, Layer), and a bootable one from the Debian
// base image (DebianArchive), for tests that import an image and boot it.
package ocitest

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Entry is one entry of a test layer.
type Entry struct {
	Path     string
	Type     byte // tar.TypeReg, TypeDir, TypeSymlink, TypeLink
	Mode     int64
	UID, GID int
	Content  string // a file's content
	Link     string // a symlink's or hard link's target
}

// Dir is a directory entry.
func Dir(p string, mode int64) Entry { return Entry{Path: p, Type: tar.TypeDir, Mode: mode} }

// File is a regular file entry.
func File(p, content string, mode int64) Entry {
	return Entry{Path: p, Type: tar.TypeReg, Mode: mode, Content: content}
}

// Symlink is a symbolic link entry.
func Symlink(p, target string) Entry {
	return Entry{Path: p, Type: tar.TypeSymlink, Mode: 0o777, Link: target}
}

// Hardlink is a hard link entry to target (a path in the image).
func Hardlink(p, target string) Entry {
	return Entry{Path: p, Type: tar.TypeLink, Mode: 0o644, Link: target}
}

// Whiteout deletes p from the layers below.
func Whiteout(p string) Entry {
	return File(path.Join(path.Dir(p), ".wh."+path.Base(p)), "", 0o644)
}

// Opaque hides everything the layers below have in dir.
func Opaque(dir string) Entry { return File(path.Join(dir, ".wh..wh..opq"), "", 0o644) }

// Layer is a gzip layer holding entries, in order.
func Layer(t testing.TB, entries ...Entry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, e := range entries {
		hdr := &tar.Header{
			Name: e.Path, Typeflag: e.Type, Mode: e.Mode, Uid: e.UID, Gid: e.GID,
			Linkname: e.Link, ModTime: mtime, Format: tar.FormatPAX,
		}
		if e.Type == tar.TypeReg {
			hdr.Size = int64(len(e.Content))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.Content); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Image is an OCI image of the layers (bottom first) for linux on this
// host's architecture, with cfg as its run config.
func Image(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	return imageFor(t, runtime.GOARCH, cfg, layers...)
}

func imageFor(t testing.TB, arch string, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", arch, cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// BusyboxConfig is the run config of BusyboxImage.
var BusyboxConfig = v1.Config{
	Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"},
	WorkingDir: "/app",
	User:       "appuser",
}

// BusyboxImage is a two-layer image with a real file tree: busybox (the
// host's static /bin/busybox, package busybox-static) as /bin/busybox with
// /bin/sh linking to it, account files in which uid and gid 1000 are taken
// by `appuser`, /etc/skel, a fake setuid /usr/bin/sudo, absolute symlinks
// (/etc/resolv.conf into /run, /home -> /var/home as on Fedora Atomic), and a second layer
// that deletes /etc/doomed.txt (whiteout), replaces /etc/olddir's content
// (opaque whiteout), adds /etc/motd and hard-links /bin/busybox-link to the
// lower layer's /bin/busybox.
func BusyboxImage(t testing.TB) v1.Image {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("read busybox (apt-get install busybox-static): %v", err)
	}
	base := Layer(t,
		Dir("bin", 0o755),
		File("bin/busybox", string(bb), 0o755),
		Symlink("bin/sh", "busybox"),
		Dir("etc", 0o755),
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nappuser:x:1000:1000::/home/app:/bin/sh\n"+
			"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
		File("etc/group", "root:x:0:\nappuser:x:1000:\nnogroup:x:65534:\n", 0o644),
		Entry{Path: "etc/shadow", Type: tar.TypeReg, Mode: 0o640, GID: 42,
			Content: "root:*:19000:0:99999:7:::\nappuser:!:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"},
		Entry{Path: "etc/gshadow", Type: tar.TypeReg, Mode: 0o640, GID: 42, Content: "root:*::\nappuser:!::\n"},
		Dir("etc/skel", 0o755),
		File("etc/skel/.profile", "# skel profile\n", 0o644),
		File("etc/doomed.txt", "deleted by the upper layer\n", 0o644),
		Dir("etc/olddir", 0o755),
		File("etc/olddir/old", "hidden by the opaque whiteout\n", 0o644),
		Symlink("etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf"),
		Dir("var", 0o755),
		Dir("var/home", 0o755),
		Symlink("home", "/var/home"),
		Dir("usr", 0o755),
		Dir("usr/bin", 0o755),
		File("usr/bin/sudo", "#!/bin/sh\necho fake sudo\n", 0o4755),
		Dir("app", 0o755),
		Entry{Path: "app/data", Type: tar.TypeReg, Mode: 0o600, UID: 1000, GID: 1000, Content: "app data\n"},
	)
	upper := Layer(t,
		Dir("etc", 0o755),
		Whiteout("etc/doomed.txt"),
		Dir("etc/olddir", 0o755),
		Opaque("etc/olddir"),
		File("etc/olddir/new", "from the upper layer\n", 0o644),
		File("etc/motd", "hello from layer 2\n", 0o644),
		Hardlink("bin/busybox-link", "bin/busybox"),
	)
	return Image(t, BusyboxConfig, base, upper)
}

// OtherArchImage is a one-layer image for arch (e.g. arm64), to mix into
// multi-platform indexes.
func OtherArchImage(t testing.TB, arch string) v1.Image {
	t.Helper()
	return imageFor(t, arch, v1.Config{}, Layer(t, File("arch", arch+"\n", 0o644)))
}

// Index is an OCI image index of the images, each described with the
// platform of its config, as `docker buildx --platform a,b` makes.
func Index(t testing.TB, imgs ...v1.Image) v1.ImageIndex {
	t.Helper()
	var adds []mutate.IndexAddendum
	for _, img := range imgs {
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: cf.OS, Architecture: cf.Architecture},
		}})
	}
	return mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)
}

// WriteOCIArchive writes an OCI image layout archive (a tar of the layout, as
// `docker buildx --output type=oci` writes) to file, whose index.json names
// idx under ref.name refName (none when empty).
func WriteOCIArchive(t testing.TB, file string, idx v1.ImageIndex, refName string) {
	t.Helper()
	dir := t.TempDir()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	var opts []layout.Option
	if refName != "" {
		opts = append(opts, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": refName}))
	}
	if err := p.AppendIndex(idx, opts...); err != nil {
		t.Fatal(err)
	}
	if err := tarDir(dir, file); err != nil {
		t.Fatal(err)
	}
}

// WriteDockerArchive writes img as `docker save TAG` would (classic format:
// manifest.json and layer tarballs) to file.
func WriteDockerArchive(t testing.TB, file, tag string, img v1.Image) {
	t.Helper()
	ref, err := name.NewTag(tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(file, ref, img); err != nil {
		t.Fatal(err)
	}
}

// tarDir writes the tree under dir (files and directories) as a tar to file.
func tarDir(dir, file string) error {
	out, err := os.Create(file)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(out)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// CacheDir keeps DebianArchive's root layer between runs (next to the base
// image the tests of internal/image and internal/template keep there).
const CacheDir = "/var/tmp/warren-test-cache/oci"

// DebianArchive returns an OCI image layout archive (in t.TempDir()) of a
// bootable Debian image: one layer with the root tree of the ext4 image
// rootfsExt4 (the Debian base image, e.g. image.BuildDebianBase's in the
// shared test cache), lost+found left out, plus an upper layer with extra
// (path → content, mode 0644, root-owned), all under ref.name "debian-test".
// It runs as root: the tree is read from a read-only loop mount of the image,
// unmounted before it returns.
//
// The root layer (about the base's size, uncompressed) is cached in CacheDir
// per base image file, so only the first call pays for reading the tree (tens
// of seconds); a later call copies it into the archive (seconds). Importing
// the archive and building its root image then takes about as long as
// packing the base image.
func DebianArchive(t testing.TB, rootfsExt4 string, extra map[string]string) string {
	t.Helper()
	rootLayer := debianRootLayer(t, rootfsExt4)
	l, err := uncompressedFileLayer(rootLayer)
	if err != nil {
		t.Fatal(err)
	}
	layers := []v1.Layer{l}
	if len(extra) > 0 {
		var entries []Entry
		for p, content := range extra {
			entries = append(entries, File(strings.TrimPrefix(p, "/"), content, 0o644))
		}
		layers = append(layers, Layer(t, entries...))
	}
	img := Image(t, v1.Config{
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
	}, layers...)
	file := filepath.Join(t.TempDir(), "debian-oci.tar")
	WriteOCIArchive(t, file, Index(t, img), "debian-test")
	return file
}

// debianRootLayer returns the cached tar of rootfsExt4's tree, making it
// first if needed.
func debianRootLayer(t testing.TB, rootfsExt4 string) string {
	t.Helper()
	fi, err := os.Stat(rootfsExt4)
	if err != nil {
		t.Fatalf("Debian base image: %v", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	// The base image is never changed in place (a rebuild renames a new
	// file over it), so its inode and mtime identify its content.
	key := sha256.Sum256(fmt.Appendf(nil, "%s %d %d %d", rootfsExt4, st.Ino, fi.Size(), fi.ModTime().UnixNano()))
	out := filepath.Join(CacheDir, "debian-root-"+hex.EncodeToString(key[:8])+".tar")
	if _, err := os.Stat(out); err == nil {
		return out
	}
	if err := os.MkdirAll(CacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	old, _ := filepath.Glob(filepath.Join(CacheDir, "debian-root-*.tar"))
	for _, o := range old {
		os.Remove(o) // layers of earlier base images
	}
	mnt, err := os.MkdirTemp("", "ocitest-mnt-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(mnt)
	if b, err := exec.Command("mount", "-o", "ro,loop,noload", rootfsExt4, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", rootfsExt4, err, b)
	}
	defer func() {
		if b, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, b)
		}
	}()
	tmp := out + fmt.Sprintf(".tmp-%d", os.Getpid())
	defer os.Remove(tmp)
	if err := tarTree(mnt, tmp); err != nil {
		t.Fatalf("tar the Debian tree: %v", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		t.Fatal(err)
	}
	return out
}

// tarTree writes the file system tree under dir to file as an image layer:
// owners, modes and times kept, hard links as links, lost+found left out.
func tarTree(dir, file string) error {
	out, err := os.Create(file)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(out)
	type inode struct{ dev, ino uint64 }
	seen := map[inode]string{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		if rel == "lost+found" {
			return filepath.SkipDir
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		hdr.Name, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = filepath.ToSlash(rel), int(st.Uid), int(st.Gid), "", ""
		hdr.Format = tar.FormatPAX
		if d.IsDir() {
			hdr.Name += "/"
		}
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			k := inode{uint64(st.Dev), st.Ino}
			if first, ok := seen[k]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				seen[k] = hdr.Name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// fileLayer is an uncompressed layer read from a tar file: no gzip pass over
// the Debian tree on every test run.
type fileLayer struct {
	path string
	hash v1.Hash
	size int64
}

func uncompressedFileLayer(p string) (*fileLayer, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, n, err := v1.SHA256(f)
	if err != nil {
		return nil, err
	}
	return &fileLayer{p, h, n}, nil
}

func (l *fileLayer) Digest() (v1.Hash, error)             { return l.hash, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)             { return l.hash, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)   { return os.Open(l.path) }
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) { return os.Open(l.path) }
func (l *fileLayer) Size() (int64, error)                 { return l.size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error)  { return types.OCIUncompressedLayer, nil }
