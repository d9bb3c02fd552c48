package image

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests in this file need e2fsprogs but not debootstrap or the network;
// they take seconds.

func testProgress(t *testing.T) *progress {
	return &progress{log: slog.New(slog.NewTextHandler(t.Output(), nil)), start: time.Now()}
}

func e2fsTools(t *testing.T) map[string]string {
	t.Helper()
	tools, err := toolPaths(debianBaseTools[1:]) // all but debootstrap
	if err != nil {
		t.Fatal(err)
	}
	return tools
}

func TestImageSize(t *testing.T) {
	tests := []struct {
		name        string
		u           treeUsage
		free        int64
		atLeast     int64
		atMostRatio float64 // size / (content + free) stays below this
	}{
		{"empty tree, no headroom", treeUsage{}, 0, 4 * mib, 0},
		{"small tree", treeUsage{Bytes: 10 * mib, Inodes: 500}, 32 * mib, 42 * mib, 1.5},
		{"base-sized tree", treeUsage{Bytes: 545 * mib, Inodes: 40000}, GiB, 545*mib + GiB, 1.15},
		{"big tree", treeUsage{Bytes: 20 * GiB, Inodes: 2000000}, 10 * GiB, 30 * GiB, 1.15},
		{"many tiny files", treeUsage{Bytes: 100 * mib, Inodes: 100000}, 0, 100*mib + 100000*inodeSize, 1.7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := imageSize(tt.u, tt.free)
			if got < tt.atLeast {
				t.Errorf("imageSize = %d, want at least %d", got, tt.atLeast)
			}
			if got%mib != 0 {
				t.Errorf("imageSize = %d, not a whole MiB", got)
			}
			if tt.atMostRatio > 0 {
				if r := float64(got) / float64(tt.u.Bytes+tt.free); r > tt.atMostRatio {
					t.Errorf("imageSize = %d is %.2fx content+free, want at most %.2fx", got, r, tt.atMostRatio)
				}
			}
			if more := imageSize(treeUsage{tt.u.Bytes + GiB, tt.u.Inodes}, tt.free); more <= got {
				t.Errorf("a GiB more content gives %d, not more than %d", more, got)
			}
		})
	}
}

func TestJournalBytes(t *testing.T) {
	tests := []struct {
		size, want int64
	}{
		{64 * mib, 4 * mib},
		{1536 * mib, 32 * mib},
		{10 * GiB, 64 * mib},
		{100 * GiB, 512 * mib},
		{200 * GiB, 1 * GiB},
	}
	for _, tt := range tests {
		if got := journalBytes(tt.size); got != tt.want {
			t.Errorf("journalBytes(%d MiB) = %d MiB, want %d MiB", tt.size>>20, got>>20, tt.want>>20)
		}
	}
}

