package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/fslock"
)

const (
	// DebianSuite is the Debian release of the base image.
	DebianSuite = "bookworm"
	// DefaultMirror is the Debian mirror a build uses when none is given.
	DefaultMirror = "http://deb.debian.org/debian"
	// DefaultFreeBytes is the free space a base image leaves for users' installs.
	DefaultFreeBytes = 1 * GiB
	// debianRecipe versions what configureDebianBase writes: bump it when the
	// image content changes, so cached images are rebuilt.
	debianRecipe = 1
	// hostname is the base image's /etc/hostname: E2B sandboxes answer e2b.local.
	hostname = "e2b.local"
	// buildDiskBytes is about the most a build has on disk at once: the tree
	// with apt's downloads, then the tree and the image's data side by side.
	buildDiskBytes = 2 * GiB
)

// debianBasePackages are installed on top of debootstrap's minbase (which has
// bash, coreutils, tar, sed, grep, gzip, util-linux, apt, passwd). They are what
// E2B's `base` template users and the SDK's helpers reach for: ready checks use
// ss (iproute2), curl and pgrep (procps); commands run under a bash login shell;
// pipInstall/npmInstall need pip and npm. Kept sorted (the manifest compares them).
var debianBasePackages = []string{
	"ca-certificates",
	"curl",
	"git",
	"iproute2",
	"less",
	"netbase", // /etc/services and /etc/protocols, which getaddrinfo and Python's socket read
	"nodejs",
	"npm",
	"procps",
	"python-is-python3", // E2B images answer to `python`
	"python3",
	"python3-pip",
	"python3-venv",
	"sudo",
	"tzdata",
}

// DebianBaseOptions says where to build the base image and from what.
type DebianBaseOptions struct {
	// DataDir is warren's data directory; the image lands in DataDir/templates/base.
	DataDir string
	// Envd is the envd binary (static) to install as /usr/bin/envd.
	Envd string
	// Mirror is the Debian mirror; DefaultMirror when empty. The image's apt
	// sources point at it too.
	Mirror string
	// FreeBytes is the free space to leave in the file system; DefaultFreeBytes when 0.
	FreeBytes int64
	// Force rebuilds the image even when a matching one is cached.
	Force bool
	// Log receives the build's phases and tool output; nothing is logged when nil.
	Log *slog.Logger
}

// BuildDebianBase returns the base template's root filesystem image, building
// it when DataDir has none for these options: Debian minbase from debootstrap,
// the tools E2B's base has from apt, E2B's conventions (user `user`, uid 1000,
// passwordless sudo), envd at /usr/bin/envd, packed into an ext4 image with
// FreeBytes to spare.
//
// A cached image is returned at once; one that differs only in envd gets the
// new envd swapped in (about a second); any other difference, or Force,
// rebuilds from scratch (minutes). Concurrent callers on one DataDir wait for
// each other. The build needs root (debootstrap chroots and makes device nodes)
// and the host tools that MissingToolsError names.
func BuildDebianBase(ctx context.Context, opts DebianBaseOptions) (*Image, error) {
	start := time.Now()
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	p := &progress{log: opts.Log, start: start}
	if opts.DataDir == "" {
		return nil, errors.New("build base image: no data directory given")
	}
	if opts.Mirror == "" {
		opts.Mirror = DefaultMirror
	}
	if opts.FreeBytes == 0 {
		opts.FreeBytes = DefaultFreeBytes
	}
	if opts.FreeBytes < 0 {
		return nil, fmt.Errorf("build base image: free space %d is negative", opts.FreeBytes)
	}
	envd, err := filepath.Abs(opts.Envd)
	if err != nil {
		return nil, fmt.Errorf("build base image: envd path %q: %w", opts.Envd, err)
	}
	if fi, err := os.Stat(envd); err != nil {
		return nil, fmt.Errorf("build base image: envd binary: %w", err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("build base image: envd %s is not a regular file", envd)
	}
	envdSHA, err := FileSHA256(envd)
	if err != nil {
		return nil, fmt.Errorf("build base image: %w", err)
	}
	tools, err := toolPaths(debianBaseTools)
	if err != nil {
		return nil, err
	}

	dir := filepath.Join(opts.DataDir, "templates", "base")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("build base image: %w", err)
	}
	unlock, err := fslock.Lock(ctx, filepath.Join(dir, lockName), func() { p.phase("waiting for another build of this image", "dir", dir) })
	if err != nil {
		return nil, fmt.Errorf("build base image: %w", err)
	}
	defer unlock()
	if err := reclaimWorkDirs(dir); err != nil {
		return nil, fmt.Errorf("build base image: %w", err)
	}

	want := Manifest{
		Recipe:     debianRecipe,
		Suite:      DebianSuite,
		Mirror:     opts.Mirror,
		Packages:   slices.Clone(debianBasePackages),
		FreeBytes:  opts.FreeBytes,
		EnvdSHA256: envdSHA,
	}
	if !opts.Force {
		if img, err := cachedImage(dir); err == nil && img.Manifest.sameSystem(want) {
			if img.Manifest.EnvdSHA256 == envdSHA {
				return img, nil
			}
			p.phase("replacing envd in cached image", "image", img.Path)
			img, err := rebuild(dir, func(work string) (*Image, error) {
				return refreshEnvd(ctx, p, tools, img, work, envd, envdSHA)
			})
			if err != nil {
				return nil, fmt.Errorf("build base image: %w", err)
			}
			p.phase("done", "image", img.Path, "size", img.Manifest.SizeBytes)
			return img, nil
		}
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("build base image: needs root (debootstrap chroots into the tree and creates device nodes)")
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return nil, fmt.Errorf("build base image: statfs %s: %w", dir, err)
	}
	if avail := int64(fs.Bavail) * fs.Bsize; avail < buildDiskBytes {
		return nil, fmt.Errorf("build base image: needs about %d MiB free in %s, has %d MiB", buildDiskBytes>>20, dir, avail>>20)
	}
	img, err := rebuild(dir, func(work string) (*Image, error) {
		return buildDebianBase(ctx, p, tools, work, envd, want)
	})
	if err != nil {
		return nil, fmt.Errorf("build base image: %w", err)
	}
	p.phase("done", "image", img.Path, "size", img.Manifest.SizeBytes)
	return img, nil
}

