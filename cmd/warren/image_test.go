package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warren-sh/warren/internal/oci"
	"github.com/warren-sh/warren/internal/oci/ocitest"
)

// TestImageCommand runs the built binary: import an OCI archive and a docker
// save tarball, list them, remove one.
func TestImageCommand(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, as warren does")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "warren")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	img := ocitest.BusyboxImage(t)
	ociFile, dockerFile := filepath.Join(dir, "oci.tar"), filepath.Join(dir, "docker.tar")
	ocitest.WriteOCIArchive(t, ociFile, ocitest.Index(t, img), "")
	ocitest.WriteDockerArchive(t, dockerFile, "busybox:saved", img)
	dataDir := filepath.Join(dir, "data")

	run := func(wantOK bool, args ...string) (stdout, stderr string) {
		t.Helper()
		var o, e bytes.Buffer
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "WARREN_DATA_DIR="+dataDir)
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		if (err == nil) != wantOK {
			t.Fatalf("warren %s: %v (want success %v)\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, wantOK, o.String(), e.String())
		}
		return o.String(), e.String()
	}

	out, progress := run(true, "image", "import", "python:3.12-slim", ociFile)
	if !strings.HasPrefix(out, "imported python:3.12-slim (sha256:") || !strings.Contains(out, "2 layers") {
		t.Errorf("import printed %q", out)
	}
	if !strings.Contains(progress, `msg="image import: layer" layer=1/2`) || !strings.Contains(progress, "layer=2/2") {
		t.Errorf("import progress has no per-layer lines:\n%s", progress)
	}
	// --data-dir wins over WARREN_DATA_DIR; here both name the same place.
	run(true, "image", "import", "--data-dir", dataDir, "ghcr.io/team/tool", dockerFile)

	out, _ = run(true, "image", "ls")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") ||
		!strings.HasPrefix(lines[1], "ghcr.io/team/tool:latest ") || !strings.HasPrefix(lines[2], "python:3.12-slim ") {
		t.Errorf("ls printed:\n%s", out)
	}
	out, _ = run(true, "image", "ls", "--json")
	var infos []oci.Info
	if err := json.Unmarshal([]byte(out), &infos); err != nil || len(infos) != 2 || infos[1].Name != "index.docker.io/library/python:3.12-slim" {
		t.Errorf("ls --json = %s (%v)", out, err)
	}

	if out, _ = run(true, "image", "rm", "python:3.12-slim"); out != "removed python:3.12-slim\n" {
		t.Errorf("rm printed %q", out)
	}
	if out, _ = run(true, "image", "ls"); strings.Contains(out, "python") || !strings.Contains(out, "ghcr.io/team/tool") {
		t.Errorf("ls after rm:\n%s", out)
	}
	if _, errOut := run(false, "image", "rm", "python:3.12-slim"); !strings.Contains(errOut, "python:3.12-slim is not in warren's image store") {
		t.Errorf("rm of a missing image said %q", errOut)
	}
	if _, errOut := run(false, "image", "import", "x:v1", filepath.Join(dir, "missing.tar")); !strings.Contains(errOut, "missing.tar") {
		t.Errorf("import of a missing file said %q", errOut)
	}
	if _, errOut := run(true, "image", "--help"); !strings.Contains(errOut, "docker save") || !strings.Contains(errOut, "fromImage") {
		t.Errorf("image --help does not explain the formats and fromImage:\n%s", errOut)
	}
	if _, errOut := run(false, "image", "frobnicate"); !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown subcommand said %q", errOut)
	}
}
