// Package oci turns OCI and Docker images into root filesystem images that
// warren's microVMs boot: the image source of a template build's `fromImage`.
//
// A Store keeps images by name. They come in two ways: `warren image import`
// (Store.Import) reads an OCI image layout archive (docker buildx --output
// type=oci, skopeo copy oci-archive:) or a `docker save` tarball; and a build
// whose image is not in the store pulls it from its registry (Store.RootImage,
// with the build's fromImageRegistry credentials), which keeps it in the
// store too. Either way only the linux image for this host's architecture is kept.
//
// Store.RootImage flattens an image's layers (whiteouts honoured) into a tree,
// applies E2B's template conventions without running anything from the image
// (provision: user `user` with passwordless sudo, envd at /usr/bin/envd, ...),
// and packs the tree into an ext4 image like internal/image's base image. The
// ext4 image is cached per (image digest, envd, provisioning recipe).
//
// Layout under Store.Dir (default <data-dir>/images):
//
//	images/<id>/        one image: an OCI image layout (oci-layout, index.json
//	                    with one manifest, blobs/) and info.json (Info);
//	                    <id> is derived from the full name
//	rootfs/<key>/       a built root image: rootfs.ext4 and rootfs.json (RootFS)
//	rootfs/<key>.lock   held while it is built, so concurrent builds wait
//	.tmp/               work directories (removed on failure; a crash's
//	                    leftovers go at the next import or build)
//	.lock               held while an image is added or removed
//
// Neither an image directory nor a rootfs.ext4 changes once in place: a new
// import of a name renames a new directory over the old one. A consumer that
// needs a rootfs.ext4 to outlive `warren image rm` hard-links it.
package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/warren-sh/warren/internal/fslock"
)

// Store is warren's local image store.
type Store struct {
	// Dir is the store's directory, e.g. <data-dir>/images.
	Dir string
	// Log receives progress (layers, bytes, build phases); nothing when nil.
	Log *slog.Logger
}

// Info describes an image in the store.
type Info struct {
	// Name is the full reference, e.g. index.docker.io/library/python:3.12-slim.
	Name string `json:"name"`
	// Digest is the image manifest's digest (sha256:...).
	Digest string `json:"digest"`
	// Platform is the image's os/architecture, e.g. linux/amd64.
	Platform string `json:"platform"`
	// Source says how it came: "import <file>" or "pull".
	Source string `json:"source"`
	// Added is when it was imported or pulled.
	Added time.Time `json:"added"`
	// Size is the bytes of its layers and config as stored (compressed).
	Size int64 `json:"size"`
	// Layers is the number of layers.
	Layers int `json:"layers"`
	// Env, WorkingDir and User are the image config's defaults (Docker's
	// ENV, WORKDIR and USER), for a template build to start from.
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"workingDir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// FamiliarName is the name as a person writes it (python:3.12-slim).
func (i Info) FamiliarName() string {
	ref, err := name.ParseReference(i.Name)
	if err != nil {
		return i.Name
	}
	return FamiliarName(ref)
}

// NotFoundError says an image is not in the store.
type NotFoundError struct{ Name string }

func (e *NotFoundError) Error() string {
	return fmt.Sprintf("image %s is not in warren's image store (see `warren image ls`)", e.Name)
}

const (
	imagesDir  = "images"
	rootfsDir  = "rootfs"
	tmpDir     = ".tmp"
	lockName   = ".lock"
	infoName   = "info.json"
	rootfsName = "rootfs.ext4"
	rootfsMeta = "rootfs.json"
)

func (s *Store) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return s.Log
}

// imageDir is where the image called ref lives.
func (s *Store) imageDir(ref name.Reference) string {
	h := sha256.Sum256([]byte(ref.Name()))
	return filepath.Join(s.Dir, imagesDir, hex.EncodeToString(h[:12]))
}

