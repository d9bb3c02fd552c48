package image

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testCacheDir keeps the real base image between test runs (and CI runs on the
// same machine): a cold build takes minutes, a cached one a second.
const testCacheDir = "/var/tmp/warren-test-cache"

var baseOnce struct {
	sync.Once
	img     *Image
	envd    string
	envdDir string
	err     error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if baseOnce.envdDir != "" {
		os.RemoveAll(baseOnce.envdDir)
	}
	os.Exit(code)
}

// baseImage builds (or takes from testCacheDir) the real base image, with an
// envd built from this checkout. The first test to ask pays for the build.
func baseImage(t *testing.T) (*Image, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds a Debian image with debootstrap (minutes when not cached); run without -short")
	}
	baseOnce.Do(func() {
		dir, err := os.MkdirTemp("", "warren-image-test-envd-")
		if err != nil {
			baseOnce.err = err
			return
		}
		baseOnce.envdDir = dir // TestMain removes it
		envd := filepath.Join(dir, "envd")
		if baseOnce.err = buildEnvd(envd); baseOnce.err != nil {
			return
		}
		start := time.Now()
		baseOnce.img, baseOnce.err = BuildDebianBase(context.Background(), DebianBaseOptions{
			DataDir: testCacheDir,
			Envd:    envd,
			Log:     slog.New(slog.NewTextHandler(os.Stderr, nil)),
		})
		baseOnce.envd = envd
		fmt.Fprintf(os.Stderr, "base image ready in %s\n", time.Since(start).Round(100*time.Millisecond))
	})
	if baseOnce.err != nil {
		t.Fatalf("base image: %v", baseOnce.err)
	}
	return baseOnce.img, baseOnce.envd
}

// buildEnvd builds ./cmd/envd statically. Other engineers edit envd while
// this runs, so a failed compile is retried a few times.
func buildEnvd(out string) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	var last []byte
	for attempt := range 4 {
		if attempt > 0 {
			time.Sleep(15 * time.Second)
		}
		cmd := exec.Command("go", "build", "-o", out, "./cmd/envd")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if last, err = cmd.CombinedOutput(); err == nil {
			return nil
		}
	}
	return fmt.Errorf("go build ./cmd/envd: %w\n%s", err, last)
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// debugfs runs one debugfs request against the image and returns its stdout.
func debugfs(t *testing.T, img, request string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(mustTool(t, "debugfs"), "-R", request, img)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, stderr.String())
	}
	// debugfs exits 0 when the request fails; its complaint is on stderr.
	if msg := strings.TrimSpace(strings.TrimPrefix(stderr.String(), "debugfs 1.")); strings.Contains(msg, "File not found") {
		t.Fatalf("debugfs -R %q: %s", request, msg)
	}
	return stdout.String()
}

func mustTool(t *testing.T, name string) string {
	t.Helper()
	p, err := lookTool(name)
	if err != nil {
		t.Fatalf("%v (apt-get install -y e2fsprogs debootstrap)", err)
	}
	return p
}

// inodeStat is what a test needs from `debugfs stat`.
type inodeStat struct {
	Type     string // regular, directory, symlink, ...
	Mode     uint32 // permission bits including setuid
	UID, GID int
	Size     int64
	Link     string // a symlink's target
}

var (
	statTypeRE = regexp.MustCompile(`Type: (\S+)\s+Mode:\s+([0-7]+)`)
	statUserRE = regexp.MustCompile(`User:\s+(\d+)\s+Group:\s+(\d+).*Size: (\d+)`)
	statLinkRE = regexp.MustCompile(`Fast link dest: "([^"]*)"`)
)

// stat reads path's inode from the image without following a final symlink.
func stat(t *testing.T, img, path string) inodeStat {
	t.Helper()
	out := debugfs(t, img, "stat "+path)
	ty := statTypeRE.FindStringSubmatch(out)
	us := statUserRE.FindStringSubmatch(out)
	if ty == nil || us == nil {
		t.Fatalf("debugfs stat %s: unexpected output:\n%s", path, out)
	}
	mode, _ := strconv.ParseUint(ty[2], 8, 32)
	uid, _ := strconv.Atoi(us[1])
	gid, _ := strconv.Atoi(us[2])
	size, _ := strconv.ParseInt(us[3], 10, 64)
	s := inodeStat{Type: ty[1], Mode: uint32(mode), UID: uid, GID: gid, Size: size}
	if m := statLinkRE.FindStringSubmatch(out); m != nil {
		s.Link = m[1]
	} else if s.Type == "symlink" {
		// Targets of 60 bytes or more are stored in a block.
		s.Link = strings.TrimSpace(debugfs(t, img, "cat "+path))
	}
	return s
}