// makeTree writes a small root file system tree with the kinds of entries a
// real one has.
func makeTree(t *testing.T) string {
	t.Helper()
	tree := filepath.Join(t.TempDir(), "rootfs")
	for _, d := range []string{"usr/bin", "home/user", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	big := bytes.Repeat([]byte("warren"), 2*mib/6)
	files := map[string][]byte{"usr/bin/tool": big, "etc/passwd": []byte("root:x:0:0::/root:/bin/bash\n")}
	for i := range 300 {
		files["etc/f"+strconv.Itoa(i)] = []byte(strconv.Itoa(i))
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(tree, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// os.Chmod takes Go's mode flags for setuid and sticky, not 04000/01000.
	must(t, os.Chmod(filepath.Join(tree, "usr/bin/tool"), os.ModeSetuid|0o755))
	must(t, os.Chmod(filepath.Join(tree, "tmp"), os.ModeSticky|0o777))
	must(t, os.Chown(filepath.Join(tree, "home/user"), 1000, 1000))
	must(t, os.Link(filepath.Join(tree, "usr/bin/tool"), filepath.Join(tree, "usr/bin/tool-link")))
	must(t, os.Symlink("tool", filepath.Join(tree, "usr/bin/short")))
	must(t, os.Symlink(strings.Repeat("long/", 20)+"target", filepath.Join(tree, "usr/bin/long")))
	return tree
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestMeasureTree(t *testing.T) {
	tree := makeTree(t)
	u, err := measureTree(tree)
	if err != nil {
		t.Fatal(err)
	}
	// 7 dirs (rootfs, usr, usr/bin, home, home/user, tmp, etc), 302 files
	// (the hard link is the same inode), 2 symlinks.
	if u.Inodes != 7+302+2 {
		t.Errorf("Inodes = %d, want %d", u.Inodes, 7+302+2)
	}
	// The 2 MiB tool counts once, every small file takes a block, the long
	// symlink one block.
	min := roundUp(2*mib, blockSize) + 301*blockSize + blockSize
	if u.Bytes < min || u.Bytes > min+7*16*1024 {
		t.Errorf("Bytes = %d, want about %d", u.Bytes, min)
	}
}

// TestMkfsHoldsTree packs a tree the way a build does and checks that the
// image keeps what a root file system needs and has the free space asked for.
func TestMkfsHoldsTree(t *testing.T) {
	ctx := context.Background()
	p, tools := testProgress(t), e2fsTools(t)
	tree := makeTree(t)
	u, err := measureTree(tree)
	if err != nil {
		t.Fatal(err)
	}
	const free = 32 * mib
	img := filepath.Join(t.TempDir(), imageName)
	if err := mkfs(ctx, p, tools, tree, img, imageSize(u, free)); err != nil {
		t.Fatal(err)
	}
	if err := ensureFree(ctx, p, tools, img, free); err != nil {
		t.Fatal(err)
	}
	if err := fsck(ctx, p, tools, img); err != nil {
		t.Fatal(err)
	}
	sb, err := superblock(ctx, p, tools, img)
	if err != nil {
		t.Fatal(err)
	}
	if sb["Filesystem volume name"] != Label {
		t.Errorf("label %q, want %q", sb["Filesystem volume name"], Label)
	}
	if sb["Reserved block count"] != "0" {
		t.Errorf("reserved blocks %q, want 0 (the free space is the users')", sb["Reserved block count"])
	}
	if got, err := freeBytes(sb); err != nil || got < free {
		t.Errorf("free %d (%v), want at least %d", got, err, free)
	}
	tests := []struct {
		path     string
		typ      string
		mode     uint32
		uid, gid int
	}{
		{"/usr/bin/tool", "regular", 0o4755, 0, 0},
		{"/home/user", "directory", 0o755, 1000, 1000},
		{"/tmp", "directory", 0o1777, 0, 0},
		{"/usr/bin/short", "symlink", 0o777, 0, 0},
	}
	for _, tt := range tests {
		s := stat(t, img, tt.path)
		if s.Type != tt.typ || s.Mode != tt.mode || s.UID != tt.uid || s.GID != tt.gid {
			t.Errorf("%s = %+v, want %s mode %o owner %d:%d", tt.path, s, tt.typ, tt.mode, tt.uid, tt.gid)
		}
	}
	if s := stat(t, img, "/usr/bin/long"); s.Link != strings.Repeat("long/", 20)+"target" {
		t.Errorf("long symlink points at %q", s.Link)
	}
	if !strings.Contains(debugfs(t, img, "stat /usr/bin/tool-link"), "Links: 2") {
		t.Errorf("hard link became a copy")
	}
	if got := debugfs(t, img, "cat /etc/f299"); got != "299" {
		t.Errorf("/etc/f299 = %q, want 299", got)
	}
}

// TestEnsureFreeGrows checks that an image made too small for the promised
// free space is grown to it.
func TestEnsureFreeGrows(t *testing.T) {
	ctx := context.Background()
	p, tools := testProgress(t), e2fsTools(t)
	tree := makeTree(t)
	u, err := measureTree(tree)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), imageName)
	if err := mkfs(ctx, p, tools, tree, img, imageSize(u, 0)); err != nil {
		t.Fatal(err)
	}
	const want = 100 * mib
	if err := ensureFree(ctx, p, tools, img, want); err != nil {
		t.Fatal(err)
	}
	sb, err := superblock(ctx, p, tools, img)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := freeBytes(sb); got < want {
		t.Errorf("free %d after ensureFree, want at least %d", got, want)
	}
	if err := fsck(ctx, p, tools, img); err != nil {
		t.Fatal(err)
	}
}

func TestReplaceEnvd(t *testing.T) {
	ctx := context.Background()
	p, tools := testProgress(t), e2fsTools(t)
	tests := []struct {
		name   string
		before bool // the image has an envd already
	}{
		{"replaces an old envd", true},
		{"adds a missing envd", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tree := makeTree(t)
			if tt.before {
				must(t, os.WriteFile(filepath.Join(tree, "usr/bin/envd"), bytes.Repeat([]byte("old"), 100000), 0o755))
			}
			img := filepath.Join(t.TempDir(), imageName)
			u, err := measureTree(tree)
			if err != nil {
				t.Fatal(err)
			}
			must(t, mkfs(ctx, p, tools, tree, img, imageSize(u, 16*mib)))
			// A source without exec bits: the image's envd gets 0755 anyway.
			src := filepath.Join(t.TempDir(), "envd")
			must(t, os.WriteFile(src, []byte("new envd"), 0o600))
			sum, err := FileSHA256(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := replaceEnvd(ctx, p, tools, img, src, sum); err != nil {
				t.Fatal(err)
			}
			if got := debugfs(t, img, "cat /usr/bin/envd"); got != "new envd" {
				t.Errorf("/usr/bin/envd = %q, want %q", got, "new envd")
			}
			if s := stat(t, img, "/usr/bin/envd"); s.Mode != 0o755 || s.UID != 0 || s.GID != 0 {
				t.Errorf("/usr/bin/envd = %+v, want mode 0755 root:root", s)
			}
			must(t, fsck(ctx, p, tools, img))
		})
	}
	t.Run("a wrong hash fails", func(t *testing.T) {
		tree := makeTree(t)
		img := filepath.Join(t.TempDir(), imageName)
		u, err := measureTree(tree)
		if err != nil {
			t.Fatal(err)
		}
		must(t, mkfs(ctx, p, tools, tree, img, imageSize(u, 16*mib)))
		src := filepath.Join(t.TempDir(), "envd")
		must(t, os.WriteFile(src, []byte("new envd"), 0o755))
		if err := replaceEnvd(ctx, p, tools, img, src, strings.Repeat("0", 64)); err == nil || !strings.Contains(err.Error(), "sha256") {
			t.Errorf("replaceEnvd with a wrong hash: %v, want a sha256 mismatch", err)
		}
	})
}

func TestManifestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	m := Manifest{
		Recipe: debianRecipe, Suite: DebianSuite, Mirror: DefaultMirror, Packages: slices.Clone(debianBasePackages),
		FreeBytes: GiB, EnvdSHA256: strings.Repeat("ab", 32), SizeBytes: 1765801984,
		BuiltAt: time.Date(2026, 11, 27, 8, 43, 39, 250, time.UTC), BuildSeconds: 182,
	}
	must(t, writeManifest(dir, m))
	got, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !got.sameSystem(m) || got.EnvdSHA256 != m.EnvdSHA256 || got.SizeBytes != m.SizeBytes ||
		!got.BuiltAt.Equal(m.BuiltAt) || got.BuildSeconds != m.BuildSeconds || got.Mirror != m.Mirror {
		t.Errorf("read back %+v, want %+v", got, m)
	}
	// No temporary file is left next to it.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("dir holds %d entries after writing the manifest, want 1", len(entries))
	}
	must(t, os.WriteFile(filepath.Join(dir, manifestName), []byte("{"), 0o644))
	if _, err := ReadManifest(dir); err == nil || !strings.Contains(err.Error(), "parse manifest") {
		t.Errorf("ReadManifest of a torn file: %v, want a parse error", err)
	}
	if _, err := cachedImage(dir); err == nil {
		t.Errorf("cachedImage with a torn manifest and no image succeeded")
	}
}

