package oci

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/warren-sh/warren/internal/image"
	"github.com/warren-sh/warren/internal/oci/ocitest"
)

// The tests here need root (the tree keeps the image's owners) and
// e2fsprogs; they build small images and take seconds.

func newStore(t *testing.T) *Store {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: unpacking an image keeps its owners")
	}
	return &Store{Dir: t.TempDir(), Log: slog.New(slog.NewTextHandler(t.Output(), nil))}
}

// fakeEnvd is a stand-in for the envd binary: these tests check where it
// lands, not that it runs.
func fakeEnvd(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "envd")
	if err := os.WriteFile(p, []byte("envd "+t.Name()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// debugfs runs one debugfs request against the image and returns its stdout.
func debugfs(t *testing.T, img, request string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("debugfs", "-R", request, img)
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/sbin:/usr/bin:/bin")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, stderr.String())
	}
	if strings.Contains(stderr.String(), "File not found") {
		t.Fatalf("debugfs -R %q: %s", request, strings.TrimSpace(stderr.String()))
	}
	return stdout.String()
}

// exists reports whether path is in the image.
func exists(t *testing.T, img, path string) bool {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "stat "+path, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs stat %s: %v\n%s", path, err, out)
	}
	return !strings.Contains(string(out), "File not found")
}

// inode is what a test needs from `debugfs stat`.
type inode struct {
	Type      string
	Mode      uint32
	UID, GID  int
	Links     int
	Inode     int
	FastLink  string
	SizeBytes int64
}

var (
	statTypeRE  = regexp.MustCompile(`Inode: (\d+)\s+Type: (\S+)\s+Mode:\s+([0-7]+)`)
	statUserRE  = regexp.MustCompile(`User:\s+(\d+)\s+Group:\s+(\d+).*Size: (\d+)`)
	statLinksRE = regexp.MustCompile(`Links: (\d+)`)
	statFastRE  = regexp.MustCompile(`Fast link dest: "([^"]*)"`)
)

func stat(t *testing.T, img, path string) inode {
	t.Helper()
	out := debugfs(t, img, "stat "+path)
	ty, us, ln := statTypeRE.FindStringSubmatch(out), statUserRE.FindStringSubmatch(out), statLinksRE.FindStringSubmatch(out)
	if ty == nil || us == nil || ln == nil {
		t.Fatalf("debugfs stat %s: unexpected output:\n%s", path, out)
	}
	var s inode
	s.Inode, _ = strconv.Atoi(ty[1])
	s.Type = ty[2]
	mode, _ := strconv.ParseUint(ty[3], 8, 32)
	s.Mode = uint32(mode)
	s.UID, _ = strconv.Atoi(us[1])
	s.GID, _ = strconv.Atoi(us[2])
	s.SizeBytes, _ = strconv.ParseInt(us[3], 10, 64)
	s.Links, _ = strconv.Atoi(ln[1])
	if m := statFastRE.FindStringSubmatch(out); m != nil {
		s.FastLink = m[1]
	}
	return s
}

// archive writes the busybox test image to a file in the given format.
func archive(t *testing.T, format string) string {
	t.Helper()
	dir := t.TempDir()
	img := ocitest.BusyboxImage(t)
	switch format {
	case "oci":
		// Two platforms, as `docker buildx --platform linux/arm64,linux/amd64
		// --output type=oci` makes; the import must take the amd64 one.
		file := filepath.Join(dir, "oci.tar")
		ocitest.WriteOCIArchive(t, file, ocitest.Index(t, ocitest.OtherArchImage(t, "arm64"), img), "v1")
		return file
	case "docker":
		file := filepath.Join(dir, "docker.tar")
		ocitest.WriteDockerArchive(t, file, "example.com/team/busybox:v1", img)
		return file
	case "docker-gzip":
		plain := filepath.Join(dir, "docker.tar")
		ocitest.WriteDockerArchive(t, plain, "example.com/team/busybox:v1", img)
		return gzipFile(t, plain)
	}
	t.Fatalf("unknown format %q", format)
	return ""
}

