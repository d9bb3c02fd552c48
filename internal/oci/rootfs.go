package oci

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/warren-sh/warren/internal/image"
)

// RootFS is a root filesystem image built from a stored image.
type RootFS struct {
	// Path is the ext4 image (label image.Label); it never changes in place.
	Path string `json:"-"`
	// Image is the stored image it was built from, with the image config's
	// Env, WorkingDir and User for the template's defaults.
	Image Info `json:"image"`
	// EnvdSHA256 is the hex SHA-256 of the envd installed as /usr/bin/envd.
	EnvdSHA256 string `json:"envdSha256"`
	// Recipe is the provisioning recipe version.
	Recipe int `json:"recipe"`
	// Provisioned says what provisioning did (user ids, shell, warnings).
	Provisioned Provisioned `json:"provisioned"`
	// FreeBytes is the free space the file system was given.
	FreeBytes int64 `json:"freeBytes"`
	// SizeBytes is the image file's apparent size (it is sparse).
	SizeBytes int64 `json:"sizeBytes"`
	// BuiltAt and BuildSeconds say when and how fast it was built.
	BuiltAt      time.Time `json:"builtAt"`
	BuildSeconds float64   `json:"buildSeconds"`
}

// RootImage returns the ext4 root image a template build VM boots for
// `fromImage: ref`: the stored image of that name, or else the image pulled
// from its registry with creds (and kept in the store), flattened, provisioned
// with E2B's conventions and envd (the static envd binary at path envd), and
// packed with image.DefaultFreeBytes free. A root image already built for the
// same image digest, envd and recipe is returned at once; concurrent callers
// for the same one wait for each other. Building needs root (the tree keeps
// the image's owners and device nodes) and e2fsprogs.
func (s *Store) RootImage(ctx context.Context, ref, envd string, creds *Credentials) (*RootFS, error) {
	r, err := ParseReference(ref)
	if err != nil {
		return nil, err
	}
	info, err := s.get(r)
	var nf *NotFoundError
	if errors.As(err, &nf) {
		info, err = s.pull(ctx, r, creds)
	}
	if err != nil {
		return nil, err
	}
	envdSHA, err := image.FileSHA256(envd)
	if err != nil {
		return nil, fmt.Errorf("root image for %s: envd: %w", FamiliarName(r), err)
	}
	free := int64(image.DefaultFreeBytes)
	key := sha256.Sum256(fmt.Appendf(nil, "%s\n%s\n%d\n%d", info.Digest, envdSHA, provisionRecipe, free))
	dir := filepath.Join(s.Dir, rootfsDir, hex.EncodeToString(key[:12]))
	unlock, err := s.lock(ctx, dir+".lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if fs, err := readRootFS(dir); err == nil {
		return fs, nil
	}
	if err := s.removeDir(dir); err != nil { // a torn leftover
		return nil, err
	}
	fs, err := s.buildRootFS(ctx, info, envd, dir, RootFS{
		Image: info, EnvdSHA256: envdSHA, Recipe: provisionRecipe, FreeBytes: free,
	})
	if err != nil {
		return nil, fmt.Errorf("root image for %s: %w", FamiliarName(r), err)
	}
	return fs, nil
}

// buildRootFS flattens, provisions and packs the image into dir.
func (s *Store) buildRootFS(ctx context.Context, info Info, envd, dir string, fs RootFS) (*RootFS, error) {
	start := time.Now()
	log := s.log()
	s.reclaimWork()
	work, err := s.workDir("rootfs-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	ref, err := name.ParseReference(info.Name)
	if err != nil {
		return nil, err
	}
	img, err := s.openImage(ref, info.Digest)
	if err != nil {
		return nil, err
	}
	tree := filepath.Join(work, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return nil, err
	}
	root, err := openRoot(tree)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	log.Info("image rootfs: unpacking layers", "name", FamiliarName(ref), "digest", info.Digest, "layers", info.Layers)
	flat := mutate.Extract(img)
	st, err := unpack(ctx, root, tar.NewReader(flat), log)
	flat.Close()
	if err != nil {
		return nil, err
	}
	log.Info("image rootfs: provisioning", "entries", st.Entries, "bytes", st.Bytes, "skipped", st.Skipped,
		"elapsed", time.Since(start).Round(100*time.Millisecond))
	if fs.Provisioned, err = provision(root, envd); err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	for _, w := range fs.Provisioned.Warnings {
		log.Warn("image rootfs: " + w)
	}
	out := filepath.Join(work, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, err
	}
	if fs.SizeBytes, err = image.PackTree(ctx, tree, filepath.Join(out, rootfsName), fs.FreeBytes, log); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(tree); err != nil {
		return nil, fmt.Errorf("remove tree: %w", err)
	}
	fs.BuiltAt = time.Now().UTC()
	fs.BuildSeconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	if err := writeJSON(filepath.Join(out, rootfsMeta), fs); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	if err := os.Rename(out, dir); err != nil {
		return nil, fmt.Errorf("store root image: %w", err)
	}
	fs.Path = filepath.Join(dir, rootfsName)
	log.Info("image rootfs: done", "path", fs.Path, "size", fs.SizeBytes, "elapsed", time.Since(start).Round(100*time.Millisecond))
	return &fs, nil
}

// openImage opens the stored image called ref and checks it is still digest.
func (s *Store) openImage(ref name.Reference, digest string) (v1.Image, error) {
	p, err := layout.FromPath(s.imageDir(ref))
	if err != nil {
		return nil, fmt.Errorf("open stored image %s: %w", FamiliarName(ref), err)
	}
	h, err := v1.NewHash(digest)
	if err != nil {
		return nil, err
	}
	img, err := p.Image(h)
	if err != nil {
		return nil, fmt.Errorf("open stored image %s (was it replaced or removed meanwhile?): %w", FamiliarName(ref), err)
	}
	return img, nil
}

func readRootFS(dir string) (*RootFS, error) {
	b, err := os.ReadFile(filepath.Join(dir, rootfsMeta))
	if err != nil {
		return nil, err
	}
	var fs RootFS
	if err := json.Unmarshal(b, &fs); err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, rootfsMeta), err)
	}
	fs.Path = filepath.Join(dir, rootfsName)
	if _, err := os.Stat(fs.Path); err != nil {
		return nil, err
	}
	return &fs, nil
}
