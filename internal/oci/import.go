package oci

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Import adds the image in file under the name ref (a tag; `python` means
// python:latest), replacing an image of that name. file is an OCI image
// layout archive or a `docker save` tarball, either maybe gzip-compressed;
// when it holds several images, the linux one for this host's architecture
// is taken, and among several of those the one the archive names ref.
func (s *Store) Import(ctx context.Context, ref, file string) (Info, error) {
	r, err := ParseReference(ref)
	if err != nil {
		return Info{}, err
	}
	if _, ok := r.(name.Digest); ok {
		return Info{}, fmt.Errorf("import as %s: name the image with a tag (like app:v1), not a digest", ref)
	}
	start := time.Now()
	s.reclaimWork()
	work, err := s.workDir("import-")
	if err != nil {
		return Info{}, err
	}
	defer os.RemoveAll(work) // renamed away on success
	kind, err := archiveKind(file)
	if err != nil {
		return Info{}, err
	}
	s.log().Info("image import: reading archive", "name", FamiliarName(r), "file", file, "format", kind)
	var img v1.Image
	switch kind {
	case kindOCI:
		img, err = s.importLayout(ctx, r, file, work)
	case kindDocker:
		img, err = s.importDocker(ctx, r, file, work)
	}
	if err != nil {
		return Info{}, fmt.Errorf("import %s: %w", file, err)
	}
	info, err := imageInfo(r, img, "import "+file)
	if err != nil {
		return Info{}, fmt.Errorf("import %s: %w", file, err)
	}
	if err := s.commit(ctx, r, work, info); err != nil {
		return Info{}, err
	}
	s.log().Info("image import: done", "name", FamiliarName(r), "digest", info.Digest, "layers", info.Layers,
		"bytes", info.Size, "elapsed", time.Since(start).Round(100*time.Millisecond))
	return info, nil
}

const (
	kindOCI    = "oci-layout"
	kindDocker = "docker-save"
)

// archiveKind tells an OCI layout archive (it has oci-layout; `docker save`
// of Docker 25 and later writes one too) from a classic `docker save`
// tarball (manifest.json only).
func archiveKind(file string) (string, error) {
	rc, err := openArchive(file)
	if err != nil {
		return "", err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	docker := false
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", fmt.Errorf("%s is not a tar archive of an image (an OCI image layout or `docker save` output): %w", file, err)
		}
		switch path.Clean(hdr.Name) {
		case "oci-layout":
			return kindOCI, nil
		case "manifest.json":
			docker = true
		}
	}
	if docker {
		return kindDocker, nil
	}
	return "", fmt.Errorf("%s has neither oci-layout nor manifest.json: not an OCI image layout archive or `docker save` tarball", file)
}

// openArchive opens file, decompressing it if it is gzip.
func openArchive(file string) (io.ReadCloser, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	br := bufio.NewReader(f)
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		return readCloser{zr, f}, nil
	}
	return readCloser{br, f}, nil
}

type readCloser struct {
	io.Reader
	io.Closer
}