func gzipFile(t *testing.T, p string) string {
	t.Helper()
	in, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(in)
	zw.Close()
	out := p + ".gz"
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestImportFormats(t *testing.T) {
	want, err := ocitest.BusyboxImage(t).Digest()
	if err != nil {
		t.Fatal(err)
	}
	for _, format := range []string{"oci", "docker", "docker-gzip"} {
		t.Run(format, func(t *testing.T) {
			s := newStore(t)
			info, err := s.Import(context.Background(), "busybox-test:v1", archive(t, format))
			if err != nil {
				t.Fatal(err)
			}
			if info.Name != "index.docker.io/library/busybox-test:v1" || info.FamiliarName() != "busybox-test:v1" {
				t.Errorf("name %q (familiar %q), want index.docker.io/library/busybox-test:v1 (busybox-test:v1)", info.Name, info.FamiliarName())
			}
			// A docker save tarball's layers are recompressed on import, so
			// only the OCI archive keeps the digest.
			if format == "oci" && info.Digest != want.String() {
				t.Errorf("digest %s, want the amd64 image's %s", info.Digest, want)
			}
			if info.Layers != 2 || info.WorkingDir != "/app" || info.User != "appuser" ||
				!strings.Contains(strings.Join(info.Env, " "), "GREETING=hello") {
				t.Errorf("info %+v: want 2 layers and the image config's env, workdir, user", info)
			}
			got, err := s.Get("busybox-test:v1")
			if err != nil || got.Digest != info.Digest {
				t.Errorf("Get = %+v, %v; want the imported image", got, err)
			}
			list, err := s.List()
			if err != nil || len(list) != 1 || list[0].Digest != info.Digest {
				t.Errorf("List = %+v, %v; want the one imported image", list, err)
			}
			// Only the image's own blobs are kept: not the arm64 image's.
			blobs, _ := os.ReadDir(filepath.Join(s.imageDir(mustRef(t, "busybox-test:v1")), "blobs", "sha256"))
			if len(blobs) != 4 { // manifest, config, 2 layers
				t.Errorf("stored %d blobs, want 4 (manifest, config, 2 layers)", len(blobs))
			}
			fs, err := s.RootImage(context.Background(), "busybox-test:v1", fakeEnvd(t), nil)
			if err != nil {
				t.Fatal(err)
			}
			if exists(t, fs.Path, "/etc/doomed.txt") || !exists(t, fs.Path, "/etc/motd") {
				t.Error("the upper layer's whiteout of /etc/doomed.txt or its /etc/motd did not apply")
			}
		})
	}
}

func mustRef(t *testing.T, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// hostHadVarHome: the test image's /home -> /var/home must not create the
// host's /var/home; that can only be checked where there is none.
var hostHadVarHome = func() bool { _, err := os.Stat("/var/home"); return err == nil }()

func TestRootImageContent(t *testing.T) {
	s := newStore(t)
	if _, err := s.Import(context.Background(), "busybox-test", archive(t, "oci")); err != nil {
		t.Fatal(err)
	}
	envd := fakeEnvd(t)
	fs, err := s.RootImage(context.Background(), "busybox-test:latest", envd, nil)
	if err != nil {
		t.Fatal(err)
	}
	img := fs.Path
	envdContent, _ := os.ReadFile(envd)

	t.Run("flattening", func(t *testing.T) {
		if exists(t, img, "/etc/doomed.txt") {
			t.Error("/etc/doomed.txt is there; the upper layer whited it out")
		}
		if exists(t, img, "/etc/olddir/old") || !exists(t, img, "/etc/olddir/new") {
			t.Error("/etc/olddir: want only the upper layer's new (opaque whiteout)")
		}
		if got := debugfs(t, img, "cat /etc/motd"); got != "hello from layer 2\n" {
			t.Errorf("/etc/motd = %q", got)
		}
		bb, link := stat(t, img, "/bin/busybox"), stat(t, img, "/bin/busybox-link")
		if bb.Inode != link.Inode || bb.Links != 2 {
			t.Errorf("/bin/busybox-link (inode %d) is not a hard link of /bin/busybox (inode %d, %d links)", link.Inode, bb.Inode, bb.Links)
		}
		if sh := stat(t, img, "/bin/sh"); sh.Type != "symlink" || sh.FastLink != "busybox" {
			t.Errorf("/bin/sh = %+v, want a symlink to busybox", sh)
		}
		if sudo := stat(t, img, "/usr/bin/sudo"); sudo.Mode != 0o4755 {
			t.Errorf("/usr/bin/sudo mode %o, want the layer's 4755 (setuid kept)", sudo.Mode)
		}
		if d := stat(t, img, "/app/data"); d.UID != 1000 || d.GID != 1000 || d.Mode != 0o600 {
			t.Errorf("/app/data = %+v, want 1000:1000 mode 600 as in the layer", d)
		}
	})

	t.Run("absolute symlinks stay inside", func(t *testing.T) {
		// /home -> /var/home: the home is made through the link, inside the image.
		if h := stat(t, img, "/var/home/user"); h.Type != "directory" || h.UID != 1001 {
			t.Errorf("/var/home/user = %+v, want user's home made through /home -> /var/home", h)
		}
		if h := stat(t, img, "/home"); h.Type != "symlink" || h.FastLink != "/var/home" {
			t.Errorf("/home = %+v, want the image's symlink kept", h)
		}
		// resolv.conf was a symlink into /run; now a plain file for envd to write.
		if r := stat(t, img, "/etc/resolv.conf"); r.Type != "regular" {
			t.Errorf("/etc/resolv.conf is a %s, want a regular file", r.Type)
		}
		if hostHadVarHome {
			return
		}
		if _, err := os.Stat("/var/home"); err == nil {
			t.Fatal("the host has /var/home now: provisioning followed /home -> /var/home onto the host")
		}
	})

	t.Run("accounts", func(t *testing.T) {
		passwd := debugfs(t, img, "cat /etc/passwd")
		// uid and gid 1000 are appuser's, so user gets the next free pair.
		if !strings.Contains(passwd, "\nuser:x:1001:1001::/home/user:/bin/sh\n") ||
			!strings.Contains(passwd, "appuser:x:1000:1000::/home/app:/bin/sh") {
			t.Errorf("/etc/passwd:\n%s", passwd)
		}
		group := debugfs(t, img, "cat /etc/group")
		if !regexp.MustCompile(`(?m)^user:x:1001:$`).MatchString(group) || !regexp.MustCompile(`(?m)^sudo:x:27:user$`).MatchString(group) {
			t.Errorf("/etc/group has no user:x:1001: or sudo:x:27:user:\n%s", group)
		}
		shadow := debugfs(t, img, "cat /etc/shadow")
		if !regexp.MustCompile(`(?m)^user:!:\d+:0:99999:7:::$`).MatchString(shadow) || !strings.Contains(shadow, "appuser:!:19000") {
			t.Errorf("/etc/shadow:\n%s", shadow)
		}
		if gs := debugfs(t, img, "cat /etc/gshadow"); gs != "root:*::\nappuser:!::\nsudo:*::user\nuser:!::\n" {
			t.Errorf("/etc/gshadow = %q, want sudo and user entries added", gs)
		}
		if sh := stat(t, img, "/etc/shadow"); sh.Mode != 0o640 || sh.GID != 42 {
			t.Errorf("/etc/shadow mode %o group %d, want the image's 640 and 42 kept", sh.Mode, sh.GID)
		}
		if fs.Provisioned.UID != 1001 || fs.Provisioned.GID != 1001 || fs.Provisioned.Shell != "/bin/sh" {
			t.Errorf("Provisioned = %+v, want 1001:1001 with /bin/sh", fs.Provisioned)
		}
		if w := strings.Join(fs.Provisioned.Warnings, "\n"); !strings.Contains(w, "no bash") || strings.Contains(w, "no sudo") {
			t.Errorf("warnings %q: want one about bash (the image has none), none about sudo (it has it)", w)
		}
	})

	t.Run("home and sudo", func(t *testing.T) {
		if h := stat(t, img, "/var/home/user"); h.Type != "directory" || h.UID != 1001 || h.GID != 1001 {
			t.Errorf("/home/user = %+v, want a directory owned by 1001:1001", h)
		}
		if p := stat(t, img, "/var/home/user/.profile"); p.UID != 1001 || debugfs(t, img, "cat /var/home/user/.profile") != "# skel profile\n" {
			t.Errorf("/home/user/.profile = %+v, want /etc/skel's, owned by user", p)
		}
		if got := debugfs(t, img, "cat /etc/sudoers.d/warren"); got != "user ALL=(ALL:ALL) NOPASSWD: ALL\n" {
			t.Errorf("/etc/sudoers.d/warren = %q", got)
		}
		if st := stat(t, img, "/etc/sudoers.d/warren"); st.Mode != 0o440 || st.UID != 0 {
			t.Errorf("/etc/sudoers.d/warren mode %o uid %d, want 440 root (sudo refuses others)", st.Mode, st.UID)
		}
	})

	t.Run("system files", func(t *testing.T) {
		if e := stat(t, img, "/usr/bin/envd"); e.Mode != 0o755 || e.UID != 0 {
			t.Errorf("/usr/bin/envd mode %o uid %d, want 755 root", e.Mode, e.UID)
		}
		if got := debugfs(t, img, "cat /usr/bin/envd"); got != string(envdContent) {
			t.Errorf("/usr/bin/envd = %q, want the given envd", got)
		}
		if got := debugfs(t, img, "cat /etc/hostname"); got != "e2b.local\n" {
			t.Errorf("/etc/hostname = %q", got)
		}
		if !strings.Contains(debugfs(t, img, "cat /etc/hosts"), "127.0.1.1\te2b.local") {
			t.Error("/etc/hosts does not name e2b.local (sudo looks the hostname up)")
		}
		for p, mode := range map[string]uint32{"/proc": 0o555, "/sys": 0o555, "/dev": 0o755, "/run": 0o755, "/tmp": 0o1777} {
			if st := stat(t, img, p); st.Type != "directory" || st.Mode != mode {
				t.Errorf("%s = %+v, want a directory with mode %o", p, st, mode)
			}
		}
		out, err := exec.Command("dumpe2fs", "-h", img).Output()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), "Filesystem volume name:   "+image.Label) {
			t.Errorf("volume label is not %s", image.Label)
		}
		m := regexp.MustCompile(`(?m)^Free blocks:\s+(\d+)`).FindStringSubmatch(string(out))
		if free, _ := strconv.ParseInt(m[1], 10, 64); free*4096 < image.DefaultFreeBytes {
			t.Errorf("%d bytes free, want at least %d", free*4096, int64(image.DefaultFreeBytes))
		}
	})

	t.Run("metadata", func(t *testing.T) {
		if fs.Image.WorkingDir != "/app" || fs.Image.User != "appuser" || !strings.Contains(strings.Join(fs.Image.Env, " "), "GREETING=hello") {
			t.Errorf("RootFS.Image = %+v, want the image config's env, workdir and user", fs.Image)
		}
	})

	t.Run("cached", func(t *testing.T) {
		start := time.Now()
		again, err := s.RootImage(context.Background(), "busybox-test", envd, nil)
		if err != nil {
			t.Fatal(err)
		}
		if again.Path != fs.Path || !again.BuiltAt.Equal(fs.BuiltAt) {
			t.Errorf("second call built again: %s at %s, first %s at %s", again.Path, again.BuiltAt, fs.Path, fs.BuiltAt)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("cached lookup took %s", d)
		}
		other := fakeEnvd(t)
		os.WriteFile(other, []byte("another envd\n"), 0o600)
		rebuilt, err := s.RootImage(context.Background(), "busybox-test", other, nil)
		if err != nil {
			t.Fatal(err)
		}
		if rebuilt.Path == fs.Path || debugfs(t, rebuilt.Path, "cat /usr/bin/envd") != "another envd\n" {
			t.Error("a new envd did not give a new root image with that envd")
		}
	})
}