// rebuild runs build in a fresh work directory under dir, then moves the image
// it made to dir/rootfs.ext4 and writes its manifest. The work directory is
// removed whatever happens.
func rebuild(dir string, build func(work string) (*Image, error)) (img *Image, err error) {
	work, err := os.MkdirTemp(dir, workPrefix)
	if err != nil {
		return nil, fmt.Errorf("make work dir: %w", err)
	}
	defer func() {
		if rerr := removeWorkDir(work); rerr != nil && err == nil {
			err = rerr
		}
	}()
	img, err = build(work)
	if err != nil {
		return nil, err
	}
	// Without its manifest a half-replaced image is rebuilt, never taken for
	// the old one (a crash between these steps would otherwise pair them).
	if err := os.Remove(filepath.Join(dir, manifestName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove old manifest: %w", err)
	}
	final := filepath.Join(dir, imageName)
	if err := os.Rename(img.Path, final); err != nil {
		return nil, fmt.Errorf("move image into place: %w", err)
	}
	img.Path = final
	if err := writeManifest(dir, img.Manifest); err != nil {
		return nil, err
	}
	return img, nil
}

// buildDebianBase debootstraps, configures and packs the base image in work.
func buildDebianBase(ctx context.Context, p *progress, tools map[string]string, work, envd string, m Manifest) (*Image, error) {
	tree := filepath.Join(work, "rootfs")
	// debootstrap lays down minbase only: its own dependency resolver cannot
	// install npm (it misses alternatives and virtual packages), so the
	// packages come from apt inside the tree, which also brings the updates
	// and security fixes that debootstrap's single suite lacks.
	p.phase("debootstrap", "suite", m.Suite, "mirror", m.Mirror)
	if err := run(ctx, newToolOutput(p, "debootstrap"), tools["debootstrap"],
		"--variant=minbase", "--components=main", m.Suite, tree, m.Mirror); err != nil {
		return nil, withDebootstrapLog(err, tree)
	}
	// debootstrap unmounts what it mounted on a clean exit; a tree with a live
	// mount inside must never reach mkfs (it would copy the host's /proc).
	if err := unmountUnder(tree); err != nil {
		return nil, err
	}
	p.phase("installing packages", "packages", strings.Join(m.Packages, " "))
	if err := installPackages(ctx, p, tools, tree, m.Mirror, m.Packages); err != nil {
		return nil, err
	}
	p.phase("configuring")
	if err := configureDebianBase(ctx, p, tools, tree); err != nil {
		return nil, err
	}
	if err := copyFile(envd, filepath.Join(tree, "usr/bin/envd"), 0o755); err != nil {
		return nil, fmt.Errorf("install envd: %w", err)
	}

	u, err := measureTree(tree)
	if err != nil {
		return nil, err
	}
	size := imageSize(u, m.FreeBytes)
	path := filepath.Join(work, imageName)
	p.phase("mkfs.ext4", "content", u.Bytes, "inodes", u.Inodes, "size", size)
	if err := mkfs(ctx, p, tools, tree, path, size); err != nil {
		return nil, err
	}
	if err := ensureFree(ctx, p, tools, path, m.FreeBytes); err != nil {
		return nil, err
	}
	p.phase("checking file system")
	if err := fsck(ctx, p, tools, path); err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("stat image: %w", err)
	}
	m.SizeBytes = fi.Size()
	m.BuiltAt = time.Now().UTC()
	m.BuildSeconds = time.Since(p.start).Round(time.Second).Seconds()
	p.phase("removing the tree")
	return &Image{Path: path, Manifest: m}, nil
}

