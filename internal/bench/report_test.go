package bench

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"strings"
	"testing"
	"time"
)

// sample is a complete result as a run would produce, with round numbers.
func sample() *Results {
	r := &Results{Started: time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC), Duration: 5 * time.Minute}
	r.Machine = Machine{CPUModel: "Test CPU", Cores: 2, MemTotalMiB: 24 << 10, Kernel: "6.1.0", OS: "Debian 12",
		Accel: "tcg", AccelWhy: "no vmx/svm", QEMU: "7.2.22", Node: "v20.20.2", Go: "go1.26", LoadBefore: "0.5 0.4 0.3", LoadAfter: "1 1 1"}
	r.Base.BuildID, r.Base.CPUs, r.Base.MemoryMiB = "0123456789abcdef", 2, 512
	r.Counts.Warmup, r.Counts.TTI, r.Counts.Burst, r.Counts.RTT, r.Counts.Density, r.Counts.Pause = 1, 4, 3, 5, 2, 1
	r.RestoreFloor, r.RestoreFloorBefore = []float64{200, 210, 220, 230}, 2
	r.FirstCommand = []float64{10, 12, 14, 16}
	s := &SDKResults{}
	s.TTI.Serial = []float64{300, 310, 320, 330}
	s.TTI.SerialCreate = []float64{280, 290, 300, 310}
	s.TTI.Echo = []float64{10, 12, 11}
	s.TTI.Hit, s.TTI.HitCreate, s.TTI.HitMissed = []float64{30, 32, 34}, []float64{18, 20, 22}, []float64{300}
	s.TTI.Burst = []float64{600, 700, 800}
	s.TTI.BurstCreate = []float64{580, 680, 780}
	s.RTT.Command = []float64{10, 11, 12, 13, 40}
	s.RTT.Health = []float64{2, 2, 3, 3, 9}
	s.RTT.Guest = []float64{5, 5, 6, 6, 7}
	mib := int64(1 << 20)
	s.Files = []FileResult{
		{Name: "upload", Bytes: mib, Ms: []float64{10, 10}},
		{Name: "loopback-upload", Bytes: mib, Ms: []float64{5, 5}},
		{Name: "upload", Bytes: 100 * mib, Ms: []float64{1000, 1000}},          // 100 MiB/s
		{Name: "upload-stream", Bytes: 100 * mib, Ms: []float64{500, 500}},     // 200 MiB/s
		{Name: "download", Bytes: 100 * mib, Ms: []float64{400, 400}},          // 250 MiB/s
		{Name: "loopback-upload", Bytes: 100 * mib, Ms: []float64{400, 400}},   // 250 MiB/s
		{Name: "loopback-download", Bytes: 100 * mib, Ms: []float64{250, 250}}, // 400 MiB/s
	}
	s.Pause = &PauseResult{Supported: false, Error: "SandboxNotFoundError: 404"}
	r.SDK = s
	r.Density = &DensityResult{Asked: 2, Started: 2, Idle: 10 * time.Second, MemAvailableBeforeMiB: 20000,
		MemAvailableAfterMiB: 19920, PSS: []float64{40, 44}, RSS: []float64{88, 90}, IdleCPU: []float64{120, 130}, CreateMs: []float64{300, 320}}
	return r
}

