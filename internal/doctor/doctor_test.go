package doctor

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	intelHW = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae vmx ssse3 sse4_1\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
	amdHW   = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme de svm sse4a\n"
	noVirt  = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae hypervisor\n"
)

func TestClassifyKVM(t *testing.T) {
	noDev := &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrNotExist}
	for _, tc := range []struct {
		name   string
		facts  KVMFacts
		kind   KVMKind
		status Status
		detail string // a phrase the detail must hold
		fix    string // a phrase the fix must hold; "" for no fix
	}{
		{"intel vmx and /dev/kvm", KVMFacts{CPUInfo: intelHW}, KVMHardware, OK, "microVMs run under KVM", ""},
		{"amd svm and /dev/kvm", KVMFacts{CPUInfo: amdHW}, KVMHardware, OK, "hardware", ""},
		{"kvm_pvm module, no vmx", KVMFacts{CPUInfo: noVirt, PVMModule: true}, KVMParavirtual, Warn, "cannot run a stock guest kernel", "VT-x/AMD-V"},
		{"kvm-pvm in the kernel log", KVMFacts{CPUInfo: noVirt, KernelLog: "[    1.2] kvm-pvm: loaded\n"}, KVMParavirtual, Warn, "TCG", "nested virtualization"},
		{"kvm_pvm beside vmx", KVMFacts{CPUInfo: intelHW, PVMModule: true}, KVMParavirtual, Warn, "several times slower", "VT-x"},
		{"/dev/kvm without vmx/svm", KVMFacts{CPUInfo: noVirt}, KVMParavirtual, Warn, "no vmx/svm", "VT-x"},
		{"vmx but no /dev/kvm", KVMFacts{CPUInfo: intelHW, DevKVM: noDev}, KVMNone, Warn, "/dev/kvm", "modprobe kvm_intel"},
		{"nothing", KVMFacts{CPUInfo: noVirt, DevKVM: noDev}, KVMNone, Warn, "TCG", "firmware"},
		{"unreadable cpuinfo", KVMFacts{DevKVM: noDev}, KVMNone, Warn, "no vmx/svm", "firmware"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, c := ClassifyKVM(tc.facts)
			if kind != tc.kind || c.Status != tc.status || !strings.Contains(c.Detail, tc.detail) {
				t.Errorf("got %s, %+v; want %s, %s, detail with %q", kind, c, tc.kind, tc.status, tc.detail)
			}
			if (tc.fix == "") != (c.Fix == "") || !strings.Contains(c.Fix, tc.fix) {
				t.Errorf("fix %q, want one with %q", c.Fix, tc.fix)
			}
		})
	}
}

func TestClassifyQEMU(t *testing.T) {
	const version = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard\n"
	const machines = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC\n"
	for _, tc := range []struct {
		name, version, machines string
		status                  Status
		detail                  string
	}{
		{"debian qemu", version, machines, OK, "QEMU 7.2.22 (Debian"},
		{"no microvm", version, "Supported machines are:\npc   Standard PC\nmicrovm-like x\n", Fail, "no microvm machine"},
		{"garbage", "hello\n", machines, Fail, "not a version"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := classifyQEMU(tc.version, tc.machines)
			if c.Status != tc.status || !strings.Contains(c.Detail, tc.detail) || (c.Status != OK) == (c.Fix == "") {
				t.Errorf("got %+v; want %s with %q and a fix unless OK", c, tc.status, tc.detail)
			}
		})
	}
}