// refreshEnvd copies the cached image into work and swaps its envd.
func refreshEnvd(ctx context.Context, p *progress, tools map[string]string, cached *Image, work, envd, envdSHA string) (*Image, error) {
	path := filepath.Join(work, imageName)
	// cp keeps the copy sparse; the image is mostly free space.
	if err := run(ctx, newToolOutput(p, "cp"), tools["cp"], "--sparse=always", "--reflink=auto", cached.Path, path); err != nil {
		return nil, err
	}
	if err := replaceEnvd(ctx, p, tools, path, envd, envdSHA); err != nil {
		return nil, err
	}
	if err := fsck(ctx, p, tools, path); err != nil {
		return nil, err
	}
	m := cached.Manifest
	m.EnvdSHA256 = envdSHA
	m.BuiltAt = time.Now().UTC()
	return &Image{Path: path, Manifest: m}, nil
}

// installPackages installs packages into tree with the tree's own apt, after
// pointing apt at the mirror (plus updates and security) and keeping docs out.
func installPackages(ctx context.Context, p *progress, tools map[string]string, tree, mirror string, packages []string) error {
	files := []treeFile{
		// deb822 sources in place of debootstrap's one-line sources.list, with
		// updates and security; users' apt-get installs use them too.
		{"etc/apt/sources.list.d/debian.sources", debianSources(mirror), 0o644},
		// Like Debian's slim container images: no docs, man pages or
		// translations (minbase has no man-db to read them); copyrights stay.
		// It also applies to what users install later.
		{"etc/dpkg/dpkg.cfg.d/warren-slim", strings.Join([]string{
			"path-exclude /usr/share/doc/*",
			"path-include /usr/share/doc/*/copyright",
			"path-exclude /usr/share/man/*",
			"path-exclude /usr/share/info/*",
			"path-exclude /usr/share/locale/*",
			"path-include /usr/share/locale/locale.alias",
		}, "\n") + "\n", 0o644},
	}
	if err := writeTreeFiles(tree, files); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(tree, "etc/apt/sources.list")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove sources.list: %w", err)
	}
	apt := func(args ...string) error {
		return run(ctx, newToolOutput(p, "apt-get"), tools["chroot"],
			append([]string{tree, "/usr/bin/apt-get", "-o", "Acquire::Languages=none"}, args...)...)
	}
	if err := apt("update"); err != nil {
		return err
	}
	if err := apt("-y", "upgrade"); err != nil {
		return err
	}
	// No recommends, as debootstrap would: they double the size (npm alone
	// recommends a compiler toolchain) and users add what they need.
	if err := apt(append([]string{"-y", "--no-install-recommends", "install"}, packages...)...); err != nil {
		return err
	}
	return apt("clean")
}