func TestChecks(t *testing.T) {
	checks := map[string]Check{}
	for _, c := range sample().Checks() {
		checks[c.Metric] = c
	}
	for _, tc := range []struct {
		metric, measured, result string
	}{
		// 1.3 × restore p50 210 + first echo p50 12 = 285 < serial p50 310.
		{"TTI p50 on a pool miss (serial, the warm pool emptied)", "310", "MISS"},
		// 1.2 × echo p50 11 + 20 = 33.2 ≥ hit p50 32.
		{"TTI p50 on a pool hit (3 of 4 creates claimed a warm VM)", "32.0", "PASS"},
		// 3 × 310 = 930 ≥ burst p90 800.
		{"TTI p90, burst of 3", "800", "PASS"},
		{"`commands.run('true')` p50", "12.0", "—"},
		// 100 of 250 MiB/s is 40%; 200 of 250 is 80%.
		{"upload 100 MiB, `files.write` (ArrayBuffer, multipart)", "100", "MISS"},
		{"upload 100 MiB, `files.write` (ReadableStream, octet-stream)", "200", "PASS"},
		// The larger of PSS p50 40 and the drop 40 MiB: 24 GiB / 40 MiB = 614.
		{"idle `base` sandboxes on 24 GiB (extrapolated from 2 started)", "614", "PASS"},
		{"pause / resume p50", "not supported by this server", "—"},
	} {
		c, ok := checks[tc.metric]
		if !ok {
			t.Errorf("no check %q; have %v", tc.metric, checks)
			continue
		}
		if c.Measured != tc.measured || c.Result != tc.result {
			t.Errorf("%s: measured %q, result %s; want %q, %s", tc.metric, c.Measured, c.Result, tc.measured, tc.result)
		}
	}
}

// A miss is held to the raw clone's first command, not to a command on a
// warm sandbox: under TCG the first one translates guest code.
func TestMissTargetUsesFirstCommand(t *testing.T) {
	r := sample()
	r.FirstCommand = []float64{40, 45, 50, 55} // p50 45: 1.3 × 210 + 45 = 318 ≥ 310
	for _, c := range r.Checks() {
		if strings.HasPrefix(c.Metric, "TTI p50 on a pool miss") {
			if c.Result != "PASS" || !strings.Contains(c.Floor, "its first echo 45.0") || !strings.Contains(c.Target, "318") {
				t.Errorf("miss check %+v; want PASS against 1.3 × 210 + 45 = 318", c)
			}
			return
		}
	}
	t.Fatal("no miss check")
}

func TestWriteMarkdown(t *testing.T) {
	var b bytes.Buffer
	if err := sample().WriteMarkdown(&b, "tti.png"); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"## Machine", "| accelerator | TCG (no vmx/svm) |", "| CPU | Test CPU, 2 cores |",
		"## Summary", "## Time to interactive", "## Command round trip", "## Files", "## Density", "## Pause and resume",
		"| TTI, serial, pool miss | 4 | 310 | 330 | 330 | 330 |", "| TTI, serial, pool hit | 3 | 32.0 | 34.0 | 34.0 | 34.0 |",
		"| floor: raw clone restore → envd `/health` | 4 | 210 | 230 | 230 | 230 |",
		"|   before warren started | 2 | 200 | 210 | 210 | 210 |",
		"|   after warren stopped | 2 | 220 | 230 | 230 | 230 |",
		"| floor: the raw clone's first `echo ready` (straight to envd) | 4 | 12.0 | 16.0 | 16.0 | 16.0 |",
		"| `commands.run('true')` | 5 | 12.0 | 40.0 | 40.0 | 40.0 |",
		"| `files.write` (ArrayBuffer, multipart) | 100 MiB | 2 | 1000 | 100 | 250 | 40% |",
		"| `files.read` (`files.read` format bytes) | 100 MiB | 2 | 400 | 250 | 400 | 62% |",
		"| MemAvailable drop per sandbox | 40.0 MiB |",
		"Not supported by this server: `sandbox.pause()` answered SandboxNotFoundError: 404.",
		"![TTI distribution](tti.png)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Every table row has the same number of cells as its header.
	var cols int
	for _, line := range strings.Split(md, "\n") {
		if !strings.HasPrefix(line, "|") {
			cols = 0
			continue
		}
		n := strings.Count(line, "|")
		if cols == 0 {
			cols = n
		} else if n != cols {
			t.Errorf("row %q has %d bars, its table %d", line, n, cols)
		}
	}
	if t.Failed() {
		t.Logf("report:\n%s", md)
	}
}

func TestWriteMarkdownPauseSupported(t *testing.T) {
	r := sample()
	r.SDK.Pause = &PauseResult{Supported: true, Pause: []float64{150, 160}, Resume: []float64{300, 320}, ResumeToCommand: []float64{320, 340}}
	var b bytes.Buffer
	if err := r.WriteMarkdown(&b, ""); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| `pause()` | 2 | 150 | 160 | 160 | 160 |", "| `Sandbox.connect()` (resume) | 2 | 300 |"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}
	if strings.Contains(b.String(), "![") {
		t.Error("report links a plot it was not given")
	}
}

