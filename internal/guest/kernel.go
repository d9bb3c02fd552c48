// Package guest prepares what a warren microVM boots: Debian's cloud kernel,
// fetched with apt into the data directory (never installed into the host's
// /boot), and an initramfs holding envd as /init plus the virtio modules the
// cloud kernel builds as modules.
//
//	k, err := guest.FetchKernel(ctx, dataDir, progress)   // cached per data dir
//	err = guest.BuildInitramfs(k, envdPath, out)
//	// boot k.Image with out as the initrd (internal/runtime/microvm)
package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// KernelPackage is the Debian metapackage that names the current cloud kernel.
const KernelPackage = "linux-image-cloud-amd64"

// Kernel is an unpacked Debian kernel package.
type Kernel struct {
	// Package and Version name the Debian package, e.g.
	// linux-image-6.1.0-56-cloud-amd64 6.1.192-2.
	Package, Version string
	// Release is the kernel release (uname -r), e.g. 6.1.0-56-cloud-amd64.
	Release string
	// Image is the bootable kernel (bzImage).
	Image string
	// ModulesDir is lib/modules/<Release> of the unpacked package.
	ModulesDir string
}

// FetchKernel returns the cloud kernel unpacked under dataDir/kernels,
// downloading it with apt-get when that version is not there yet. Progress
// lines go to progress (nil discards them).
func FetchKernel(ctx context.Context, dataDir string, progress io.Writer) (*Kernel, error) {
	if progress == nil {
		progress = io.Discard
	}
	root := filepath.Join(dataDir, "kernels")
	pkg, version, err := resolveKernel(ctx)
	if err != nil {
		// No package lists (a fresh machine) or an offline one: a kernel
		// fetched before still boots; otherwise refresh the lists once.
		if k, cerr := newestCached(root); cerr == nil {
			fmt.Fprintf(progress, "guest: cannot resolve %s (%v); using cached %s %s\n", KernelPackage, err, k.Package, k.Version)
			return k, nil
		}
		fmt.Fprintf(progress, "guest: cannot resolve %s (%v); running apt-get update\n", KernelPackage, err)
		if err := aptUpdate(ctx); err != nil {
			return nil, err
		}
		if pkg, version, err = resolveKernel(ctx); err != nil {
			return nil, err
		}
	}
	dir := filepath.Join(root, pkg+"_"+version)
	if k, err := openKernel(dir); err == nil {
		return k, nil
	}
	fmt.Fprintf(progress, "guest: fetching %s %s into %s\n", pkg, version, root)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	// Download and unpack beside the final directory, then rename: a
	// directory named for a version is always complete.
	tmp, err := os.MkdirTemp(root, ".fetch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	deb, err := download(ctx, tmp, pkg, version)
	if err != nil {
		// The lists may name a version the mirror has since dropped.
		fmt.Fprintf(progress, "guest: %v; running apt-get update and retrying\n", err)
		if uerr := aptUpdate(ctx); uerr != nil {
			return nil, errors.Join(err, uerr)
		}
		if pkg, version, err = resolveKernel(ctx); err != nil {
			return nil, err
		}
		dir = filepath.Join(root, pkg+"_"+version)
		if deb, err = download(ctx, tmp, pkg, version); err != nil {
			return nil, err
		}
	}
	unpacked := filepath.Join(tmp, "root")
	if err := run(ctx, "dpkg-deb", "-x", deb, unpacked); err != nil {
		return nil, err
	}
	if err := os.Rename(unpacked, dir); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("install kernel into %s: %w", dir, err)
	}
	k, err := openKernel(dir)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "guest: kernel %s ready\n", k.Release)
	return k, nil
}

// resolveKernel finds the versioned package the metapackage depends on and
// the version apt would download.
func resolveKernel(ctx context.Context) (pkg, version string, err error) {
	out, err := output(ctx, "apt-cache", "depends", "--no-recommends", "--no-suggests", KernelPackage)
	if err != nil {
		return "", "", err
	}
	for _, line := range strings.Split(out, "\n") {
		dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: ")
		if ok && strings.HasPrefix(dep, "linux-image-") {
			pkg = dep
			break
		}
	}
	if pkg == "" {
		return "", "", fmt.Errorf("apt-cache depends %s names no linux-image-* package", KernelPackage)
	}
	out, err = output(ctx, "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return "", "", err
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version: "); ok {
			return pkg, strings.TrimSpace(v), nil
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s gives no version", pkg)
}

// download fetches pkg=version into dir and returns the .deb's path.
func download(ctx context.Context, dir, pkg, version string) (string, error) {
	// apt's sandbox user _apt cannot write into a root-owned 0700 temp dir.
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg+"="+version)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s: %w: %s", pkg, version, err, bytes.TrimSpace(out))
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s=%s left %d .deb files in %s", pkg, version, len(debs), dir)
	}
	return debs[0], nil
}

func aptUpdate(ctx context.Context) error {
	return run(ctx, "apt-get", "update", "-q")
}

// openKernel reads an unpacked package directory named <package>_<version>.
func openKernel(dir string) (*Kernel, error) {
	pkg, version, ok := strings.Cut(filepath.Base(dir), "_")
	if !ok {
		return nil, fmt.Errorf("%s is not named <package>_<version>", dir)
	}
	releases, err := os.ReadDir(filepath.Join(dir, "lib", "modules"))
	if err != nil {
		return nil, err
	}
	if len(releases) != 1 {
		return nil, fmt.Errorf("%s/lib/modules holds %d releases, want 1", dir, len(releases))
	}
	release := releases[0].Name()
	k := &Kernel{
		Package:    pkg,
		Version:    version,
		Release:    release,
		Image:      filepath.Join(dir, "boot", "vmlinuz-"+release),
		ModulesDir: filepath.Join(dir, "lib", "modules", release),
	}
	if _, err := os.Stat(k.Image); err != nil {
		return nil, err
	}
	return k, nil
}

// newestCached returns the last kernel (by directory name) under root.
func newestCached(root string) (*Kernel, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	for i := len(entries) - 1; i >= 0; i-- {
		if name := entries[i].Name(); entries[i].IsDir() && !strings.HasPrefix(name, ".") {
			if k, err := openKernel(filepath.Join(root, name)); err == nil {
				return k, nil
			}
		}
	}
	return nil, fmt.Errorf("no kernel cached in %s", root)
}

func run(ctx context.Context, name string, args ...string) error {
	_, err := output(ctx, name, args...)
	return err
}

func output(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return string(out), nil
}
