package oci

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/image"
	"github.com/warren-sh/warren/internal/oci/ocitest"
)

// testCacheDir is the shared test cache holding the Debian base image.
const testCacheDir = "/var/tmp/warren-test-cache"

// debianBase returns the Debian base image (built into testCacheDir when it
// is not there: minutes) and an envd built from this checkout.
func debianBase(t *testing.T) (*image.Image, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs the Debian base image (minutes to build when not cached); run without -short")
	}
	envd := filepath.Join(t.TempDir(), "envd")
	cmd := exec.Command("go", "build", "-o", envd, "github.com/warren-sh/warren/cmd/envd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build envd: %v\n%s", err, out)
	}
	base, err := image.BuildDebianBase(context.Background(), image.DebianBaseOptions{
		DataDir: testCacheDir, Envd: envd, Log: slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatalf("base image: %v", err)
	}
	return base, envd
}

// TestDebianImage takes a real distribution image through the whole path: an
// OCI archive of the Debian base tree (ocitest.DebianArchive), imported and
// provisioned. The image already follows E2B's conventions, so provisioning
// must keep its user and sudo setup and warn about nothing.
func TestDebianImage(t *testing.T) {
	base, envd := debianBase(t)
	start := time.Now()
	file := ocitest.DebianArchive(t, base.Path, map[string]string{"/etc/warren-test-marker": "from the upper layer\n"})
	t.Logf("archive in %s", time.Since(start).Round(100*time.Millisecond))
	s := newStore(t)
	ctx := context.Background()
	if _, err := s.Import(ctx, "debian-test:v1", file); err != nil {
		t.Fatal(err)
	}
	fs, err := s.RootImage(ctx, "debian-test:v1", envd, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("archive, import and root image in %s", time.Since(start).Round(100*time.Millisecond))
	img := fs.Path
	if got := debugfs(t, img, "cat /etc/warren-test-marker"); got != "from the upper layer\n" {
		t.Errorf("marker = %q", got)
	}
	if p := fs.Provisioned; p.UID != 1000 || p.GID != 1000 || p.Shell != "/bin/bash" || len(p.Warnings) > 0 {
		t.Errorf("Provisioned = %+v, want the image's user 1000:1000 with bash, no warnings", p)
	}
	passwd := debugfs(t, img, "cat /etc/passwd")
	if strings.Count(passwd, "\nuser:") != 1 || !strings.Contains(passwd, "\nuser:x:1000:1000::/home/user:/bin/bash\n") {
		t.Errorf("/etc/passwd:\n%s", passwd)
	}
	if g := debugfs(t, img, "cat /etc/group"); !strings.Contains(g, "\nsudo:x:27:user\n") {
		t.Errorf("/etc/group sudo line changed:\n%s", g)
	}
	// Through tar, layout, flattening and mkfs, sudo stays setuid root.
	_, sudo := resolveIn(t, img, "/usr/bin/sudo")
	if sudo.Mode != 0o4755 || sudo.UID != 0 {
		t.Errorf("/usr/bin/sudo mode %o uid %d, want 4755 root", sudo.Mode, sudo.UID)
	}
	want, _ := image.FileSHA256(envd)
	if fs.EnvdSHA256 != want {
		t.Errorf("envd sha %s, want %s", fs.EnvdSHA256, want)
	}
	if h := stat(t, img, "/home/user/.bashrc"); h.UID != 1000 {
		t.Errorf("/home/user/.bashrc uid %d, want the image's 1000", h.UID)
	}
}

// resolveIn follows symlinks inside the image (/usr/bin may be reached via /bin).
func resolveIn(t *testing.T, img, p string) (string, inode) {
	t.Helper()
	for range 10 {
		s := stat(t, img, p)
		if s.Type != "symlink" {
			return p, s
		}
		if strings.HasPrefix(s.FastLink, "/") {
			p = s.FastLink
		} else {
			p = filepath.Join(filepath.Dir(p), s.FastLink)
		}
	}
	t.Fatalf("%s: too many symlinks", p)
	return "", inode{}
}
