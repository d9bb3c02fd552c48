// Package image builds the root filesystem images that sandboxes boot from.
//
// A root filesystem image is one ext4 file (label "warren-root"), built without
// loop mounts: the tree is assembled in a directory and turned into a file system
// with `mkfs.ext4 -d`. The microvm runtime attaches it read-only as the backing
// file of a per-sandbox qcow2 overlay; warren's init mounts it as /.
//
// The base image (BuildDebianBase) is Debian bookworm minbase plus what E2B's
// `base` users reach for (bash, python3 with pip and venv, nodejs, npm, git,
// curl, ss, pgrep, sudo, CA certificates), user `user` (1000:1000, /home/user,
// bash, passwordless sudo), envd at /usr/bin/envd, /etc/hostname "e2b.local"
// (for init to give the kernel; sudo looks it up in /etc/hosts) and a placeholder /etc/resolv.conf
// that the node fills in. The file system keeps no blocks reserved for root,
// has an inode per 8 KiB, and grows with resize2fs: offline after a truncate,
// or online in the guest once its overlay is larger than the image.
//
// Layout under the data directory:
//
//	<dataDir>/templates/base/
//	    rootfs.ext4     the image (sparse; its apparent size includes the free space)
//	    manifest.json   what went into it (Manifest): suite, packages, envd hash, size
//	    .lock           held while a build or check runs, so concurrent callers wait
//	    .build-*/       work directories of a build in progress (removed on failure
//	                    and reclaimed by the next build after a crash)
//
// rootfs.ext4 is never changed in place: a build (Force, or a new envd) renames
// a new file over it. A running QEMU keeps reading the old file, but a qcow2
// overlay that names the path would see the new content; a consumer that needs
// a stable backing file hard-links rootfs.ext4 (same file system, no copy) and
// names the link.
package image

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Label is the ext4 volume label of every root filesystem image warren builds.
const Label = "warren-root"

// Image is a built root filesystem image and the manifest that describes it.
type Image struct {
	// Path is the ext4 image file.
	Path string
	// Manifest says what went into the image.
	Manifest Manifest
}

// Manifest records what an image was built from, so later code (and a later
// build) knows what it has without opening the image. It is stored as JSON
// next to the image.
type Manifest struct {
	// Recipe is the version of the build code that made the image; a new recipe
	// rebuilds cached images.
	Recipe int `json:"recipe"`
	// Suite is the Debian release, e.g. "bookworm".
	Suite string `json:"suite"`
	// Mirror is the Debian mirror the packages came from.
	Mirror string `json:"mirror"`
	// Packages are the packages asked for on top of debootstrap's minbase
	// (their dependencies come too).
	Packages []string `json:"packages"`
	// FreeBytes is the free space the build was asked to leave in the file system.
	FreeBytes int64 `json:"freeBytes"`
	// EnvdSHA256 is the hex SHA-256 of /usr/bin/envd in the image.
	EnvdSHA256 string `json:"envdSha256"`
	// SizeBytes is the image file's apparent size (the file is sparse).
	SizeBytes int64 `json:"sizeBytes"`
	// BuiltAt is when the image (or its envd) was last written.
	BuiltAt time.Time `json:"builtAt"`
	// BuildSeconds is how long the last build of the image took.
	BuildSeconds float64 `json:"buildSeconds"`
}

// sameSystem reports whether two manifests describe the same operating system
// content, envd aside; the mirror is where packages came from, not what they are.
func (m Manifest) sameSystem(o Manifest) bool {
	if m.Recipe != o.Recipe || m.Suite != o.Suite || m.FreeBytes != o.FreeBytes ||
		len(m.Packages) != len(o.Packages) {
		return false
	}
	for i := range m.Packages {
		if m.Packages[i] != o.Packages[i] {
			return false
		}
	}
	return true
}

// ReadManifest reads the manifest.json in dir.
func ReadManifest(dir string) (Manifest, error) {
	var m Manifest
	p := filepath.Join(dir, manifestName)
	b, err := os.ReadFile(p)
	if err != nil {
		return m, fmt.Errorf("read manifest: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("parse manifest %s: %w", p, err)
	}
	return m, nil
}

// writeManifest writes dir/manifest.json atomically: a reader sees the old
// manifest or the new one, never a torn file.
func writeManifest(dir string, m Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, manifestName), append(b, '\n'), 0o644)
}

// writeFileAtomic writes data to a temporary file next to p, syncs it and
// renames it over p.
func writeFileAtomic(p string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

// cachedImage returns the image in dir if its file and manifest are present.
func cachedImage(dir string) (*Image, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	p := filepath.Join(dir, imageName)
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("manifest without image: %w", err)
		}
		return nil, fmt.Errorf("stat image: %w", err)
	}
	return &Image{Path: p, Manifest: m}, nil
}

const (
	imageName    = "rootfs.ext4"
	manifestName = "manifest.json"
	lockName     = ".lock"
	workPrefix   = ".build-"
)
