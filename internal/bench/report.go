package bench

import (
	"fmt"
	"io"
	"strings"
)

// Target ratios and margins (issue 7).
const (
	hitFactor      = 1.2 // TTI on a pool hit ≤ hitFactor × echo on a warm sandbox + hitSlackMs
	hitSlackMs     = 20
	missFactor     = 1.3 // TTI on a miss ≤ missFactor × raw restore + the raw clone's first echo
	burstFactor    = 3   // burst p90 ≤ burstFactor × serial p50
	uploadShare    = 0.5 // 100 MiB upload ≥ uploadShare × the loopback copy
	densityWanted  = 100 // idle base sandboxes on densityHostGiB
	densityHostGiB = 24
)

// missTarget is the TTI a pool miss may take: missFactor × the raw clone
// restore + the same command, `echo ready`, as the raw clone's first. Under
// TCG a first command translates the guest code it runs (QEMU keeps no
// translations across processes: ~0.5 s for a login shell), which any fresh
// QEMU pays, so the floor has it too; a command on a warm sandbox (the pool
// hit's yardstick) has not.
func missTarget(restoreP50, firstP50 float64) float64 { return missFactor*restoreP50 + firstP50 }

// Check is one line of the summary: a measured value beside its floor and
// target.
type Check struct {
	Metric, Measured, Floor, Ratio, Target string
	// Result is PASS, MISS, or "—" for numbers without a target (and n/a
	// for targets this run could not measure).
	Result string
}