// resolve follows symlinks inside the image to the final inode.
func resolve(t *testing.T, img, path string) (string, inodeStat) {
	t.Helper()
	for range 10 {
		s := stat(t, img, path)
		if s.Type != "symlink" {
			return path, s
		}
		if strings.HasPrefix(s.Link, "/") {
			path = s.Link
		} else {
			path = filepath.Join(filepath.Dir(path), s.Link)
		}
	}
	t.Fatalf("%s: too many symlinks", path)
	return "", inodeStat{}
}

func TestDebianBaseUser(t *testing.T) {
	img, _ := baseImage(t)
	passwd := debugfs(t, img.Path, "cat /etc/passwd")
	if !strings.Contains(passwd, "\nuser:x:1000:1000::/home/user:/bin/bash\n") {
		t.Errorf("/etc/passwd has no `user:x:1000:1000::/home/user:/bin/bash` line:\n%s", passwd)
	}
	group := debugfs(t, img.Path, "cat /etc/group")
	if !regexp.MustCompile(`(?m)^user:x:1000:$`).MatchString(group) {
		t.Errorf("/etc/group has no group user with gid 1000:\n%s", group)
	}
	if !regexp.MustCompile(`(?m)^sudo:x:27:(.*,)?user(,.*)?$`).MatchString(group) {
		t.Errorf("user is not in group sudo:\n%s", group)
	}
	for _, d := range []struct {
		path string
		mode uint32
	}{{"/", 0o755}, {"/tmp", 0o1777}, {"/root", 0o700}, {"/home", 0o755}} {
		if s := stat(t, img.Path, d.path); s.Mode != d.mode || s.UID != 0 || s.GID != 0 {
			t.Errorf("%s = mode %o owner %d:%d, want %o root:root", d.path, s.Mode, s.UID, s.GID, d.mode)
		}
	}
	home := stat(t, img.Path, "/home/user")
	if home.Type != "directory" || home.UID != 1000 || home.GID != 1000 {
		t.Errorf("/home/user = %+v, want a directory owned by 1000:1000", home)
	}
	// useradd --create-home copies /etc/skel: bash finds its profile.
	if s := stat(t, img.Path, "/home/user/.bashrc"); s.UID != 1000 {
		t.Errorf("/home/user/.bashrc owned by %d, want 1000", s.UID)
	}
	sudoers := stat(t, img.Path, "/etc/sudoers.d/user")
	if sudoers.Mode != 0o440 || sudoers.UID != 0 || sudoers.GID != 0 {
		t.Errorf("/etc/sudoers.d/user = mode %o owner %d:%d, want 0440 root:root", sudoers.Mode, sudoers.UID, sudoers.GID)
	}
	if got, want := debugfs(t, img.Path, "cat /etc/sudoers.d/user"), "user ALL=(ALL:ALL) NOPASSWD: ALL\n"; got != want {
		t.Errorf("/etc/sudoers.d/user = %q, want %q", got, want)
	}
}

func TestDebianBaseTools(t *testing.T) {
	img, _ := baseImage(t)
	for _, p := range []string{
		"/usr/bin/bash", "/usr/bin/python3", "/usr/bin/python", "/usr/bin/pip", "/usr/bin/node",
		"/usr/bin/npm", "/usr/bin/git", "/usr/bin/curl", "/usr/bin/ss", "/usr/bin/pgrep", "/usr/bin/ps",
		"/usr/bin/sudo", "/usr/bin/tar", "/usr/bin/less",
	} {
		t.Run(p, func(t *testing.T) {
			target, s := resolve(t, img.Path, p)
			if s.Type != "regular" || s.Mode&0o111 == 0 {
				t.Errorf("%s -> %s is %s mode %o, want an executable file", p, target, s.Type, s.Mode)
			}
		})
	}
	// sudo only works setuid root; mkfs -d must have carried the bit over.
	if _, s := resolve(t, img.Path, "/usr/bin/sudo"); s.Mode&0o4000 == 0 || s.UID != 0 {
		t.Errorf("/usr/bin/sudo mode %o owner %d, want setuid root", s.Mode, s.UID)
	}
	if s := stat(t, img.Path, "/etc/ssl/certs/ca-certificates.crt"); s.Size == 0 {
		t.Errorf("CA bundle is empty")
	}
}