func TestManifestSameSystem(t *testing.T) {
	base := Manifest{Recipe: 1, Suite: "bookworm", Mirror: DefaultMirror, Packages: []string{"curl", "git"},
		FreeBytes: GiB, EnvdSHA256: "aa", SizeBytes: 10, BuiltAt: time.Unix(1, 0), BuildSeconds: 1}
	tests := []struct {
		name   string
		change func(*Manifest)
		same   bool
	}{
		{"identical", func(*Manifest) {}, true},
		{"another envd", func(m *Manifest) { m.EnvdSHA256 = "bb" }, true},
		{"another mirror", func(m *Manifest) { m.Mirror = "http://mirror.example/debian" }, true},
		{"built at another time", func(m *Manifest) { m.BuiltAt = time.Unix(2, 0); m.BuildSeconds = 2 }, true},
		{"another recipe", func(m *Manifest) { m.Recipe = 2 }, false},
		{"another suite", func(m *Manifest) { m.Suite = "trixie" }, false},
		{"a package more", func(m *Manifest) { m.Packages = []string{"curl", "git", "less"} }, false},
		{"another package", func(m *Manifest) { m.Packages = []string{"curl", "wget"} }, false},
		{"other free space", func(m *Manifest) { m.FreeBytes = 2 * GiB }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := base
			o.Packages = append([]string(nil), base.Packages...)
			tt.change(&o)
			if got := base.sameSystem(o); got != tt.same {
				t.Errorf("sameSystem = %v, want %v", got, tt.same)
			}
		})
	}
}

