// Command mkimage writes the OCI image archive that the compatibility tests
// import and build a template FROM (test/compat/templates/oci.test.mjs): the
// root tree of warren's Debian base image (a read-only loop mount of its
// ext4) as one layer, and a second layer with /etc/compat-image.txt. It
// needs root (mount). Usage:
//
//	go run ./test/compat/mkimage -base /var/tmp/warren-test-cache/templates/base/rootfs.ext4 -out image.tar
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func main() {
	base := flag.String("base", "/var/tmp/warren-test-cache/templates/base/rootfs.ext4", "the Debian base root image (ext4)")
	out := flag.String("out", "", "the OCI layout archive to write")
	marker := flag.String("marker", "from the imported image\n", "content of /etc/compat-image.txt")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "mkimage: -out is required")
		os.Exit(2)
	}
	if err := run(*base, *out, *marker); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(base, out, marker string) error {
	work, err := os.MkdirTemp(filepath.Dir(out), ".mkimage-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return err
	}
	if b, err := exec.Command("mount", "-o", "ro,loop,noload", base, mnt).CombinedOutput(); err != nil {
		return fmt.Errorf("mount %s: %v: %s", base, err, b)
	}
	rootTar := filepath.Join(work, "root.tar")
	tarErr := tarTree(mnt, rootTar)
	if b, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		return fmt.Errorf("umount %s: %v: %s", mnt, err, b)
	}
	if tarErr != nil {
		return tarErr
	}
	root, err := tarball.LayerFromFile(rootTar)
	if err != nil {
		return err
	}
	var extra bytes.Buffer
	tw := tar.NewWriter(&extra)
	tw.WriteHeader(&tar.Header{Name: "etc/compat-image.txt", Mode: 0o644, Size: int64(len(marker)), ModTime: time.Now()})
	tw.Write([]byte(marker))
	tw.Close()
	top, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(extra.Bytes())), nil })
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, root, top)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	dir := filepath.Join(work, "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "compat-image"}),
		layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if b, err := exec.Command("tar", "-C", dir, "-cf", tmp, ".").CombinedOutput(); err != nil {
		return fmt.Errorf("tar the layout: %v: %s", err, b)
	}
	return os.Rename(tmp, out)
}

// tarTree writes dir's tree as a layer with GNU tar: owners by number,
// xattrs kept, lost+found left out.
func tarTree(dir, file string) error {
	cmd := exec.Command("tar", "--numeric-owner", "--xattrs", "--exclude=./lost+found", "-C", dir, "-cf", file, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("tar %s: %v: %s", dir, err, b)
	}
	return nil
}