// TestRootStaysInside writes through symlinks that point out of the tree:
// absolute ones resolve against the tree, relative ones stop at its top.
func TestRootStaysInside(t *testing.T) {
	tree := t.TempDir()
	outside := t.TempDir() // what a symlink followed on the host would reach
	os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	os.Symlink(outside, filepath.Join(tree, "abs"))             // absolute: the tree's own copy of that path
	os.Symlink("../../../../../..", filepath.Join(tree, "rel")) // relative: climbs no higher than the tree
	os.Symlink(filepath.Join(outside, "f"), filepath.Join(tree, "etc/file"))
	r, err := openRoot(tree)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	os.MkdirAll(filepath.Join(tree, outside), 0o755)
	for _, p := range []string{"/abs/x", "/rel/y", "/rel/etc/z"} {
		if err := r.writeFile(p, []byte("data"), 0o644, os.Getuid(), os.Getgid()); err != nil {
			t.Fatalf("writeFile %s: %v", p, err)
		}
	}
	// The last component is replaced, never followed.
	if err := r.writeFile("/etc/file", []byte("data"), 0o644, os.Getuid(), os.Getgid()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{outside + "/x", "y", "etc/z"} {
		if _, err := os.Stat(filepath.Join(tree, p)); err != nil {
			t.Errorf("%s not written inside the tree: %v", p, err)
		}
	}
	if left, _ := os.ReadDir(outside); len(left) != 0 {
		t.Errorf("wrote outside the tree: %v", left)
	}
	if fi, err := os.Lstat(filepath.Join(tree, "etc/file")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("/etc/file: %v, %v; want the symlink replaced by a file", fi, err)
	}
	if b, err := r.readFile("/abs/x"); err != nil || string(b) != "data" {
		t.Errorf("readFile through the absolute link = %q, %v", b, err)
	}
}

// TestProvisionScratch provisions a tree with nothing but busybox: no /etc,
// no sudo, no bash.
func TestProvisionScratch(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	tree := t.TempDir()
	os.MkdirAll(filepath.Join(tree, "bin"), 0o755)
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("apt-get install busybox-static: %v", err)
	}
	os.WriteFile(filepath.Join(tree, "bin/busybox"), bb, 0o755)
	os.Symlink("busybox", filepath.Join(tree, "bin/sh"))
	r, err := openRoot(tree)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	res, err := provision(r, fakeEnvd(t))
	if err != nil {
		t.Fatal(err)
	}
	if res.UID != 1000 || res.GID != 1000 || res.Shell != "/bin/sh" {
		t.Errorf("Provisioned = %+v, want user 1000:1000 with /bin/sh", res)
	}
	if w := strings.Join(res.Warnings, "\n"); !strings.Contains(w, "no sudo") || !strings.Contains(w, "no bash") {
		t.Errorf("warnings %q: want ones about sudo and bash", w)
	}
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(tree, p))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := read("etc/passwd"); got != "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n" {
		t.Errorf("/etc/passwd = %q", got)
	}
	if got := read("etc/group"); got != "root:x:0:\nsudo:x:27:user\nuser:x:1000:\n" {
		t.Errorf("/etc/group = %q", got)
	}
	shadow := read("etc/shadow")
	if !regexp.MustCompile(`^root:\*:\d+:0:99999:7:::\nuser:!:\d+:0:99999:7:::\n$`).MatchString(shadow) {
		t.Errorf("/etc/shadow = %q, want root and user entries", shadow)
	}
	if fi, _ := os.Stat(filepath.Join(tree, "etc/shadow")); fi.Mode().Perm() != 0o600 {
		t.Errorf("/etc/shadow mode %v, want 0600 (no shadow group)", fi.Mode())
	}
	if fi, err := os.Stat(filepath.Join(tree, "home/user")); err != nil || !fi.IsDir() {
		t.Errorf("/home/user: %v", err)
	}
	if read("etc/sudoers.d/warren") != "user ALL=(ALL:ALL) NOPASSWD: ALL\n" {
		t.Error("no sudoers rule (it must be there for when a template step installs sudo)")
	}
}