func TestDebianBaseEnvd(t *testing.T) {
	img, envd := baseImage(t)
	fi, err := os.Stat(envd)
	if err != nil {
		t.Fatal(err)
	}
	s := stat(t, img.Path, "/usr/bin/envd")
	if s.Type != "regular" || s.Size != fi.Size() || s.Mode != 0o755 || s.UID != 0 {
		t.Errorf("/usr/bin/envd = %+v, want a regular file of %d bytes, mode 0755, owned by root", s, fi.Size())
	}
	want, err := FileSHA256(envd)
	if err != nil {
		t.Fatal(err)
	}
	if img.Manifest.EnvdSHA256 != want {
		t.Errorf("manifest envd sha256 %s, want %s", img.Manifest.EnvdSHA256, want)
	}
}

func TestDebianBaseSystemFiles(t *testing.T) {
	img, _ := baseImage(t)
	tests := []struct {
		path string
		want *regexp.Regexp
	}{
		{"/etc/hostname", regexp.MustCompile(`^e2b\.local\n$`)},
		{"/etc/hosts", regexp.MustCompile(`(?m)^127\.0\.0\.1\tlocalhost$`)},
		{"/etc/hosts", regexp.MustCompile(`(?m)^::1\tlocalhost`)},
		{"/etc/resolv.conf", regexp.MustCompile(`^#[^\n]*\n$`)}, // placeholder, not the build host's
		{"/etc/default/locale", regexp.MustCompile(`^LANG=C\.UTF-8\n$`)},
		{"/etc/pip.conf", regexp.MustCompile(`break-system-packages = true`)},
		{"/etc/apt/sources.list.d/debian.sources", regexp.MustCompile(`Suites: bookworm bookworm-updates`)},
		{"/etc/os-release", regexp.MustCompile(`VERSION_CODENAME=bookworm`)},
	}
	for _, tt := range tests {
		t.Run(tt.path+" "+tt.want.String(), func(t *testing.T) {
			target, _ := resolve(t, img.Path, tt.path)
			if got := debugfs(t, img.Path, "cat "+target); !tt.want.MatchString(got) {
				t.Errorf("%s = %q, want a match for %s", tt.path, got, tt.want)
			}
		})
	}
}

// TestDebianBaseSlim checks the caches the build promises to drop are gone.
func TestDebianBaseSlim(t *testing.T) {
	img, _ := baseImage(t)
	for _, dir := range []string{"/var/lib/apt/lists", "/var/cache/apt/archives", "/usr/share/man"} {
		out := debugfs(t, img.Path, "ls -p "+dir)
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			// ls -p: /inode/mode/uid/gid/name/size/
			f := strings.Split(line, "/")
			if len(f) < 6 {
				continue
			}
			name := f[5]
			if name != "." && name != ".." && name != "partial" && name != "lock" {
				t.Errorf("%s still has %s", dir, name)
			}
		}
	}
}