// importLayout unpacks an OCI layout archive into work, picks the image,
// and trims the layout to it: index.json naming that one manifest, and only
// its blobs, each checked against its digest.
func (s *Store) importLayout(ctx context.Context, ref name.Reference, file, work string) (v1.Image, error) {
	if err := unpackLayout(ctx, file, work); err != nil {
		return nil, err
	}
	idx, err := layout.ImageIndexFromPath(work)
	if err != nil {
		return nil, fmt.Errorf("read OCI layout: %w", err)
	}
	img, desc, err := chooseImage(idx, ref)
	if err != nil {
		return nil, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("read image manifest: %w", err)
	}
	keep := map[v1.Hash]int64{desc.Digest: desc.Size, m.Config.Digest: m.Config.Size}
	for _, l := range m.Layers {
		keep[l.Digest] = l.Size
	}
	for i, l := range m.Layers {
		s.log().Info("image import: layer", "layer", fmt.Sprintf("%d/%d", i+1, len(m.Layers)), "digest", short(l.Digest), "bytes", l.Size)
		if err := verifyBlob(ctx, work, l.Digest, l.Size); err != nil {
			return nil, err
		}
	}
	if err := verifyBlob(ctx, work, desc.Digest, desc.Size); err != nil {
		return nil, err
	}
	if err := verifyBlob(ctx, work, m.Config.Digest, m.Config.Size); err != nil {
		return nil, err
	}
	if err := pruneBlobs(work, keep); err != nil {
		return nil, err
	}
	desc.Annotations = map[string]string{"org.opencontainers.image.ref.name": ref.Name()}
	desc.Platform = &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if err := os.Remove(filepath.Join(work, "index.json")); err != nil {
		return nil, err
	}
	p, err := layout.Write(work, empty.Index)
	if err != nil {
		return nil, fmt.Errorf("write OCI layout: %w", err)
	}
	if err := p.AppendDescriptor(desc); err != nil {
		return nil, fmt.Errorf("write OCI layout: %w", err)
	}
	return p.Image(desc.Digest)
}

// unpackLayout writes the layout archive's files into dir: only plain files
// and directories with clean relative paths (an archive is untrusted input).
func unpackLayout(ctx context.Context, file, dir string) error {
	rc, err := openArchive(file)
	if err != nil {
		return err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		rel := path.Clean(hdr.Name)
		if rel == "." {
			continue
		}
		if !filepath.IsLocal(rel) {
			return fmt.Errorf("archive entry %q is outside the archive", hdr.Name)
		}
		if rel != "oci-layout" && rel != "index.json" && rel != "blobs" && !strings.HasPrefix(rel, "blobs/") {
			continue // docker save's manifest.json, repositories, ...
		}
		dst := filepath.Join(dir, rel)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case tar.TypeReg, tar.TypeRegA:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return fmt.Errorf("archive entry %s: %w", hdr.Name, err)
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("archive entry %s: %w", hdr.Name, err)
			}
		default:
			return fmt.Errorf("archive entry %s is a link or special file; an OCI layout has only files", hdr.Name)
		}
	}
}

// verifyBlob checks that a layout's blob has the size and digest it is named by.
func verifyBlob(ctx context.Context, dir string, h v1.Hash, size int64) error {
	if h.Algorithm != "sha256" {
		return fmt.Errorf("blob %s: only sha256 digests are supported", h)
	}
	f, err := os.Open(filepath.Join(dir, "blobs", h.Algorithm, h.Hex))
	if err != nil {
		return fmt.Errorf("blob %s missing from the archive: %w", short(h), err)
	}
	defer f.Close()
	d := sha256.New()
	n, err := io.Copy(d, ctxReader{ctx, f})
	if err != nil {
		return fmt.Errorf("read blob %s: %w", short(h), err)
	}
	if got := hex.EncodeToString(d.Sum(nil)); got != h.Hex || (size > 0 && n != size) {
		return fmt.Errorf("blob %s is corrupt: %d bytes with sha256 %s, want %d bytes", h, n, got, size)
	}
	return nil
}

// pruneBlobs deletes every blob of the layout in dir that keep does not name.
func pruneBlobs(dir string, keep map[v1.Hash]int64) error {
	blobs := filepath.Join(dir, "blobs")
	return filepath.WalkDir(blobs, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(blobs, p)
		alg, hexd, _ := strings.Cut(rel, "/")
		if _, ok := keep[v1.Hash{Algorithm: alg, Hex: hexd}]; ok {
			return nil
		}
		return os.Remove(p)
	})
}

// candidate is an image manifest found in an archive's index.
type candidate struct {
	desc  v1.Descriptor
	index v1.ImageIndex
	names []string // ref names the archive gives it
}