func TestClassifyKernel(t *testing.T) {
	const policy = "linux-image-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n     6.1.192-2 500\n"
	const none = "linux-image-cloud-amd64:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n"
	cached := []string{"/d/kernels/linux-image-6.1.0-56-cloud-amd64_6.1.192-2/boot/vmlinux-6.1.0-56-cloud-amd64"}
	for _, tc := range []struct {
		name   string
		cached []string
		policy string
		err    error
		status Status
		detail string
		fix    string
	}{
		{"cached", cached, "", nil, OK, "cached: linux-image-6.1.0-56-cloud-amd64_6.1.192-2", ""},
		{"fetchable", nil, policy, nil, OK, "6.1.192-2 is fetched on first start", ""},
		{"no candidate", nil, none, nil, Fail, "no candidate", "apt-get update"},
		{"empty policy (unknown package)", nil, "", nil, Fail, "no candidate", "apt-get update"},
		{"no apt", nil, "", errors.New(`exec: "apt-cache": executable file not found in $PATH`), Fail, "apt-cache failed", "Debian 12"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := classifyKernel("/d", tc.cached, tc.policy, tc.err)
			if c.Status != tc.status || !strings.Contains(c.Detail, tc.detail) || !strings.Contains(c.Fix, tc.fix) || (tc.fix == "") != (c.Fix == "") {
				t.Errorf("got %+v; want %s, detail with %q, fix with %q", c, tc.status, tc.detail, tc.fix)
			}
		})
	}
}

func TestClassifyNetwork(t *testing.T) {
	eperm := errors.New("unshare(CLONE_NEWNET): operation not permitted")
	for _, tc := range []struct {
		name   string
		got    Check
		status Status
		fix    string
	}{
		{"netns ok", classifyNetns(nil), OK, ""},
		{"netns refused", classifyNetns(eperm), Fail, "CAP_SYS_ADMIN"},
		{"nftables ok", classifyNftables(nil, nil), OK, ""},
		{"nftables refused", classifyNftables(nil, errors.New("protocol not supported")), Fail, "modprobe nf_tables"},
		{"nftables unchecked", classifyNftables(eperm, nil), Fail, "network namespaces first"},
		{"forwarding on", classifyIPForward("1\n", nil), OK, ""},
		{"forwarding off", classifyIPForward("0\n", nil), Warn, "net.ipv4.ip_forward=1"},
		{"forwarding unreadable", classifyIPForward("", fs.ErrNotExist), Fail, "Linux"},
		{"no DROP policy", classifyForwardPolicy(nil), OK, ""},
		{"docker's DROP policy", classifyForwardPolicy([]string{"iptables-nft"}), Warn, "DOCKER-USER"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got.Status != tc.status || !strings.Contains(tc.got.Fix, tc.fix) || (tc.fix == "") != (tc.got.Fix == "") {
				t.Errorf("got %+v; want %s with a fix holding %q", tc.got, tc.status, tc.fix)
			}
		})
	}
}

func TestForwardPolicyDrop(t *testing.T) {
	for rules, want := range map[string]bool{
		"-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n": true,
		"-P FORWARD ACCEPT\n":                          false,
		"-P FORWARD ACCEPT\n-A FORWARD -j DROP\n":      false, // a rule, not the policy
		"": false,
	} {
		if got := forwardPolicyDrop(rules); got != want {
			t.Errorf("forwardPolicyDrop(%q) = %v, want %v", rules, got, want)
		}
	}
}

func TestClassifyDisk(t *testing.T) {
	for _, tc := range []struct {
		free   uint64
		status Status
	}{
		{100 << 30, OK},
		{MinFreeDisk, OK},
		{MinFreeDisk - 1, Warn},
		{1 << 30, Warn},
	} {
		c := classifyDisk("/d", tc.free)
		if c.Status != tc.status || (c.Status == Warn) != (c.Fix != "") {
			t.Errorf("free %d bytes: %+v, want %s", tc.free, c, tc.status)
		}
	}
}

func TestCheckDataDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a read-only directory is writable for root only when checked as root")
	}
	tmp := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		p := filepath.Join(tmp, name)
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode) // past the umask
		return p
	}
	file := filepath.Join(tmp, "file")
	os.WriteFile(file, nil, 0o600)
	for _, tc := range []struct {
		name, dir string
		status    Status
		fix       string
	}{
		{"private dir", mk("private", 0o700), OK, ""},
		{"missing", filepath.Join(tmp, "missing"), Warn, "mkdir -p -m 0700"},
		{"world-writable", mk("open", 0o777), Fail, "chmod o-w"},
		{"sticky world-writable", mk("sticky", 0o1777), Fail, "chmod o-w"},
		{"a file", file, Fail, "another --data-dir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := checkDataDir(tc.dir)
			if c.Status != tc.status || !strings.Contains(c.Fix, tc.fix) || (tc.fix == "") != (c.Fix == "") {
				t.Errorf("got %+v; want %s with a fix holding %q", c, tc.status, tc.fix)
			}
		})
	}
	t.Run("leaves nothing behind", func(t *testing.T) {
		dir := mk("clean", 0o700)
		checkDataDir(dir)
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("the write probe left %v", entries)
		}
	})
}

