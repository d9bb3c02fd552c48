package bench_test

import (
	"encoding/json"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/warren-sh/warren/internal/bench"
)

// testCache is the data dir the VM tests share (guest kernel, base image):
// the bench's data dir is seeded from it, so no test downloads them again.
const testCache = "/var/tmp/warren-test-cache"

// TestWarrenBench runs `warren bench` end to end with small counts: the
// binary built from this tree, real microVMs (TCG here), the npm SDK. It
// takes a few minutes and the host's network slots.
func TestWarrenBench(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: warren bench boots microVMs in network namespaces: run as root")
	}
	for _, tool := range []string{"node", "npm", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPED: warren bench needs %s (make setup-test): %v", tool, err)
		}
	}
	bin := t.TempDir()
	for _, b := range []struct{ name, pkg, cgo string }{{"warren", "./cmd/warren", ""}, {"envd", "./cmd/envd", "CGO_ENABLED=0"}} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(bin, b.name), b.pkg)
		cmd.Dir = "../.."
		cmd.Env = append(os.Environ(), b.cgo)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", b.name, err, out)
		}
	}
	sdkDir, err := filepath.Abs("../../test/compat")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	dataDir := "/var/tmp/warren-bench-test" // kept: its base build is reused by the next run
	cmd := exec.CommandContext(t.Context(), filepath.Join(bin, "warren"), "bench",
		"--data-dir", dataDir, "--seed-from", testCache, "--sdk-dir", sdkDir, "--envd", filepath.Join(bin, "envd"),
		"--tti", "3", "--burst", "2", "--rtt", "20", "--density", "3", "--idle", "2s", "--pause", "1",
		"--no-large-files", "--out", out)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	t.Logf("warren bench output:\n%s", stderr.String())
	if err != nil {
		t.Fatalf("warren bench: %v", err)
	}

	report, err := os.ReadFile(filepath.Join(out, bench.ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout.String(), "## Summary") {
		t.Errorf("stdout is not the report:\n%s", stdout.String())
	}
	t.Logf("report:\n%s", report)
	num := `[0-9]+(\.[0-9]+)?`
	for _, want := range []string{
		`\| accelerator \| (TCG|KVM)`,
		`\| TTI p50 on a pool miss .* \| ` + num + ` \| ` + num + ` \(raw clone: restore ` + num + ` \+ its first echo ` + num + `; echo on a warm sandbox ` + num + `\) \| ` + num + `× \| .* \| (PASS|MISS) \|`,
		"\\| floor: the raw clone's first `echo ready` \\(straight to envd\\) \\| 3 \\| " + num,
		// The warm pool refills between the hit creates: at least one claims.
		`\| TTI p50 on a pool hit \([1-3] of 3 creates claimed a warm VM\) \| ` + num + ` \| .* \| (PASS|MISS) \|`,
		`\| TTI p90, burst of 2 \| ` + num + ` \| .* \| (PASS|MISS) \|`,
		`\| TTI, serial, pool miss \| 3 \| ` + num + ` \|`,
		`\| TTI, burst of 2 \| 2 \| ` + num + ` \|`,
		"\\| `commands.run\\('echo ready'\\)` on a warm sandbox \\| 20 \\| " + num,
		"\\| floor: raw clone restore → envd `/health` \\| 3 \\| " + num,
		`\|   before warren started \| 2 \| ` + num,
		`\|   after warren stopped \| 1 \| ` + num,
		"\\| `commands.run\\('true'\\)` \\| 20 \\| " + num,
		"\\| floor: `GET /health` through warren \\| 20 \\| " + num,
		"\\| floor: `bash -l -c true` in the guest \\| 20 \\| " + num,
		"\\| `files.write` \\(ArrayBuffer, multipart\\) \\| 1 MiB \\| 20 \\| " + num + ` \| ` + num + ` \| ` + num + ` \| ` + num + `% \|`,
		"\\| `files.read` \\(`files.read` format stream\\) \\| 1 MiB \\| 20 \\| " + num,
		`\| sandboxes started \| 3 of 3 \|`,
		`\| PSS per sandbox, p50 / max \| ` + num + ` / ` + num + ` MiB \|`,
		`\| MemAvailable drop per sandbox \| -?` + num + ` MiB \|`,
		`\| idle .base. sandboxes on 24 GiB .* \| ` + num + ` \| .* \| (PASS|MISS) \|`,
		`## Pause and resume\n\n(Not supported by this server: .*|.*\n\n\| \| n \| p50 .*\n.*\n\| .pause\(\). \| 1 \| ` + num + `)`,
		`!\[TTI distribution\]\(tti.png\)`,
	} {
		if !regexp.MustCompile(want).Match(report) {
			t.Errorf("report has no line matching %s", want)
		}
	}

	f, err := os.Open(filepath.Join(out, bench.PlotFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg, err := png.DecodeConfig(f)
	if err != nil || cfg.Width < 400 || cfg.Height < 300 {
		t.Errorf("tti.png: %+v, %v; want a PNG plot", cfg, err)
	}

	raw, err := os.ReadFile(filepath.Join(out, bench.ResultsFile))
	if err != nil {
		t.Fatal(err)
	}
	var res bench.Results
	if err := json.Unmarshal(raw, &res); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	for _, c := range []struct {
		name      string
		got, want int
	}{
		{"restore floor", len(res.RestoreFloor), 3}, {"first command in a raw clone", len(res.FirstCommand), 3},
		{"serial TTI", len(res.SDK.TTI.Serial), 3},
		{"burst TTI", len(res.SDK.TTI.Burst), 2}, {"round trips", len(res.SDK.RTT.Command), 20},
		{"density PSS", len(res.Density.PSS), 3},
	} {
		if c.got != c.want {
			t.Errorf("results.json: %d %s samples, want %d", c.got, c.name, c.want)
		}
	}

	// Nothing is left running: warren killed its sandboxes on the way out.
	if left := qemuUnder(t, filepath.Join(dataDir, "vms")); len(left) > 0 {
		t.Errorf("QEMU processes still run from the bench's data dir: %v", left)
	}
}

func qemuUnder(t *testing.T, root string) []string {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var out []string
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err == nil && strings.Contains(string(b), "qemu-system") && strings.Contains(string(b), root+"/") {
			out = append(out, fmt.Sprintf("%s: %s", d, strings.ReplaceAll(string(b), "\x00", " ")))
		}
	}
	return out
}