// chooseImage picks the image to keep from an index: the linux images for
// this host's architecture (by descriptor platform, else by config); among
// several, the one whose ref name annotation is ref.
func chooseImage(idx v1.ImageIndex, ref name.Reference) (v1.Image, v1.Descriptor, error) {
	var all []candidate
	var walk func(idx v1.ImageIndex, names []string) error
	walk = func(idx v1.ImageIndex, names []string) error {
		im, err := idx.IndexManifest()
		if err != nil {
			return fmt.Errorf("read image index: %w", err)
		}
		for _, d := range im.Manifests {
			n := append(names[:len(names):len(names)], refNames(d)...)
			switch {
			case d.MediaType.IsIndex():
				child, err := idx.ImageIndex(d.Digest)
				if err != nil {
					return fmt.Errorf("read image index %s: %w", short(d.Digest), err)
				}
				if err := walk(child, n); err != nil {
					return err
				}
			case d.MediaType.IsImage():
				all = append(all, candidate{d, idx, n})
			}
		}
		return nil
	}
	if err := walk(idx, nil); err != nil {
		return nil, v1.Descriptor{}, err
	}
	want := "linux/" + runtime.GOARCH
	var fit []candidate
	var seen []string
	for _, c := range all {
		plat := ""
		if c.desc.Platform != nil {
			plat = c.desc.Platform.OS + "/" + c.desc.Platform.Architecture
		} else if img, err := c.index.Image(c.desc.Digest); err == nil {
			if cf, err := img.ConfigFile(); err == nil {
				plat = cf.OS + "/" + cf.Architecture
			}
		}
		if plat == want || plat == "/" {
			fit = append(fit, c)
		} else {
			seen = append(seen, plat)
		}
	}
	if len(fit) > 1 {
		var named []candidate
		for _, c := range fit {
			for _, n := range c.names {
				if n == ref.Name() || n == ref.Identifier() || n == FamiliarName(ref) {
					named = append(named, c)
					break
				}
			}
		}
		if len(named) == 1 {
			fit = named
		}
	}
	switch len(fit) {
	case 0:
		if len(seen) == 0 {
			return nil, v1.Descriptor{}, errors.New("the archive holds no image")
		}
		return nil, v1.Descriptor{}, fmt.Errorf("the archive has no %s image (it has %s); warren's VMs run %s",
			want, strings.Join(seen, ", "), want)
	case 1:
		img, err := fit[0].index.Image(fit[0].desc.Digest)
		if err != nil {
			return nil, v1.Descriptor{}, fmt.Errorf("read image %s: %w", short(fit[0].desc.Digest), err)
		}
		return img, fit[0].desc, nil
	default:
		var names []string
		for _, c := range fit {
			names = append(names, strings.Join(append(c.names, short(c.desc.Digest)), " "))
		}
		return nil, v1.Descriptor{}, fmt.Errorf("the archive holds %d %s images and none is named %s: %s",
			len(fit), want, FamiliarName(ref), strings.Join(names, "; "))
	}
}

// refNames are the names an index entry's annotations give its image (OCI's
// ref.name is often only the tag; containerd and Docker write full names).
func refNames(d v1.Descriptor) []string {
	var out []string
	for _, k := range []string{"org.opencontainers.image.ref.name", "io.containerd.image.name"} {
		v := d.Annotations[k]
		if v == "" {
			continue
		}
		out = append(out, v)
		if r, err := name.ParseReference(v); err == nil {
			out = append(out, r.Name())
		}
	}
	return out
}