func pass(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

// Checks compares the results with the targets.
func (r *Results) Checks() []Check {
	var out []Check
	floor := Summarize(r.RestoreFloor)
	if s := r.SDK; s != nil {
		serial, echo, first := Summarize(s.TTI.Serial), Summarize(s.TTI.Echo), Summarize(r.FirstCommand)
		missFloor := floor.P50 + first.P50
		missTarget := missTarget(floor.P50, first.P50)
		out = append(out, Check{
			Metric: "TTI p50 on a pool miss (serial, the warm pool emptied)", Measured: ms(serial.P50),
			Floor: fmt.Sprintf("%s (raw clone: restore %s + its first echo %s; echo on a warm sandbox %s)",
				ms(missFloor), ms(floor.P50), ms(first.P50), ms(echo.P50)),
			Ratio:  ratio(serial.P50, missFloor),
			Target: fmt.Sprintf("≤ %s (%.1f × restore + first echo)", ms(missTarget), missFactor),
			Result: pass(serial.P50 <= missTarget),
		})
		hitTarget := hitFactor*echo.P50 + hitSlackMs
		hit := Summarize(s.TTI.Hit)
		hc := Check{
			Metric: fmt.Sprintf("TTI p50 on a pool hit (%d of %d creates claimed a warm VM)", len(s.TTI.Hit), len(s.TTI.Hit)+len(s.TTI.HitMissed)),
			Floor:  fmt.Sprintf("%s (echo on a warm sandbox)", ms(echo.P50)),
			Target: fmt.Sprintf("≤ %s (%.1f × echo + %d ms)", ms(hitTarget), hitFactor, hitSlackMs),
		}
		if len(s.TTI.Hit) == 0 {
			hc.Measured, hc.Result = "no create claimed a warm VM", "MISS"
		} else {
			hc.Measured, hc.Ratio, hc.Result = ms(hit.P50), ratio(hit.P50, echo.P50), pass(hit.P50 <= hitTarget)
		}
		out = append(out, hc)
		burst := Summarize(s.TTI.Burst)
		burstTarget := burstFactor * serial.P50
		res := pass(burst.P90 <= burstTarget && len(s.TTI.BurstErrors) == 0)
		measured := ms(burst.P90)
		if n := len(s.TTI.BurstErrors); n > 0 {
			measured += fmt.Sprintf(" (%d of %d failed)", n, r.Counts.Burst)
		}
		out = append(out, Check{
			Metric: fmt.Sprintf("TTI p90, burst of %d", r.Counts.Burst), Measured: measured,
			Floor: ms(serial.P50) + " (serial p50)", Ratio: ratio(burst.P90, serial.P50),
			Target: fmt.Sprintf("≤ %s (%d × serial p50)", ms(burstTarget), burstFactor), Result: res,
		})
		cmd, health, guest := Summarize(s.RTT.Command), Summarize(s.RTT.Health), Summarize(s.RTT.Guest)
		out = append(out, Check{
			Metric: "`commands.run('true')` p50", Measured: ms(cmd.P50),
			Floor: fmt.Sprintf("%s (/health %s + in guest %s)", ms(health.P50+guest.P50), ms(health.P50), ms(guest.P50)),
			Ratio: ratio(cmd.P50, health.P50+guest.P50), Target: "", Result: "—",
		})
		for _, kind := range []string{"upload", "upload-stream"} {
			c := Check{Metric: "upload 100 MiB, `files.write` " + fileKinds[kind], Target: fmt.Sprintf("≥ %.0f%% of loopback", uploadShare*100)}
			sdk, loop := s.file(kind, 100<<20), s.file("loopback-upload", 100<<20)
			if sdk == nil || loop == nil {
				c.Measured, c.Result = "not measured (--no-large-files)", "n/a"
			} else {
				a, b := sdk.MiBps(), loop.MiBps()
				c.Measured, c.Floor, c.Ratio = mibps(a), mibps(b)+" (loopback copy)", fmt.Sprintf("%.0f%%", 100*a/b)
				c.Result = pass(a >= uploadShare*b)
			}
			out = append(out, c)
		}
	}
	if d := r.Density; d != nil && d.Started > 0 {
		per := d.perSandboxMiB()
		fits := float64(densityHostGiB<<10) / per
		out = append(out, Check{
			Metric:   fmt.Sprintf("idle `base` sandboxes on %d GiB (extrapolated from %d started)", densityHostGiB, d.Started),
			Measured: fmt.Sprintf("%.0f", fits),
			Floor:    fmt.Sprintf("%.1f MiB per sandbox (the larger of PSS p50 and MemAvailable drop)", per),
			Target:   fmt.Sprintf("≥ %d", densityWanted), Result: pass(fits >= densityWanted),
		})
	}
	if s := r.SDK; s != nil && s.Pause != nil {
		c := Check{Metric: "pause / resume p50", Result: "—"}
		switch p := s.Pause; {
		case !p.Supported:
			c.Measured = "not supported by this server"
		case len(p.Pause) == 0:
			c.Measured = "failed: " + p.Failed
		default:
			c.Measured = fmt.Sprintf("%s / %s", ms(Median(p.Pause)), ms(Median(p.Resume)))
			c.Floor = fmt.Sprintf("%s (restore floor, for resume)", ms(floor.P50))
			c.Ratio = ratio(Median(p.Resume), floor.P50)
		}
		out = append(out, c)
	}
	return out
}

// perSandboxMiB is what one idle sandbox costs the host: the larger of its
// QEMU's PSS (median) and its share of the MemAvailable drop.
func (d *DensityResult) perSandboxMiB() float64 {
	return max(Median(d.PSS), d.DropPerSandboxMiB())
}

var fileKinds = map[string]string{
	"upload":            "(ArrayBuffer, multipart)",
	"upload-stream":     "(ReadableStream, octet-stream)",
	"download":          "(`files.read` format bytes)",
	"download-stream":   "(`files.read` format stream)",
	"loopback-upload":   "floor: fetch POST to a loopback server",
	"loopback-download": "floor: fetch GET from a loopback server",
}

func (s *SDKResults) file(name string, bytes int64) *FileResult {
	for i := range s.Files {
		if s.Files[i].Name == name && s.Files[i].Bytes == bytes {
			return &s.Files[i]
		}
	}
	return nil
}

// MiBps is the transfer's rate at its median time.
func (f *FileResult) MiBps() float64 {
	m := Median(f.Ms)
	if m == 0 {
		return 0
	}
	return float64(f.Bytes) / (1 << 20) / (m / 1000)
}

// WriteMarkdown renders the report; plot names the TTI plot's file beside it
// ("" for none).
func (r *Results) WriteMarkdown(w io.Writer, plot string) error {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	m := r.Machine
	p("# warren bench, %s", r.Started.Format("2006-01-02 15:04 MST"))
	p("")
	p("Command: `warren bench --tti %d --burst %d --rtt %d --density %d --pause %d`; took %s. The npm `e2b` SDK drives a warren "+
		"started in the same process on 127.0.0.1 (mode A: `E2B_API_URL`, `E2B_SANDBOX_URL`); times in ms.",
		r.Counts.TTI, r.Counts.Burst, r.Counts.RTT, r.Counts.Density, r.Counts.Pause, r.Duration)
	p("")
	p("## Machine")
	p("")
	p("| | |")
	p("|---|---|")
	p("| CPU | %s, %d cores |", orUnknown(m.CPUModel), m.Cores)
	p("| memory | %.1f GiB |", float64(m.MemTotalMiB)/1024)
	p("| OS, kernel | %s, %s |", orUnknown(m.OS), orUnknown(m.Kernel))
	accel := strings.ToUpper(m.Accel)
	if m.AccelWhy != "" {
		accel += " (" + m.AccelWhy + ")"
	}
	p("| accelerator | %s |", accel)
	p("| QEMU, Node, Go | %s, %s, %s |", orUnknown(m.QEMU), orUnknown(m.Node), m.Go)
	p("| base template | build %s, %d vCPUs, %d MiB |", r.Base.BuildID, r.Base.CPUs, r.Base.MemoryMiB)
	p("| load average before / after | %s / %s |", m.LoadBefore, m.LoadAfter)
	p("")
	p("## Summary")
	p("")
	p("| metric | measured | floor (same run) | ratio | target | result |")
	p("|---|---|---|---|---|---|")
	for _, c := range r.Checks() {
		p("| %s | %s | %s | %s | %s | %s |", c.Metric, c.Measured, dash(c.Floor), dash(c.Ratio), dash(c.Target), c.Result)
	}
	p("")

	p("## Time to interactive")
	p("")
	p("`Sandbox.create()` → first `commands.run('echo ready')` done: %d one after the other after %d warm-up as pool misses "+
		"(the bench empties warren's warm pool for them, so each restores the snapshot), %d more with the warm pool of 2 base VMs, "+
		"3 s apart so the pool refills (the sandbox's log tells whether the create claimed a warm VM), then %d at once "+
		"with the pool full (each timed from the common start). The floor is a raw clone restore of the same snapshot (microVM runtime Start → envd's "+
		"first `/health` 204, no warren in between), half of them before warren started and half after it stopped, each half after "+
		"one warm-up; then the same command, `bash -l -c 'echo ready'`, as each raw clone's first, straight to its envd. Under TCG "+
		"a new QEMU process has translated none of the guest's code, so a first command costs what later ones do not; a miss "+
		"is held to that floor, a hit to the echo on a warm sandbox.", r.Counts.TTI, r.Counts.Warmup, r.Counts.TTI, r.Counts.Burst)
	p("")
	p("| | n | p50 | p90 | p99 | max |")
	p("|---|---|---|---|---|---|")
	if s := r.SDK; s != nil {
		row(p, "TTI, serial, pool miss", Summarize(s.TTI.Serial))
		row(p, "  of which `Sandbox.create()`", Summarize(s.TTI.SerialCreate))
		row(p, "TTI, serial, pool hit", Summarize(s.TTI.Hit))
		row(p, "  of which `Sandbox.create()`", Summarize(s.TTI.HitCreate))
		row(p, fmt.Sprintf("TTI, burst of %d", r.Counts.Burst), Summarize(s.TTI.Burst))
		row(p, "  of which `Sandbox.create()`", Summarize(s.TTI.BurstCreate))
		row(p, "`commands.run('echo ready')` on a warm sandbox", Summarize(s.TTI.Echo))
	}
	row(p, "floor: raw clone restore → envd `/health`", Summarize(r.RestoreFloor))
	if k := r.RestoreFloorBefore; k > 0 && k < len(r.RestoreFloor) {
		row(p, "  before warren started", Summarize(r.RestoreFloor[:k]))
		row(p, "  after warren stopped", Summarize(r.RestoreFloor[k:]))
	}
	row(p, "floor: the raw clone's first `echo ready` (straight to envd)", Summarize(r.FirstCommand))
	if s := r.SDK; s != nil && len(s.TTI.BurstErrors) > 0 {
		p("")
		p("Failed creates in the burst: %s", strings.Join(s.TTI.BurstErrors, "; "))
	}
	if plot != "" {
		p("")
		p("![TTI distribution](%s)", plot)
	}
	p("")

	if s := r.SDK; s != nil {
		p("## Command round trip")
		p("")
		p("`commands.run('true')` on one sandbox, %d times after 10 warm-up. Its floor is the sum of envd's `/health` over the same "+
			"path (fetch → warren's proxy → the sandbox, the same number of times) and what envd runs for it, "+
			"`/bin/bash -l -c true`, timed by bash inside the guest.", r.Counts.RTT)
		p("")
		p("| | n | p50 | p90 | p99 | max |")
		p("|---|---|---|---|---|---|")
		row(p, "`commands.run('true')`", Summarize(s.RTT.Command))
		row(p, "floor: `GET /health` through warren", Summarize(s.RTT.Health))
		row(p, "floor: `bash -l -c true` in the guest", Summarize(s.RTT.Guest))
		p("")

		p("## Files")
		p("")
		p("Each transfer timed several times (the median is given as MiB/s) on the sandbox of the round trips. The floor is the " +
			"same bytes through the same `fetch` to and from an HTTP server of the bench on 127.0.0.1, which keeps the body of a POST " +
			"in memory and serves it back on GET.")
		p("")
		p("| transfer | size | n | p50 ms | MiB/s | floor MiB/s | of floor |")
		p("|---|---|---|---|---|---|---|")
		for _, f := range s.Files {
			if strings.HasPrefix(f.Name, "loopback-") {
				continue
			}
			floorName := "loopback-upload"
			if strings.HasPrefix(f.Name, "download") {
				floorName = "loopback-download"
			}
			floor := s.file(floorName, f.Bytes)
			fl, share := "—", "—"
			if floor != nil {
				fl = mibps(floor.MiBps())
				share = fmt.Sprintf("%.0f%%", 100*f.MiBps()/floor.MiBps())
			}
			verb := "`files.write`"
			if strings.HasPrefix(f.Name, "download") {
				verb = "`files.read`"
			}
			p("| %s %s | %s | %d | %s | %s | %s | %s |", verb, fileKinds[f.Name], size(f.Bytes), len(f.Ms), ms(Median(f.Ms)), mibps(f.MiBps()), fl, share)
		}
		p("")
	}

	p("## Density")
	p("")
	if d := r.Density; d != nil {
		p("`Sandbox.create()` of idle `base` sandboxes (restored: the bench empties the warm pool first) one after the other, up to %d (the bench lifts the node's memory-derived "+
			"cap to that count); after %s idle, each QEMU's PSS and RSS (`/proc/<pid>/smaps_rollup`) and CPU, and the host's MemAvailable.",
			d.Asked, d.Idle)
		p("")
		p("| | |")
		p("|---|---|")
		p("| sandboxes started | %d of %d%s |", d.Started, d.Asked, stopNote(d.Stop))
		if c := Summarize(d.CreateMs); c.N > 0 {
			p("| `Sandbox.create()` while they pile up, p50 / max | %s / %s ms |", ms(c.P50), ms(c.Max))
		}
		p("| MemAvailable before / after | %.0f / %.0f MiB |", d.MemAvailableBeforeMiB, d.MemAvailableAfterMiB)
		p("| MemAvailable drop per sandbox | %.1f MiB |", d.DropPerSandboxMiB())
		p("| PSS per sandbox, p50 / max | %.1f / %.1f MiB |", Median(d.PSS), Summarize(d.PSS).Max)
		p("| RSS per sandbox, p50 | %.1f MiB |", Median(d.RSS))
		p("| CPU per idle sandbox, p50 | %.0f ms/s |", Median(d.IdleCPU))
		p("| warm pool VMs waiting frozen (not counted above; in the MemAvailable drop) | %d |", d.WarmFrozen)
		if per := d.perSandboxMiB(); per > 0 {
			p("| fit by memory (%.1f MiB each): this host's MemAvailable / %d GiB | %.0f / %.0f |", per, densityHostGiB,
				d.MemAvailableBeforeMiB/per, float64(densityHostGiB<<10)/per)
			if cpu := Median(d.IdleCPU); cpu > 0 {
				p("| fit by CPU (idle CPU per sandbox, %d cores) | %.0f |", m.Cores, float64(m.Cores)*1000/cpu)
			}
		}
		p("")
		p("The counts on %d GiB are extrapolated from the memory measured per sandbox, not started. MemAvailable is the whole "+
			"host's: other work moves it (a negative drop means something else freed memory meanwhile); PSS counts the sandboxes' "+
			"QEMU processes alone.", densityHostGiB)
	} else {
		p("Not measured (--density 0).")
	}
	p("")

	p("## Pause and resume")
	p("")
	switch {
	case r.SDK == nil || r.SDK.Pause == nil:
		p("Not measured (--pause 0).")
	case !r.SDK.Pause.Supported:
		p("Not supported by this server: `sandbox.pause()` answered %s.", r.SDK.Pause.Error)
	default:
		ps := r.SDK.Pause
		p("`sandbox.pause()`, then `Sandbox.connect()` (resumes it), then a command that reads a file written before the pause.")
		p("")
		p("| | n | p50 | p90 | p99 | max |")
		p("|---|---|---|---|---|---|")
		row(p, "`pause()`", Summarize(ps.Pause))
		row(p, "`Sandbox.connect()` (resume)", Summarize(ps.Resume))
		row(p, "resume → first command done", Summarize(ps.ResumeToCommand))
		if ps.Failed != "" {
			p("")
			p("A later round failed: %s", ps.Failed)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func row(p func(string, ...any), name string, s Summary) {
	if s.N == 0 {
		p("| %s | 0 | — | — | — | — |", name)
		return
	}
	p("| %s | %d | %s | %s | %s | %s |", name, s.N, ms(s.P50), ms(s.P90), ms(s.P99), ms(s.Max))
}

// ms formats milliseconds with three significant digits or so.
func ms(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func mibps(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func ratio(a, b float64) string {
	if b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func size(bytes int64) string { return fmt.Sprintf("%d MiB", bytes>>20) }

func dash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func stopNote(stop string) string {
	if stop == "" {
		return ""
	}
	return " (stopped: " + strings.ReplaceAll(stop, "|", "/") + ")"
}