// TestProvisionSudoersInclude: an /etc/sudoers that does not read
// /etc/sudoers.d gets the include; one that does is left alone.
func TestProvisionSudoersInclude(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, tt := range []struct{ sudoers, want string }{
		{"root ALL=(ALL) ALL\n", "root ALL=(ALL) ALL\n#includedir /etc/sudoers.d\n"},
		{"root ALL=(ALL) ALL\n@includedir /etc/sudoers.d\n", "root ALL=(ALL) ALL\n@includedir /etc/sudoers.d\n"},
		{"# includedir /etc/sudoers.d\n", "# includedir /etc/sudoers.d\n#includedir /etc/sudoers.d\n"},
	} {
		tree := t.TempDir()
		os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
		os.WriteFile(filepath.Join(tree, "etc/sudoers"), []byte(tt.sudoers), 0o440)
		r, err := openRoot(tree)
		if err != nil {
			t.Fatal(err)
		}
		var res Provisioned
		if err := provisionSudo(r, &res); err != nil {
			t.Fatal(err)
		}
		r.Close()
		if got, _ := os.ReadFile(filepath.Join(tree, "etc/sudoers")); string(got) != tt.want {
			t.Errorf("sudoers %q became %q, want %q", tt.sudoers, got, tt.want)
		}
	}
}