// importDocker reads a classic `docker save` tarball and writes the chosen
// image into work as an OCI layout.
func (s *Store) importDocker(ctx context.Context, ref name.Reference, file, work string) (v1.Image, error) {
	opener := func() (io.ReadCloser, error) { return openArchive(file) }
	m, err := tarball.LoadManifest(opener)
	if err != nil {
		return nil, fmt.Errorf("read docker save manifest: %w", err)
	}
	var tag *name.Tag
	if len(m) > 1 {
		// Pick by RepoTags; tarball.Image compares them as written.
		for _, d := range m {
			for _, t := range d.RepoTags {
				if r, err := name.NewTag(t); err == nil && r.Name() == ref.Name() {
					tag = &r
				}
			}
		}
		if tag == nil {
			var tags []string
			for _, d := range m {
				tags = append(tags, strings.Join(d.RepoTags, ","))
			}
			return nil, fmt.Errorf("the archive holds %d images and none is tagged %s: %s", len(m), FamiliarName(ref), strings.Join(tags, "; "))
		}
	}
	img, err := tarball.Image(opener, tag)
	if err != nil {
		return nil, fmt.Errorf("read docker save image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	if want := "linux/" + runtime.GOARCH; cf.OS+"/"+cf.Architecture != want && cf.OS+cf.Architecture != "" {
		return nil, fmt.Errorf("the image is %s/%s; warren's VMs run %s", cf.OS, cf.Architecture, want)
	}
	return s.writeLayout(ctx, ref, img, work, "import")
}

// writeLayout writes img as the only image of a new OCI layout in dir,
// logging each layer (what names the operation: import, pull), and returns
// the image read back from there.
func (s *Store) writeLayout(ctx context.Context, ref name.Reference, img v1.Image, dir, what string) (v1.Image, error) {
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return nil, fmt.Errorf("write OCI layout: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("read layers: %w", err)
	}
	for i, l := range layers {
		start := time.Now()
		n, d, err := writeLayer(ctx, dir, l)
		if err != nil {
			return nil, fmt.Errorf("layer %d/%d: %w", i+1, len(layers), err)
		}
		s.log().Info("image "+what+": layer", "layer", fmt.Sprintf("%d/%d", i+1, len(layers)), "digest", short(d),
			"bytes", n, "elapsed", time.Since(start).Round(100*time.Millisecond))
	}
	// The layers are in place (same digest and size), so AppendImage only
	// adds the config and manifest.
	annotations := map[string]string{"org.opencontainers.image.ref.name": ref.Name()}
	if err := p.AppendImage(img, layout.WithAnnotations(annotations),
		layout.WithPlatform(v1.Platform{OS: "linux", Architecture: runtime.GOARCH})); err != nil {
		return nil, fmt.Errorf("write OCI layout: %w", err)
	}
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	return p.Image(d)
}

// writeLayer copies a layer's stored (compressed) form into the layout's
// blobs, checking its digest on the way.
func writeLayer(ctx context.Context, dir string, l v1.Layer) (int64, v1.Hash, error) {
	want, err := l.Digest()
	if err != nil {
		return 0, want, err
	}
	rc, err := l.Compressed()
	if err != nil {
		return 0, want, err
	}
	defer rc.Close()
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return 0, want, err
	}
	f, err := os.CreateTemp(blobs, ".tmp-")
	if err != nil {
		return 0, want, err
	}
	defer os.Remove(f.Name())
	d := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, d), ctxReader{ctx, rc})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, want, err
	}
	got := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(d.Sum(nil))}
	if got != want {
		return n, want, fmt.Errorf("layer has digest %s, want %s", got, want)
	}
	return n, want, os.Rename(f.Name(), filepath.Join(blobs, got.Hex))
}

// imageInfo describes img, stored as ref.
func imageInfo(ref name.Reference, img v1.Image, source string) (Info, error) {
	d, err := img.Digest()
	if err != nil {
		return Info{}, err
	}
	m, err := img.Manifest()
	if err != nil {
		return Info{}, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return Info{}, fmt.Errorf("read image config: %w", err)
	}
	info := Info{
		Name:       ref.Name(),
		Digest:     d.String(),
		Platform:   "linux/" + runtime.GOARCH,
		Source:     source,
		Added:      time.Now().UTC().Truncate(time.Second),
		Size:       m.Config.Size,
		Layers:     len(m.Layers),
		Env:        cf.Config.Env,
		WorkingDir: cf.Config.WorkingDir,
		User:       cf.Config.User,
	}
	for _, l := range m.Layers {
		info.Size += l.Size
	}
	return info, nil
}

// short is a digest cut to 12 hex digits, for logs and messages.
func short(h v1.Hash) string {
	if len(h.Hex) > 12 {
		return h.Algorithm + ":" + h.Hex[:12]
	}
	return h.String()
}

// ctxReader stops a long copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