// configureDebianBase applies E2B's template conventions to the tree.
func configureDebianBase(ctx context.Context, p *progress, tools map[string]string, tree string) error {
	chroot := func(args ...string) error {
		return run(ctx, newToolOutput(p, "chroot "+filepath.Base(args[0])), tools["chroot"], append([]string{tree}, args...)...)
	}
	// The default user: uid/gid 1000 as on E2B's Debian-family images, with
	// passwordless sudo (the SDK's tests and users' scripts call sudo).
	if err := chroot("/usr/sbin/groupadd", "--gid", "1000", "user"); err != nil {
		return err
	}
	if err := chroot("/usr/sbin/useradd", "--uid", "1000", "--gid", "1000", "--groups", "sudo",
		"--create-home", "--home-dir", "/home/user", "--shell", "/bin/bash", "user"); err != nil {
		return err
	}
	files := []treeFile{
		{"etc/sudoers.d/user", "user ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440},
		{"etc/hostname", hostname + "\n", 0o644},
		{"etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t" + hostname + "\n" +
			"::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n", 0o644},
		// debootstrap copied the build host's resolver in; the node writes the
		// sandbox's own at start.
		{"etc/resolv.conf", "# written by warren when the sandbox starts\n", 0o644},
		// C.UTF-8 is built into glibc: a UTF-8 locale without the locales package.
		{"etc/default/locale", "LANG=C.UTF-8\n", 0o644},
		// Debian marks its Python externally managed (PEP 668); E2B's base
		// lets `pip install` (the SDK's pipInstall) write to the system.
		{"etc/pip.conf", "[global]\nbreak-system-packages = true\n", 0o644},
	}
	if err := writeTreeFiles(tree, files); err != nil {
		return err
	}
	if err := chroot("/usr/sbin/visudo", "--check", "--file", "/etc/sudoers.d/user"); err != nil {
		return err
	}
	return slimTree(tree)
}

// debianSources is the image's apt sources list.
func debianSources(mirror string) string {
	const keyring = "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
	return "Types: deb\nURIs: " + mirror + "\nSuites: " + DebianSuite + " " + DebianSuite + "-updates\nComponents: main\n" + keyring +
		"\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: " + DebianSuite + "-security\nComponents: main\n" + keyring
}

// slimTree removes what the image does not need at run time: apt lists
// (users run apt-get update first, as in any Debian image), build logs, and
// the docs that debootstrap unpacked before the dpkg excludes were in place.
func slimTree(tree string) error {
	globs := []string{
		"var/cache/apt/archives/*.deb",
		"var/cache/apt/*.bin",
		"var/lib/apt/lists/*",
		"var/log/*.log",
		"var/log/apt/*",
		"var/cache/debconf/*-old",
		"usr/share/man/*",
		"usr/share/info/*",
		"usr/share/locale/*",
	}
	for _, g := range globs {
		matches, err := filepath.Glob(filepath.Join(tree, g))
		if err != nil {
			return fmt.Errorf("slim %s: %w", g, err)
		}
		for _, m := range matches {
			if strings.HasSuffix(m, "/locale.alias") || strings.HasSuffix(m, "/partial") {
				continue
			}
			if err := os.RemoveAll(m); err != nil {
				return fmt.Errorf("slim: %w", err)
			}
		}
	}
	// Docs except the copyright files, which Debian's licences ask to keep.
	docs := filepath.Join(tree, "usr/share/doc")
	return filepath.WalkDir(docs, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() || d.Name() == "copyright" {
			return nil
		}
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("slim docs: %w", err)
		}
		return nil
	})
}

// treeFile is a file the build writes into the tree.
type treeFile struct {
	path, content string
	mode          os.FileMode
}

// writeTreeFiles writes files into tree, owned by root.
func writeTreeFiles(tree string, files []treeFile) error {
	for _, f := range files {
		if err := writeTreeFile(tree, f.path, f.content, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// writeTreeFile writes content to rel inside tree with mode.
func writeTreeFile(tree, rel, content string, mode os.FileMode) error {
	p := filepath.Join(tree, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("write /%s: %w", rel, err)
	}
	// A symlink here (resolv.conf often is one) must not redirect the write
	// outside the tree.
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("write /%s: %w", rel, err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		return fmt.Errorf("write /%s: %w", rel, err)
	}
	// WriteFile's mode passes through the umask; sudo rejects a sudoers file
	// with the wrong mode, so set it exactly.
	if err := os.Chmod(p, mode); err != nil {
		return fmt.Errorf("write /%s: %w", rel, err)
	}
	return nil
}

// copyFile copies src to dst with mode.
func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(dst, mode)
	}
	return err
}

// reclaimWorkDirs removes work directories a crashed build left behind. The
// caller holds the lock, so none of them belongs to a running build.
func reclaimWorkDirs(dir string) error {
	stale, err := filepath.Glob(filepath.Join(dir, workPrefix+"*"))
	if err != nil {
		return err
	}
	for _, w := range stale {
		if err := removeWorkDir(w); err != nil {
			return err
		}
	}
	return nil
}

// removeWorkDir unmounts anything left mounted under work (a killed
// debootstrap leaves the target's /proc and /sys mounted), then deletes it.
// Deleting through a live mount would reach into the host's own files.
func removeWorkDir(work string) error {
	if err := unmountUnder(work); err != nil {
		return err
	}
	if err := os.RemoveAll(work); err != nil {
		return fmt.Errorf("remove work dir: %w", err)
	}
	return nil
}

// unmountUnder detaches every mount at or below dir, deepest first, and fails
// if any is still there afterwards.
func unmountUnder(dir string) error {
	for range 3 {
		mounts, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mounts) == 0 {
			return nil
		}
		// Deepest first: a parent cannot go while a child is mounted on it.
		slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
		for _, m := range mounts {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("unmount %s: %w", m, err)
			}
		}
	}
	return fmt.Errorf("mounts under %s keep coming back", dir)
}

// mountsUnder lists the mount points at or below dir from /proc/self/mountinfo.
func mountsUnder(dir string) ([]string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountPath(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, nil
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// withDebootstrapLog adds the end of debootstrap's own log to err: its output
// only says "see debootstrap.log", and the work dir holding it is removed.
func withDebootstrapLog(err error, tree string) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	b, rerr := os.ReadFile(filepath.Join(tree, "debootstrap", "debootstrap.log"))
	if rerr != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return fmt.Errorf("%w\ndebootstrap.log ends:\n%s", err, strings.Join(lines, "\n"))
}
