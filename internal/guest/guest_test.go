package guest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// kernelCache is shared with internal/runtime/microvm's boot test: the kernel
// is fetched once per machine, not once per test run.
const kernelCache = "/var/tmp/warren-test-cache"

// fetchKernel fetches (or reuses) the real Debian kernel; it needs apt-get,
// dpkg-deb and Debian's archive.
func fetchKernel(t *testing.T) *Kernel {
	t.Helper()
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: this needs a Debian host with apt and dpkg", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	k, err := FetchKernel(ctx, kernelCache, &progress)
	if err != nil {
		t.Fatalf("FetchKernel: %v\n%s", err, progress.String())
	}
	return k
}

// TestFetchKernel downloads into a fresh data dir (~27 MB from Debian's
// archive, a few seconds) so the apt path runs every time, then checks that a
// second call reuses it.
func TestFetchKernel(t *testing.T) {
	dataDir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Two first calls at once (two test binaries sharing a cache): both must
	// succeed with the same kernel.
	var (
		kernels  [2]*Kernel
		errs     [2]error
		progress [2]bytes.Buffer
		wg       sync.WaitGroup
	)
	for i := range kernels {
		wg.Go(func() { kernels[i], errs[i] = FetchKernel(ctx, dataDir, &progress[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("FetchKernel #%d: %v\n%s", i, err, progress[i].String())
		}
	}
	k := kernels[0]
	if *kernels[1] != *k {
		t.Errorf("concurrent FetchKernel calls returned %+v and %+v", k, kernels[1])
	}
	if !strings.Contains(progress[0].String()+progress[1].String(), "fetching "+k.Package) {
		t.Errorf("first FetchKernel reported %q, want a fetch of %s", progress[0].String(), k.Package)
	}
	if !strings.HasPrefix(k.Package, "linux-image-") || !strings.HasSuffix(k.Release, "-cloud-amd64") {
		t.Errorf("kernel %+v is not a cloud-amd64 linux-image package", k)
	}
	if img, err := os.ReadFile(k.Image); err != nil {
		t.Error(err)
	} else if err := checkPVH(img); err != nil {
		t.Errorf("kernel image %s: %v; want an ELF vmlinux with a PVH entry", k.Image, err)
	}
	if !strings.HasPrefix(k.Image, dataDir+"/") || !strings.HasPrefix(k.ModulesDir, dataDir+"/") {
		t.Errorf("kernel %+v lies outside the data dir %s", k, dataDir)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dataDir, "kernels", ".fetch-*")); len(leftovers) > 0 {
		t.Errorf("download leftovers %v", leftovers)
	}

	// A second call reuses the unpacked kernel: no download, same files.
	var quiet bytes.Buffer
	before, err := os.Stat(k.Image)
	if err != nil {
		t.Fatal(err)
	}
	again, err := FetchKernel(ctx, dataDir, &quiet)
	if err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(again.Image)
	if err != nil {
		t.Fatal(err)
	}
	if *again != *k || !os.SameFile(before, after) || quiet.Len() != 0 {
		t.Errorf("second FetchKernel = %+v (progress %q), want the cached %+v without fetching", again, quiet.String(), k)
	}
}

func TestModuleOrder(t *testing.T) {
	k := fetchKernel(t)
	mods, err := ModuleOrder(k.ModulesDir, Modules)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range mods {
		names = append(names, m.Name)
	}
	// The set the microvm needs on Debian 6.1; their order comes from depends=.
	for _, want := range []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net"} {
		if !slices.Contains(names, want) {
			t.Errorf("order %v lacks %s", names, want)
		}
	}
	for i, m := range mods {
		for _, dep := range m.Depends {
			if j := slices.Index(names, dep); j < 0 || j > i {
				t.Errorf("%s comes at %d but its dependency %s at %d: %v", m.Name, i, dep, j, names)
			}
		}
	}
	if _, err := ModuleOrder(k.ModulesDir, []string{"no_such_module"}); err == nil || !strings.Contains(err.Error(), "no_such_module") {
		t.Errorf("ModuleOrder of a missing module: err = %v, want one naming it", err)
	}
}

// TestBuildInitramfs unpacks the archive with busybox's cpio, an independent
// reader of the newc format, and checks every entry.
func TestBuildInitramfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("unpacking /dev/console (a device node) needs root")
	}
	if _, err := exec.LookPath("busybox"); err != nil {
		t.Fatal("busybox is missing; install with: apt-get install -y busybox-static")
	}
	k := fetchKernel(t)
	dir := t.TempDir()
	envd := filepath.Join(dir, "fake-envd")
	// Odd length: exercises the 4-byte padding after file data.
	envdContent := []byte("#!/bin/sh\necho not really envd\n!")
	if err := os.WriteFile(envd, envdContent, 0o700); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "initramfs.cpio")
	if err := BuildInitramfs(k, envd, out); err != nil {
		t.Fatal(err)
	}

	root := filepath.Join(dir, "unpacked")
	os.Mkdir(root, 0o755)
	archive, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer archive.Close()
	cmd := exec.Command("busybox", "cpio", "-i", "-d")
	cmd.Dir, cmd.Stdin = root, archive
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("busybox cpio -i: %v\n%s", err, b)
	}

	if got, err := os.ReadFile(filepath.Join(root, "init")); err != nil || !bytes.Equal(got, envdContent) {
		t.Errorf("/init = %q, %v; want the envd binary", got, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "init")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("/init mode: %v %v, want 0755", fi.Mode(), err)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(root, "dev/console"), &st); err != nil ||
		st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 5 || unix.Minor(st.Rdev) != 1 {
		t.Errorf("/dev/console: %v, mode %o rdev %d:%d; want char device 5:1", err, st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	for _, d := range []string{"dev", "proc", "sys", "newroot"} {
		if fi, err := os.Stat(filepath.Join(root, d)); err != nil || !fi.IsDir() {
			t.Errorf("/%s: %v, want a directory", d, err)
		}
	}
	order, err := os.ReadFile(filepath.Join(root, "lib/modules/order"))
	if err != nil {
		t.Fatal(err)
	}
	mods, err := ModuleOrder(k.ModulesDir, Modules)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, m := range mods {
		want = append(want, m.Name)
		got, err := os.ReadFile(filepath.Join(root, "lib/modules", m.Name+".ko"))
		orig, _ := os.ReadFile(m.Path)
		if err != nil || !bytes.Equal(got, orig) {
			t.Errorf("module %s in the archive differs from %s (%v)", m.Name, m.Path, err)
		}
	}
	if got := strings.Fields(string(order)); !slices.Equal(got, want) {
		t.Errorf("lib/modules/order = %v, want %v", got, want)
	}
}

// TestUnlz4Corrupt feeds the decompressor damaged kernels: it must report an
// error, never panic, loop or return a wrong kernel.
func TestUnlz4Corrupt(t *testing.T) {
	k := fetchKernel(t)
	img, err := os.ReadFile(filepath.Join(filepath.Dir(k.Image), "vmlinuz-"+k.Release))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := bzPayload(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decompressPayload(payload); err != nil {
		t.Fatalf("the intact payload: %v", err)
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"truncated inside the first block", payload[:len(payload)/3]},
		{"a block size past the end", append(slices.Clone(payload[:4]), 0xff, 0xff, 0xff, 0x7f, 1, 2, 3)},
		{"garbage after the magic", append(slices.Clone(payload[:4]), 16, 0, 0, 0, 0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)},
		{"a match before the block start", append(slices.Clone(payload[:4]), 4, 0, 0, 0, 0x10, 'a', 9, 0)},
		{"not lz4", []byte("hello, world")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if out, err := decompressPayload(tt.data); err == nil {
				t.Errorf("decompressPayload of damaged data gave %d bytes and no error", len(out))
			}
		})
	}
}