func TestClassifyBuildTools(t *testing.T) {
	if c := classifyBuildTools(nil); c.Status != OK {
		t.Errorf("nothing missing: %+v", c)
	}
	c := classifyBuildTools([]string{"debootstrap", "mkfs.ext4", "e2fsck"})
	if c.Status != Fail || c.Fix != "apt-get install -y debootstrap e2fsprogs" {
		t.Errorf("missing tools: %+v; want FAIL with one apt-get naming each package once", c)
	}
}

func TestCheckRoot(t *testing.T) {
	if c := checkRoot(0); c.Status != OK {
		t.Errorf("uid 0: %+v", c)
	}
	if c := checkRoot(1000); c.Status != Fail || !strings.Contains(c.Fix, "sudo") {
		t.Errorf("uid 1000: %+v", c)
	}
}

// TestRunOnThisHost runs every real check. The KVM kind must be paravirtual
// exactly where the kvm_pvm module is loaded (these development machines);
// elsewhere it must not be.
func TestRunOnThisHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the network checks need root")
	}
	dataDir := t.TempDir()
	r := Run(context.Background(), dataDir)
	var text strings.Builder
	r.WriteText(&text)
	t.Logf("\n%s", text.String())

	_, pvmErr := os.Stat("/sys/module/kvm_pvm")
	pvm := pvmErr == nil
	if pvm && r.KVM != KVMParavirtual {
		t.Errorf("KVM kind %s, want paravirtual: /sys/module/kvm_pvm exists", r.KVM)
	}
	for _, c := range r.Checks {
		if c.Name == "kvm" && strings.Contains(c.Detail, "kvm-pvm") && !pvm && !strings.Contains(kernelLog(), "kvm-pvm") {
			t.Errorf("kvm check claims kvm-pvm without the module or a kernel log line: %+v", c)
		}
	}
	want := map[string]Status{"root": OK, "network namespaces": OK, "nftables": OK, "data dir": OK}
	seen := map[string]bool{}
	for _, c := range r.Checks {
		if seen[c.Name] {
			t.Errorf("check %s reported twice", c.Name)
		}
		seen[c.Name] = true
		if c.Status != OK && c.Fix == "" {
			t.Errorf("%s is %s without a fix: %+v", c.Name, c.Status, c)
		}
		if w, ok := want[c.Name]; ok && c.Status != w {
			t.Errorf("%s: %+v, want %s", c.Name, c, w)
		}
	}
	for _, name := range []string{"root", "qemu", "qemu-img", "guest kernel", "kvm", "network namespaces", "nftables",
		"ip_forward", "iptables FORWARD", "data dir", "disk", "image tools"} {
		if !seen[name] {
			t.Errorf("no %s check", name)
		}
	}
	if entries, _ := os.ReadDir(dataDir); len(entries) != 0 {
		t.Errorf("doctor left %v in the data dir", entries)
	}
}

func TestClassifyStorage(t *testing.T) {
	c := classifyStorage(map[string]int64{"paused": 3 << 30, "snapshots": 5 << 20, "templates": 2 << 30, "layer cache": 512 << 20})
	if c.Status != OK {
		t.Errorf("status %s", c.Status)
	}
	for _, want := range []string{"paused 3.0 GiB", "snapshots 5.0 MiB", "forks 0 B", "templates 2.0 GiB", "layer cache 512.0 MiB", "images 0 B"} {
		if !strings.Contains(c.Detail, want) {
			t.Errorf("detail %q lacks %q", c.Detail, want)
		}
	}
}

func TestCheckStorageCountsBlobs(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "blobs", "paused", "ia", "vm")
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, "state"), make([]byte, 3<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	c := checkStorage(t.Context(), dir)
	if !strings.Contains(c.Detail, "paused 3.0 MiB") {
		t.Errorf("detail %q does not count the paused sandbox's 3 MiB", c.Detail)
	}
}