func TestImportErrors(t *testing.T) {
	s := newStore(t)
	dir := t.TempDir()
	armOnly := filepath.Join(dir, "arm.tar")
	ocitest.WriteOCIArchive(t, armOnly, ocitest.Index(t, ocitest.OtherArchImage(t, "arm64")), "")
	notImage := filepath.Join(dir, "not-image.tar")
	os.WriteFile(notImage, []byte("plain text, not a tar"), 0o644)
	for _, tt := range []struct {
		name, ref, file, want string
	}{
		{"no image for this arch", "x:v1", armOnly, "has no linux/amd64 image (it has linux/arm64)"},
		{"not an archive", "x:v1", notImage, "not a tar archive of an image"},
		{"bad name", "UPPER:v1", armOnly, "not a valid reference"},
		{"digest name", "x@sha256:" + strings.Repeat("a", 64), armOnly, "name the image with a tag"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Import(context.Background(), tt.ref, tt.file)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Import = %v, want an error containing %q", err, tt.want)
			}
		})
	}
	if list, _ := s.List(); len(list) != 0 {
		t.Errorf("failed imports left images: %+v", list)
	}
	if left, _ := os.ReadDir(filepath.Join(s.Dir, tmpDir)); len(left) != 0 {
		t.Errorf("failed imports left work dirs: %v", left)
	}
}

