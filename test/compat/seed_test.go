// Package compat holds the npm SDK compatibility suite (run.sh); these Go
// tests check the part of its shell library that guards the Go tests'
// shared cache.
package compat

import (
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// goTestCache is the Go test packages' shared cache of the guest kernel, base
// image and base builds (their cacheDir), which lib.sh seeds from.
const goTestCache = "/var/tmp/warren-test-cache"

// libSh runs script after sourcing lib.sh, with env added to the test's
// environment and the compat variables cleared unless env sets them.
func libSh(t *testing.T, env []string, script string) (string, error) {
	t.Helper()
	for _, tool := range []string{"bash", "flock", "realpath", "cp"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("lib.sh needs %s: %v", tool, err)
		}
	}
	cmd := exec.Command("bash", "-c", "set -euo pipefail; source ./lib.sh; "+script)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "WARREN_COMPAT_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestDataDirIsNotTheGoTestCache: by default compat's warren runs in a data
// directory of its own. In the Go tests' cache its store, which never knew
// the base builds the tests made there, would reset and collect them while
// a test may be restoring one.
func TestDataDirIsNotTheGoTestCache(t *testing.T) {
	out, err := libSh(t, nil, `echo "$WARREN_DATA"; echo "$WARREN_COMPAT_DATA_DIR"; echo "$WARREN_SEED_FROM"`)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 {
		t.Fatalf("lib.sh printed %q", out)
	}
	data, exported, seed := lines[0], lines[1], lines[2]
	if rel, err := filepath.Rel(goTestCache, data); err == nil && filepath.IsLocal(rel) || data == goTestCache {
		t.Errorf("compat's data dir %s is (in) the Go tests' cache %s", data, goTestCache)
	}
	if exported != data {
		t.Errorf("WARREN_COMPAT_DATA_DIR (for the tests' warren commands) is %q, want %q", exported, data)
	}
	if seed != goTestCache {
		t.Errorf("compat seeds from %q, want the Go tests' cache %s", seed, goTestCache)
	}

	// Given the cache by hand, it refuses before touching anything.
	cache := t.TempDir()
	out, err = libSh(t, []string{"WARREN_COMPAT_DATA_DIR=" + cache + "/", "WARREN_COMPAT_SEED_FROM=" + cache},
		"lock_warren_data")
	if err == nil || !strings.Contains(out, "Go tests' cache") {
		t.Errorf("lock_warren_data in the seed dir: %v, %q; want a refusal", err, out)
	}
	if _, err := os.Stat(filepath.Join(cache, "compat.lock")); err == nil {
		t.Error("the refusal left compat.lock in the cache")
	}
}

// TestSeedLinksOnlyImmutableInputs: the data dir gets hard links of the
// guest kernel and the base root image, never the cache's base builds,
// store or anything else, and the cache is left as it was. What the data
// dir has already stays its own.
func TestSeedLinksOnlyImmutableInputs(t *testing.T) {
	cache, data := t.TempDir(), filepath.Join(t.TempDir(), "compat")
	write := func(p, content string) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel := write(filepath.Join(cache, "kernels/linux-image-x_1/boot/vmlinux-x"), "kernel")
	if err := os.Symlink("vmlinux-x", filepath.Join(cache, "kernels/linux-image-x_1/boot/vmlinuz")); err != nil {
		t.Fatal(err)
	}
	write(filepath.Join(cache, "kernels/.fetch-123/root/partial"), "downloading")
	image := write(filepath.Join(cache, "templates/base/rootfs.ext4"), "image")
	manifest := write(filepath.Join(cache, "templates/base/manifest.json"), `{"recipe":1}`)
	write(filepath.Join(cache, "templates/base/.lock"), "")
	write(filepath.Join(cache, "templates/base/0123456789abcdef/artifact.json"), "{}")
	write(filepath.Join(cache, "templates/layers/h1.json"), "{}")
	write(filepath.Join(cache, "warren.db"), "store")
	before := snapshot(t, cache)

	env := []string{"WARREN_COMPAT_DATA_DIR=" + data, "WARREN_COMPAT_SEED_FROM=" + cache}
	if out, err := libSh(t, env, "lock_warren_data"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for from, to := range map[string]string{
		kernel: "kernels/linux-image-x_1/boot/vmlinux-x", image: "templates/base/rootfs.ext4", manifest: "templates/base/manifest.json",
	} {
		if !sameFile(t, from, filepath.Join(data, to)) {
			t.Errorf("%s is not a hard link of %s", to, from)
		}
	}
	if target, err := os.Readlink(filepath.Join(data, "kernels/linux-image-x_1/boot/vmlinuz")); err != nil || target != "vmlinux-x" {
		t.Errorf("the kernel's symlink: %q, %v", target, err)
	}
	got := snapshot(t, data)
	for p := range got {
		switch {
		case p == "compat.lock", strings.HasPrefix(p, "kernels/linux-image-x_1"), p == "kernels",
			p == "templates", p == "templates/base", p == "templates/base/rootfs.ext4", p == "templates/base/manifest.json":
		default:
			t.Errorf("seeded %s, want only the kernel and the base image", p)
		}
	}
	if after := snapshot(t, cache); !maps.Equal(before, after) {
		t.Errorf("seeding changed the cache:\nbefore %v\nafter  %v", before, after)
	}

	// A later run keeps what the data dir has made its own (its warren
	// replaced the image, say, with its envd).
	own := write(filepath.Join(data, "templates/base/manifest.json.new"), `{"recipe":1,"envd":"own"}`)
	if err := os.Rename(own, filepath.Join(data, "templates/base/manifest.json")); err != nil {
		t.Fatal(err)
	}
	if out, err := libSh(t, env, "lock_warren_data"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(data, "templates/base/manifest.json")); string(b) != `{"recipe":1,"envd":"own"}` {
		t.Errorf("a second seeding replaced the data dir's own manifest: %s", b)
	}
}

// TestSeedWithoutBaseImage: a cache without a base image seeds nothing of
// it; compat's warren builds its own.
func TestSeedWithoutBaseImage(t *testing.T) {
	cache, data := t.TempDir(), filepath.Join(t.TempDir(), "compat")
	env := []string{"WARREN_COMPAT_DATA_DIR=" + data, "WARREN_COMPAT_SEED_FROM=" + cache}
	if out, err := libSh(t, env, "lock_warren_data"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, p := range []string{"kernels", "templates/base/manifest.json", "templates/base/rootfs.ext4"} {
		if _, err := os.Lstat(filepath.Join(data, p)); err == nil {
			t.Errorf("%s seeded from an empty cache", p)
		}
	}
}

// snapshot lists the tree under root: each path with its inode, mode, size
// and modification time.
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		out[rel] = fmt.Sprintf("%s %s inode %d, %d bytes", fi.Mode(), fi.ModTime(), fi.Sys().(*syscall.Stat_t).Ino, fi.Size())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err := os.Stat(a)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false
	}
	return os.SameFile(fa, fb)
}