func TestDebianBaseFileSystem(t *testing.T) {
	img, _ := baseImage(t)
	tools, err := toolPaths(debianBaseTools)
	if err != nil {
		t.Fatal(err)
	}
	p := &progress{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), start: time.Now()}
	sb, err := superblock(context.Background(), p, tools, img.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got := sb["Filesystem volume name"]; got != Label {
		t.Errorf("label %q, want %q", got, Label)
	}
	free, err := freeBytes(sb)
	if err != nil {
		t.Fatal(err)
	}
	if free < DefaultFreeBytes {
		t.Errorf("free space %d, want at least %d", free, DefaultFreeBytes)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(img.Path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != img.Manifest.SizeBytes {
		t.Errorf("image is %d bytes, manifest says %d", st.Size, img.Manifest.SizeBytes)
	}
	if st.Blocks*512 >= st.Size {
		t.Errorf("image uses %d bytes on disk for %d: not sparse", st.Blocks*512, st.Size)
	}
	m, err := ReadManifest(filepath.Dir(img.Path))
	if err != nil {
		t.Fatal(err)
	}
	if m.Suite != DebianSuite || strings.Join(m.Packages, ",") != strings.Join(debianBasePackages, ",") || m.Recipe != debianRecipe {
		t.Errorf("manifest %+v does not describe this build", m)
	}
	t.Logf("image %s: %d MiB apparent, %d MiB on disk, %d MiB free, built in %.0fs",
		img.Path, st.Size>>20, st.Blocks*512>>20, free>>20, m.BuildSeconds)
}

// TestDebianBaseCached checks that a second call returns the cached image
// without rebuilding it.
func TestDebianBaseCached(t *testing.T) {
	img, envd := baseImage(t)
	start := time.Now()
	again, err := BuildDebianBase(context.Background(), DebianBaseOptions{DataDir: testCacheDir, Envd: envd})
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("cached call took %s", took)
	}
	if again.Path != img.Path || !again.Manifest.BuiltAt.Equal(img.Manifest.BuiltAt) {
		t.Errorf("second call returned %s built %s, want the cached %s built %s",
			again.Path, again.Manifest.BuiltAt, img.Path, img.Manifest.BuiltAt)
	}
}

// copyBase copies the cached base image and manifest into a fresh data dir,
// so a test can change it without touching the shared cache.
func copyBase(t *testing.T, img *Image) string {
	t.Helper()
	data := t.TempDir()
	dir := filepath.Join(data, "templates", "base")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{imageName, manifestName} {
		out, err := exec.Command("cp", "--sparse=always", filepath.Join(filepath.Dir(img.Path), name), dir).CombinedOutput()
		if err != nil {
			t.Fatalf("copy %s: %v\n%s", name, err, out)
		}
	}
	return data
}

// TestDebianBaseNewEnvd checks that a new envd is swapped into a cached image
// instead of rebuilding the operating system.
func TestDebianBaseNewEnvd(t *testing.T) {
	img, envd := baseImage(t)
	data := copyBase(t, img)
	// Any other content will do: the image stores bytes, it does not run them.
	newEnvd := filepath.Join(t.TempDir(), "envd")
	b, err := os.ReadFile(envd)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(newEnvd, append(b, "warren-test"...), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := BuildDebianBase(context.Background(), DebianBaseOptions{DataDir: data, Envd: newEnvd})
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took > 60*time.Second {
		t.Errorf("envd swap took %s, as long as a rebuild", took)
	}
	t.Logf("envd swap took %s", took.Round(10*time.Millisecond))
	want, err := FileSHA256(newEnvd)
	if err != nil {
		t.Fatal(err)
	}
	if got.Manifest.EnvdSHA256 != want {
		t.Errorf("manifest envd sha256 %s, want %s", got.Manifest.EnvdSHA256, want)
	}
	if got.Manifest.BuildSeconds != img.Manifest.BuildSeconds {
		t.Errorf("BuildSeconds changed from %v to %v: the system was rebuilt", img.Manifest.BuildSeconds, got.Manifest.BuildSeconds)
	}
	tools, err := toolPaths(debianBaseTools)
	if err != nil {
		t.Fatal(err)
	}
	p := &progress{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), start: time.Now()}
	if sum, err := fileSHA256InImage(context.Background(), p, tools, got.Path, "/usr/bin/envd"); err != nil || sum != want {
		t.Errorf("envd in image sha256 %s (%v), want %s", sum, err, want)
	}
	// The source was 0600; the image's envd must still be executable by root.
	if s := stat(t, got.Path, "/usr/bin/envd"); s.Mode != 0o755 || s.UID != 0 || s.GID != 0 {
		t.Errorf("/usr/bin/envd after swap = %+v, want mode 0755 root:root", s)
	}
	// The rest of the system is untouched.
	if passwd := debugfs(t, got.Path, "cat /etc/passwd"); !strings.Contains(passwd, "user:x:1000:1000:") {
		t.Errorf("/etc/passwd lost user after the swap")
	}
}

// TestDebianBaseGrows checks that the image can be grown with resize2fs, as a
// sandbox with a bigger disk needs.
func TestDebianBaseGrows(t *testing.T) {
	img, _ := baseImage(t)
	path := filepath.Join(copyBase(t, img), "templates", "base", imageName)
	if err := os.Truncate(path, img.Manifest.SizeBytes+512*mib); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mustTool(t, "resize2fs"), path).CombinedOutput(); err != nil {
		t.Fatalf("resize2fs: %v\n%s", err, out)
	}
	if out, err := exec.Command(mustTool(t, "e2fsck"), "-f", "-n", path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck after resize: %v\n%s", err, out)
	}
	tools, err := toolPaths(debianBaseTools)
	if err != nil {
		t.Fatal(err)
	}
	p := &progress{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), start: time.Now()}
	sb, err := superblock(context.Background(), p, tools, path)
	if err != nil {
		t.Fatal(err)
	}
	free, err := freeBytes(sb)
	if err != nil {
		t.Fatal(err)
	}
	if free < DefaultFreeBytes+500*mib {
		t.Errorf("free after growing by 512 MiB: %d MiB, want at least %d MiB", free>>20, (DefaultFreeBytes+500*mib)>>20)
	}
}
