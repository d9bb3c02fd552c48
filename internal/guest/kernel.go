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
	// Image is the uncompressed kernel (vmlinux, an ELF with a PVH entry
	// point), unpacked from the package's bzImage: QEMU boots it directly,
	// which spares the guest decompressing itself under emulation.
	Image string
	// ModulesDir is lib/modules/<Release> of the unpacked package.
	ModulesDir string
}

// FetchKernel returns the cloud kernel unpacked under dataDir/kernels. The
// first call downloads the current one with apt-get; later calls reuse it
// without asking apt, so the guest kernel (which snapshots depend on) changes
// only when dataDir/kernels is removed. Progress lines go to progress (nil
// discards them).
func FetchKernel(ctx context.Context, dataDir string, progress io.Writer) (*Kernel, error) {
	if progress == nil {
		progress = io.Discard
	}
	root := filepath.Join(dataDir, "kernels")
	if k, err := cachedKernel(root); err == nil {
		return k, nil
	}
	pkg, version, err := resolveKernel(ctx)
	if err != nil {
		// A fresh machine may have no package lists yet.
		fmt.Fprintf(progress, "guest: %v; running apt-get update\n", err)
		if err := aptUpdate(ctx); err != nil {
			return nil, err
		}
		if pkg, version, err = resolveKernel(ctx); err != nil {
			return nil, err
		}
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
		if deb, err = download(ctx, tmp, pkg, version); err != nil {
			return nil, err
		}
	}
	unpacked := filepath.Join(tmp, "root")
	if err := run(ctx, "dpkg-deb", "-x", deb, unpacked); err != nil {
		return nil, err
	}
	dir := filepath.Join(root, pkg+"_"+version)
	if err := os.Rename(unpacked, dir); err != nil {
		// A concurrent FetchKernel (another process) may have won the race.
		if k, kerr := openKernel(dir); kerr == nil {
			return k, nil
		}
		return nil, fmt.Errorf("install kernel into %s: %w", dir, err)
	}
	k, err := openKernel(dir)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "guest: kernel %s ready\n", k.Release)
	return k, nil
}

// resolveKernel finds the versioned package the metapackage depends on, and
// its version, from the metapackage's record: Debian's metapackage pins it
// ("Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"). One apt-cache
// call: without a binary cache each call parses every package list (~1.5 s).
func resolveKernel(ctx context.Context) (pkg, version string, err error) {
	out, err := output(ctx, "apt-cache", "show", "--no-all-versions", KernelPackage)
	if err != nil {
		return "", "", err
	}
	for _, line := range strings.Split(out, "\n") {
		deps, ok := strings.CutPrefix(line, "Depends: ")
		if !ok {
			continue
		}
		for _, dep := range strings.Split(deps, ",") {
			// "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
			name, constraint, _ := strings.Cut(strings.TrimSpace(dep), " ")
			v, pinned := strings.CutPrefix(constraint, "(= ")
			if strings.HasPrefix(name, "linux-image-") && pinned {
				return name, strings.TrimSuffix(v, ")"), nil
			}
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s names no linux-image-* package pinned with (= version)", KernelPackage)
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

// openKernel reads an unpacked package directory named <package>_<version>,
// unpacking vmlinux from the bzImage the first time.
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
		Image:      filepath.Join(dir, "boot", "vmlinux-"+release),
		ModulesDir: filepath.Join(dir, "lib", "modules", release),
	}
	if _, err := os.Stat(k.Image); err == nil {
		return k, nil
	}
	if err := extractVmlinux(filepath.Join(dir, "boot", "vmlinuz-"+release), k.Image); err != nil {
		return nil, err
	}
	return k, nil
}

// cachedKernel returns the kernel a previous FetchKernel unpacked under root.
func cachedKernel(root string) (*Kernel, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var found []*Kernel
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			if k, err := openKernel(filepath.Join(root, e.Name())); err == nil {
				found = append(found, k)
			}
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no kernel cached in %s", root)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("%d kernels cached in %s; keep one", len(found), root)
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