func TestMissingTools(t *testing.T) {
	_, err := toolPaths([]hostTool{
		{"sh", "dash"},
		{"warren-no-such-tool-a", "warren-pkg-x"},
		{"warren-no-such-tool-b", "warren-pkg-x"},
		{"warren-no-such-tool-c", "warren-pkg-y"},
	})
	var missing *MissingToolsError
	if !errors.As(err, &missing) {
		t.Fatalf("toolPaths: %v, want a MissingToolsError", err)
	}
	const want = "apt-get install -y warren-pkg-x warren-pkg-y"
	if got := missing.InstallCommand(); got != want {
		t.Errorf("InstallCommand() = %q, want %q", got, want)
	}
	for _, s := range []string{"warren-no-such-tool-a, warren-no-such-tool-b, warren-no-such-tool-c", want} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
	if strings.Contains(err.Error(), "dash") {
		t.Errorf("error %q names the package of a tool that is present", err)
	}
	paths, err := toolPaths(debianBaseTools)
	if err != nil {
		t.Fatalf("this host lacks build tools: %v", err)
	}
	if !filepath.IsAbs(paths["mkfs.ext4"]) {
		t.Errorf("mkfs.ext4 resolved to %q, want an absolute path", paths["mkfs.ext4"])
	}
}

// logLines collects what a progress logger writes.
func logLines(buf *bytes.Buffer) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

