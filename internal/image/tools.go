package image

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// hostTool is a program a build runs on the host and the Debian package that ships it.
type hostTool struct {
	name, pkg string
}

// debianBaseTools are the host programs BuildDebianBase runs. chroot and cp
// come with coreutils, which every Debian host has.
var debianBaseTools = []hostTool{
	{"debootstrap", "debootstrap"},
	{"mkfs.ext4", "e2fsprogs"},
	{"debugfs", "e2fsprogs"},
	{"e2fsck", "e2fsprogs"},
	{"resize2fs", "e2fsprogs"},
	{"dumpe2fs", "e2fsprogs"},
	{"chroot", "coreutils"},
	{"cp", "coreutils"},
}

// sbinDirs are searched after $PATH: the e2fsprogs tools and debootstrap live
// in sbin, which a non-login root shell or a test runner may not have on $PATH.
var sbinDirs = []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"}

// toolPaths resolves every tool to an absolute path, or fails naming the
// missing tools and the apt-get command that installs them.
func toolPaths(tools []hostTool) (map[string]string, error) {
	paths := make(map[string]string, len(tools))
	var missing, pkgs []string
	for _, t := range tools {
		p, err := lookTool(t.name)
		if err != nil {
			missing = append(missing, t.name)
			if !slices.Contains(pkgs, t.pkg) {
				pkgs = append(pkgs, t.pkg)
			}
			continue
		}
		paths[t.name] = p
	}
	if len(missing) > 0 {
		return nil, &MissingToolsError{Tools: missing, Packages: pkgs}
	}
	return paths, nil
}

// lookTool finds name on $PATH or in the sbin directories.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, d := range sbinDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found on $PATH or in %s", name, strings.Join(sbinDirs, ", "))
}

// MissingToolsError says which host programs a build needs and how to install them.
type MissingToolsError struct {
	// Tools are the missing programs.
	Tools []string
	// Packages are the Debian packages that ship them.
	Packages []string
}

// InstallCommand is the command that installs the missing tools on a Debian host.
func (e *MissingToolsError) InstallCommand() string {
	return "apt-get install -y " + strings.Join(e.Packages, " ")
}

func (e *MissingToolsError) Error() string {
	return fmt.Sprintf("building a root filesystem image needs %s, missing on this host; install with: %s",
		strings.Join(e.Tools, ", "), e.InstallCommand())
}
