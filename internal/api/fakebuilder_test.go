package api_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/template"
)

// fakeBuilder is a template.Builder that runs no VM: it records each
// request, logs a line per step (and filler lines, so logs span pages), reads
// COPY steps' uploads, and writes a loadable artifact under the data dir, or
// fails with its BuildError. The real builder has its own tests; these are
// about the control plane around it.
type fakeBuilder struct {
	dataDir string
	// fillerLines are extra debug lines logged in step "1".
	fillerLines int

	mu   sync.Mutex
	reqs []template.BuildRequest
	// copied holds, per COPY step's hash, the file names in its archive.
	copied map[string][]string
	// fail, when set, ends every build with it.
	fail *template.BuildError
	// gate, when set, holds every build (status building) until closed.
	gate chan struct{}
	// started receives the build ID when a build begins.
	started chan string
}

func (b *fakeBuilder) Build(ctx context.Context, req template.BuildRequest) (*template.Artifact, error) {
	b.mu.Lock()
	b.reqs = append(b.reqs, req)
	fail, gate, started := b.fail, b.gate, b.started
	b.mu.Unlock()
	if started != nil {
		started <- req.BuildID
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	req.Log(template.LogEntry{Level: "info", Message: "starting from the source", Step: "base"})
	for i, s := range req.Steps {
		step := strconv.Itoa(i + 1)
		req.Log(template.LogEntry{Level: "info", Message: fmt.Sprintf("%s %q", s.Type, s.Args), Step: step})
		if i == 0 {
			for n := range b.fillerLines {
				req.Log(template.LogEntry{Level: "debug", Message: fmt.Sprintf("output line %d", n), Step: step})
			}
		}
		if s.Type == "COPY" {
			path, err := req.Files(s.FilesHash)
			if err != nil {
				return nil, &template.BuildError{Step: step, Message: err.Error()}
			}
			names, err := tarNames(path)
			if err != nil {
				return nil, &template.BuildError{Step: step, Message: err.Error()}
			}
			b.mu.Lock()
			b.copied[s.FilesHash] = names
			b.mu.Unlock()
		}
		if fail != nil && fail.Step == step {
			req.Log(template.LogEntry{Level: "error", Message: "command failed", Step: step})
			return nil, fail
		}
	}
	if fail != nil {
		return nil, fail
	}
	req.Log(template.LogEntry{Level: "info", Message: "snapshot taken", Step: "finalize"})
	// As a builder does: no collection of template storage runs while the
	// artifact appears.
	unlock, err := template.LockCache(ctx, b.dataDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return writeFakeArtifact(template.ArtifactDir(b.dataDir, req.TemplateID, req.BuildID), req.BuildID, req.CPUs, req.MemoryMiB)
}

func (b *fakeBuilder) requests() []template.BuildRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]template.BuildRequest(nil), b.reqs...)
}

func (b *fakeBuilder) set(fn func(b *fakeBuilder)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	fn(b)
}

// writeFakeArtifact writes what template.LoadArtifact needs, and a 3 MiB
// sparse root disk.
func writeFakeArtifact(dir, buildID string, cpus, memMiB int) (*template.Artifact, error) {
	a := &template.Artifact{
		BuildID: buildID, Dir: dir, Kernel: filepath.Join(dir, "kernel"), Initramfs: filepath.Join(dir, "initramfs.cpio"),
		RootDisk: filepath.Join(dir, "rootfs.ext4"), Snapshot: filepath.Join(dir, "snapshot"),
		CPUs: cpus, MemoryMiB: memMiB, BuiltAt: time.Now(),
	}
	if err := os.MkdirAll(a.Snapshot, 0o700); err != nil {
		return nil, err
	}
	meta, _ := json.Marshal(a)
	files := map[string][]byte{
		"artifact.json":          meta,
		"init-secret":            []byte("secret\n"),
		"snapshot/manifest.json": []byte("{}"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return nil, err
		}
	}
	f, err := os.Create(a.RootDisk)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return a, f.Truncate(3 << 20)
}

// tarNames lists the entries of a tar.gz.
func tarNames(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil, err
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names, nil
		}
		if err != nil {
			return nil, err
		}
		names = append(names, h.Name)
	}
}

// tarGz makes a tar.gz of files (name → content) as the SDK uploads it.
func tarGz(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, content := range files {
		must(t, tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content))}))
		_, err := tw.Write([]byte(content))
		must(t, err)
	}
	must(t, tw.Close())
	must(t, zw.Close())
	return buf.Bytes()
}

// fakeImages is a control.ImageResolver that pulls nothing.
type fakeImages struct {
	mu    sync.Mutex
	refs  []string
	creds []*control.RegistryCredentials
}

func (f *fakeImages) RootImage(ctx context.Context, ref string, creds *control.RegistryCredentials) (string, control.ImageMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refs = append(f.refs, ref)
	f.creds = append(f.creds, creds)
	if ref == "missing:latest" {
		return "", control.ImageMeta{}, fmt.Errorf("manifest unknown")
	}
	return "/images/" + ref + "/rootfs.ext4", control.ImageMeta{
		Env: map[string]string{"PATH": "/usr/local/bin:/usr/bin"}, Workdir: "/app", User: "node",
	}, nil
}