func TestToolOutputThrottles(t *testing.T) {
	var buf bytes.Buffer
	p := &progress{log: slog.New(slog.NewTextHandler(&buf, nil)), start: time.Now()}
	o := newToolOutput(p, "debootstrap")
	now := time.Unix(1000, 0)
	o.now = func() time.Time { return now }
	write := func(s string) { o.Write([]byte(s)) }

	write("I: Retrieving InRelease\nI: Checking Release sig")   // first logged, second held back
	write("nature\nW: Failure while configuring\n")             // warning always logged
	now = now.Add(3 * time.Second)                              //
	write("I: Unpacking bash...\n\n")                           // interval passed: logged; blank line ignored
	write("debugfs 1.47.0 (5-Feb-2023)\nI: Configuring apt...") // banner never logged, last line held back
	o.flush()                                                   // the held-back last line comes out

	lines := logLines(&buf)
	want := []string{"I: Retrieving InRelease", "W: Failure while configuring", "I: Unpacking bash...", "I: Configuring apt..."}
	if len(lines) != len(want) {
		t.Fatalf("logged %d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, w := range want {
		if !strings.Contains(lines[i], strconv.Quote(w)) || !strings.Contains(lines[i], "elapsed=") {
			t.Errorf("line %d = %s, want %q with elapsed", i, lines[i], w)
		}
	}
	if tail := o.lastLines(); !strings.Contains(tail, "I: Checking Release signature") {
		t.Errorf("lastLines lost a throttled line:\n%s", tail)
	}
	for i := range 100 {
		write("line " + strconv.Itoa(i) + "\n")
	}
	if tail := strings.Split(o.lastLines(), "\n"); len(tail) != tailLines || tail[len(tail)-1] != "line 99" {
		t.Errorf("lastLines kept %d lines ending %q, want %d ending line 99", len(tail), tail[len(tail)-1], tailLines)
	}
}

func TestUnescapeMountPath(t *testing.T) {
	tests := map[string]string{
		`/var/tmp/plain`:             "/var/tmp/plain",
		`/var/tmp/with\040space`:     "/var/tmp/with space",
		`/var/tmp/tab\011and\134bs`:  "/var/tmp/tab\tand\\bs",
		`/var/tmp/not\08escape\04`:   `/var/tmp/not\08escape\04`,
		`/var/tmp/end\040`:           "/var/tmp/end ",
		`/var/tmp/\012newline\012it`: "/var/tmp/\nnewline\nit",
	}
	for in, want := range tests {
		if got := unescapeMountPath(in); got != want {
			t.Errorf("unescapeMountPath(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestRemoveWorkDirUnmounts checks the guard that keeps a cleanup from
// deleting through a mount a killed debootstrap left in the tree.
func TestRemoveWorkDirUnmounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	work := filepath.Join(t.TempDir(), workPrefix+"test")
	mnt := filepath.Join(work, "rootfs", "with space", "proc")
	must(t, os.MkdirAll(mnt, 0o755))
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	nested := filepath.Join(mnt, "sys")
	must(t, os.Mkdir(nested, 0o755))
	if err := unix.Mount("tmpfs", nested, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount nested tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(nested, unix.MNT_DETACH) })
	must(t, os.WriteFile(filepath.Join(nested, "file"), []byte("x"), 0o644))

	mounts, err := mountsUnder(work)
	if err != nil || len(mounts) != 2 {
		t.Fatalf("mountsUnder = %v, %v; want the 2 tmpfs mounts", mounts, err)
	}
	if err := removeWorkDir(work); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(work); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("work dir still there: %v", err)
	}
	if mounts, _ := mountsUnder(work); len(mounts) != 0 {
		t.Errorf("mounts left: %v", mounts)
	}
}

// TestRunCancelStopsGroup checks that cancelling a build stops the tool and
// the children it started, as debootstrap starts dpkg.
func TestRunCancelStopsGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		// The shell starts a child in its process group, then waits on it.
		done <- run(ctx, newToolOutput(testProgress(t), "sh"), "/bin/sh", "-c",
			"sleep 300 & echo $! > "+pidFile+"; wait")
	}()
	var childPID int
	deadline := time.Now().Add(10 * time.Second)
	for childPID == 0 && time.Now().Before(deadline) {
		b, _ := os.ReadFile(pidFile)
		childPID, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		time.Sleep(20 * time.Millisecond)
	}
	if childPID == 0 {
		t.Fatal("child never started")
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("run after cancel: %v, want context.Canceled", err)
		}
	case <-time.After(stopGrace + 5*time.Second):
		t.Fatal("run did not return after cancel")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("run took %s to stop; SIGTERM should end it at once", took)
	}
	// The child is gone or a zombie waiting for its reaper.
	for time.Since(start) < 5*time.Second {
		if !alive(childPID) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("child %d of the cancelled tool still runs", childPID)
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// Field 3, after "pid (comm)", is the state.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func TestRunReportsFailure(t *testing.T) {
	err := run(context.Background(), newToolOutput(testProgress(t), "sh"), "/bin/sh", "-c", "echo first; echo 'E: it broke' >&2; exit 3")
	if err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "E: it broke") {
		t.Errorf("run of a failing tool: %v, want the exit status and its last output", err)
	}
}

func TestBuildDebianBaseRejects(t *testing.T) {
	envd := filepath.Join(t.TempDir(), "envd")
	must(t, os.WriteFile(envd, []byte("envd"), 0o755))
	tests := []struct {
		name string
		opts DebianBaseOptions
		want string
	}{
		{"no data dir", DebianBaseOptions{Envd: envd}, "no data directory"},
		{"missing envd", DebianBaseOptions{DataDir: t.TempDir(), Envd: envd + ".missing"}, "envd.missing"},
		{"envd is a directory", DebianBaseOptions{DataDir: t.TempDir(), Envd: t.TempDir()}, "not a regular file"},
		{"negative free space", DebianBaseOptions{DataDir: t.TempDir(), Envd: envd, FreeBytes: -1}, "free space -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := BuildDebianBase(context.Background(), tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("BuildDebianBase: %v, want an error naming %q", err, tt.want)
			}
		})
	}
}