func TestPlotTTI(t *testing.T) {
	spread := sample()
	spread.SDK.TTI.Burst = []float64{11000, 13000, 14000} // more than a decade: a log axis
	for name, r := range map[string]*Results{"linear axis": sample(), "log axis": spread} {
		t.Run(name, func(t *testing.T) { checkPlot(t, r) })
	}
}

func checkPlot(t *testing.T, r *Results) {
	var b bytes.Buffer
	if err := r.PlotTTI(&b); err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(&b)
	if err != nil {
		t.Fatalf("the plot is not a PNG: %v", err)
	}
	if got := img.Bounds(); got != image.Rect(0, 0, plotWidth, plotHeight) {
		t.Fatalf("plot is %v, want %d×%d", got, plotWidth, plotHeight)
	}
	count := func(c [3]uint32, within image.Rectangle) int {
		n := 0
		for y := within.Min.Y; y < within.Max.Y; y++ {
			for x := within.Min.X; x < within.Max.X; x++ {
				r, g, b, _ := img.At(x, y).RGBA()
				if [3]uint32{r >> 8, g >> 8, b >> 8} == c {
					n++
				}
			}
		}
		return n
	}
	area := image.Rect(marginLeft+2, marginTop, plotWidth-marginRight, plotHeight-marginBottom-2)
	for name, c := range map[string]color.RGBA{"serial (blue)": blue, "pool hit (purple)": purple, "burst (orange)": orange, "floor (gray)": gray} {
		// A CDF line crosses the plot's height at least once: 2 pixels wide.
		if n := count([3]uint32{uint32(c.R), uint32(c.G), uint32(c.B)}, area); n < area.Dy() {
			t.Errorf("%s: %d pixels in the plot area, want a line across it", name, n)
		}
	}
	// A target is a dashed line (half its length drawn), partly under the legend.
	if n := count([3]uint32{uint32(red.R), uint32(red.G), uint32(red.B)}, area); n < area.Dy()/2 {
		t.Errorf("miss target (red): %d pixels in the plot area, want a dashed line across it", n)
	}
	// Text: the axes' labels and ticks are black pixels below and left of the plot area.
	if n := count([3]uint32{0, 0, 0}, image.Rect(0, plotHeight-marginBottom+8, plotWidth, plotHeight)); n < 500 {
		t.Errorf("%d black pixels under the x axis: no tick labels?", n)
	}
	if n := count([3]uint32{0, 0, 0}, image.Rect(0, 0, marginLeft-8, plotHeight)); n < 300 {
		t.Errorf("%d black pixels left of the y axis: no labels?", n)
	}
}

func TestNiceStep(t *testing.T) {
	for raw, want := range map[float64]float64{0.9: 1, 1: 1, 1.1: 2, 3: 5, 7: 10, 45: 50, 120: 200, 260: 500} {
		if got := niceStep(raw); got != want {
			t.Errorf("niceStep(%v) = %v, want %v", raw, got, want)
		}
	}
}

func TestGlyphs(t *testing.T) {
	for r, g := range glyphs {
		for i, row := range g {
			if len(row) != 5 || strings.Trim(row, ".#") != "" {
				t.Errorf("glyph %q row %d is %q, want 5 of . and #", r, i, row)
			}
		}
	}
	// Every rune of the TTI plot's labels has a glyph.
	for _, l := range []string{"milliseconds", "fraction <= x", "warren time to interactive, tcg, 2026-11-27",
		"target (miss): 1.3 x restore + echo", "target: burst p90 <= 3 x serial p50", "floor: raw clone restore (n=4)", "TTI burst of 3 (n=3)"} {
		for _, c := range strings.ToUpper(l) {
			if _, ok := glyphs[c]; !ok {
				t.Errorf("label %q: no glyph for %q", l, c)
			}
		}
	}
}