func TestRemove(t *testing.T) {
	s := newStore(t)
	file := archive(t, "oci")
	ctx := context.Background()
	for _, n := range []string{"one:v1", "two:v1"} {
		if _, err := s.Import(ctx, n, file); err != nil {
			t.Fatal(err)
		}
	}
	fs, err := s.RootImage(ctx, "one:v1", fakeEnvd(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("one:v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("one:v1"); !errors.As(err, new(*NotFoundError)) {
		t.Errorf("Get after Remove = %v, want NotFoundError", err)
	}
	if _, err := os.Stat(fs.Path); err != nil {
		t.Errorf("root image removed while two:v1 (same digest) still uses it: %v", err)
	}
	if err := s.Remove("two:v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fs.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("root image still there after its last image went: %v", err)
	}
	if err := s.Remove("two:v1"); !errors.As(err, new(*NotFoundError)) || !strings.Contains(err.Error(), "two:v1 is not in") {
		t.Errorf("Remove of a missing image = %v, want NotFoundError naming two:v1", err)
	}
	if list, _ := s.List(); len(list) != 0 {
		t.Errorf("List = %+v, want empty", list)
	}
}

// basicAuth wraps a registry in HTTP basic authentication, as private
// registries answer: 401 with a Basic challenge, then credentials on each request.
func basicAuth(h http.Handler, user, pass string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

func TestPull(t *testing.T) {
	s := newStore(t)
	srv := httptest.NewServer(basicAuth(registry.New(registry.Logger(log.New(io.Discard, "", 0))), "alice", "s3cret"))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://") // 127.0.0.1:port
	ref := host + "/team/busybox:v1"
	img := ocitest.BusyboxImage(t)
	// Multi-platform, as registries mostly serve images.
	idx := ocitest.Index(t, ocitest.OtherArchImage(t, "arm64"), img)
	if err := remote.WriteIndex(mustRef(t, ref), idx, remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"})); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	ctx := context.Background()

	if _, err := s.RootImage(ctx, ref, fakeEnvd(t), &Credentials{Type: "registry", Username: "alice", Password: "wrong"}); err == nil ||
		!strings.Contains(err.Error(), "UNAUTHORIZED") && !strings.Contains(err.Error(), "401") {
		t.Errorf("pull with a wrong password = %v, want an unauthorized error", err)
	}
	fs, err := s.RootImage(ctx, ref, fakeEnvd(t), &Credentials{Type: "registry", Username: "alice", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	if fs.Image.Digest != want.String() || fs.Image.Source != "pull" {
		t.Errorf("pulled %+v, want the amd64 image %s from a pull", fs.Image, want)
	}
	if !exists(t, fs.Path, "/etc/motd") || exists(t, fs.Path, "/etc/doomed.txt") {
		t.Error("the pulled image's root does not have the flattened layers")
	}
	if list, _ := s.List(); len(list) != 1 || list[0].FamiliarName() != ref {
		t.Errorf("List = %+v, want the pulled image stored as %s", list, ref)
	}
	// Stored: later builds need neither the registry nor credentials.
	srv.Close()
	if again, err := s.RootImage(ctx, ref, fakeEnvd(t), nil); err != nil || again.Image.Digest != fs.Image.Digest {
		t.Errorf("RootImage with the registry gone = %v, %v; want the stored image", again, err)
	}
}

func TestPullUnreachable(t *testing.T) {
	s := newStore(t)
	// A loopback port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	host := l.Addr().String()
	l.Close()
	ref := host + "/team/app:v1"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = s.RootImage(ctx, ref, fakeEnvd(t), nil)
	if err == nil {
		t.Fatal("RootImage from an unreachable registry succeeded")
	}
	for _, want := range []string{ref + " is not in warren's image store", "warren image import " + ref + " FILE", "docker save " + ref} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestCredentialTypes(t *testing.T) {
	s := newStore(t)
	for _, tt := range []struct {
		typ, want string
	}{
		{"aws", `type "aws" is not supported`},
		{"gcp", `type "gcp" is not supported`},
		{"ftp", `type "ftp" is not one of registry, aws, gcp`},
	} {
		_, err := s.RootImage(context.Background(), "127.0.0.1:1/x/y:z", fakeEnvd(t), &Credentials{Type: tt.typ})
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("credentials type %s: %v, want an error containing %q", tt.typ, err, tt.want)
		}
	}
}

func TestFamiliarName(t *testing.T) {
	for _, tt := range []struct{ in, full, familiar string }{
		{"python:3.12-slim", "index.docker.io/library/python:3.12-slim", "python:3.12-slim"},
		{"python", "index.docker.io/library/python:latest", "python:latest"},
		{"docker.io/library/python:3", "index.docker.io/library/python:3", "python:3"},
		{"e2bdev/base", "index.docker.io/e2bdev/base:latest", "e2bdev/base:latest"},
		{"ghcr.io/team/app:v1", "ghcr.io/team/app:v1", "ghcr.io/team/app:v1"},
		{"127.0.0.1:5000/app", "127.0.0.1:5000/app:latest", "127.0.0.1:5000/app:latest"},
		{"alpine@sha256:" + strings.Repeat("a", 64), "index.docker.io/library/alpine@sha256:" + strings.Repeat("a", 64), "alpine@sha256:" + strings.Repeat("a", 64)},
	} {
		r, err := ParseReference(tt.in)
		if err != nil {
			t.Errorf("ParseReference(%q): %v", tt.in, err)
			continue
		}
		if r.Name() != tt.full || FamiliarName(r) != tt.familiar {
			t.Errorf("%q: full %q familiar %q, want %q and %q", tt.in, r.Name(), FamiliarName(r), tt.full, tt.familiar)
		}
	}
}