// List returns the images in the store, sorted by name.
func (s *Store) List() ([]Info, error) {
	dirs, err := os.ReadDir(filepath.Join(s.Dir, imagesDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []Info
	for _, d := range dirs {
		info, err := readInfo(filepath.Join(s.Dir, imagesDir, d.Name()))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // being removed
			}
			return nil, err
		}
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b Info) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Get returns the image called ref (a name such as python:3.12-slim, or a
// digest reference, which matches any stored image with that manifest digest).
func (s *Store) Get(ref string) (Info, error) {
	r, err := ParseReference(ref)
	if err != nil {
		return Info{}, err
	}
	return s.get(r)
}

func (s *Store) get(ref name.Reference) (Info, error) {
	if d, ok := ref.(name.Digest); ok {
		all, err := s.List()
		if err != nil {
			return Info{}, err
		}
		for _, i := range all {
			if i.Digest == d.DigestStr() {
				return i, nil
			}
		}
		return Info{}, &NotFoundError{FamiliarName(ref)}
	}
	info, err := readInfo(s.imageDir(ref))
	if errors.Is(err, os.ErrNotExist) {
		return Info{}, &NotFoundError{FamiliarName(ref)}
	}
	return info, err
}

// Remove deletes the image called ref from the store, and the root images
// built from it unless another name has the same digest.
func (s *Store) Remove(ref string) error {
	r, err := ParseReference(ref)
	if err != nil {
		return err
	}
	if _, ok := r.(name.Digest); ok {
		return fmt.Errorf("remove %s: name the image by its tag, not a digest", ref)
	}
	unlock, err := s.lock(context.Background(), filepath.Join(s.Dir, lockName))
	if err != nil {
		return err
	}
	defer unlock()
	dir := s.imageDir(r)
	if _, err := os.Stat(filepath.Join(dir, infoName)); errors.Is(err, os.ErrNotExist) {
		return &NotFoundError{FamiliarName(r)}
	}
	if err := s.removeDir(dir); err != nil {
		return fmt.Errorf("remove image %s: %w", FamiliarName(r), err)
	}
	return s.pruneRootfs()
}

// removeDir renames dir into .tmp, then deletes it: a reader never sees a
// half-deleted image.
func (s *Store) removeDir(dir string) error {
	tmp, err := s.workDir("rm-")
	if err != nil {
		return err
	}
	if err := os.Rename(dir, filepath.Join(tmp, "old")); err != nil && !errors.Is(err, os.ErrNotExist) {
		os.RemoveAll(tmp)
		return err
	}
	return os.RemoveAll(tmp)
}

// pruneRootfs deletes the root images whose image digest no stored image has.
// The caller holds the store lock.
func (s *Store) pruneRootfs() error {
	images, err := s.List()
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, i := range images {
		keep[i.Digest] = true
	}
	dirs, err := os.ReadDir(filepath.Join(s.Dir, rootfsDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("prune root images: %w", err)
	}
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		dir := filepath.Join(s.Dir, rootfsDir, d.Name())
		fs, err := readRootFS(dir)
		if err == nil && keep[fs.Image.Digest] {
			continue
		}
		// Its .lock file stays: another process may hold it.
		if err := s.removeDir(dir); err != nil {
			return fmt.Errorf("prune root image %s: %w", dir, err)
		}
	}
	return nil
}

// workDir makes a fresh work directory under .tmp.
func (s *Store) workDir(prefix string) (string, error) {
	dir := filepath.Join(s.Dir, tmpDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("image store: %w", err)
	}
	w, err := os.MkdirTemp(dir, prefix)
	if err != nil {
		return "", fmt.Errorf("image store: %w", err)
	}
	return w, nil
}

// reclaimWork removes work directories older than a day: what a crashed
// import or build left (a live one is never that old, and there is no way to
// tell a live one from another process apart cheaply).
func (s *Store) reclaimWork() {
	dirs, _ := os.ReadDir(filepath.Join(s.Dir, tmpDir))
	for _, d := range dirs {
		if fi, err := d.Info(); err == nil && time.Since(fi.ModTime()) > 24*time.Hour {
			os.RemoveAll(filepath.Join(s.Dir, tmpDir, d.Name()))
		}
	}
}

// commit moves the image layout built in work into place as ref, replacing
// any image of that name, and writes its info.
func (s *Store) commit(ctx context.Context, ref name.Reference, work string, info Info) error {
	if err := writeJSON(filepath.Join(work, infoName), info); err != nil {
		return err
	}
	unlock, err := s.lock(ctx, filepath.Join(s.Dir, lockName))
	if err != nil {
		return err
	}
	defer unlock()
	dir := s.imageDir(ref)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("image store: %w", err)
	}
	if err := s.removeDir(dir); err != nil {
		return fmt.Errorf("replace image %s: %w", FamiliarName(ref), err)
	}
	if err := os.Rename(work, dir); err != nil {
		return fmt.Errorf("store image %s: %w", FamiliarName(ref), err)
	}
	return s.pruneRootfs()
}

// lock takes an exclusive flock on path, waiting until ctx ends.
func (s *Store) lock(ctx context.Context, path string) (func(), error) {
	return fslock.Lock(ctx, path, func() { s.log().Info("image: waiting for another import or build", "lock", path) })
}

func readInfo(dir string) (Info, error) {
	var i Info
	b, err := os.ReadFile(filepath.Join(dir, infoName))
	if err != nil {
		return i, err
	}
	if err := json.Unmarshal(b, &i); err != nil {
		return i, fmt.Errorf("parse %s: %w", filepath.Join(dir, infoName), err)
	}
	return i, nil
}

// writeJSON writes v to p through a temporary file and a rename.
func writeJSON(p string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}
