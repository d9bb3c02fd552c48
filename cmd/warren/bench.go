package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/bench"
)

func init() {
	commands["bench"] = command{summary: "measure TTI, commands, files, density and pause with the npm SDK, beside their floors", run: runBench}
}

func runBench(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: warren bench [flags]

Measures warren with the official npm e2b SDK, each number beside its floor
measured in the same run: time to interactive (Sandbox.create() to the first
commands.run('echo ready'), serial and a concurrent burst) beside a raw clone
restore of the same snapshot; the command round trip beside envd's /health
through the same proxy plus the command's run time in the guest; 1 MiB and
100 MiB uploads and downloads beside a loopback HTTP copy; idle sandboxes
until --density (host memory per sandbox); pause and resume.

It takes the host's network slots (stop 'warren up' first), measures the
floors, then runs warren itself on a free 127.0.0.1 port with a fresh store
in --data-dir, and the SDK script (test/compat/warren-bench.mjs; the SDK
version pinned in test/compat/package-lock.json is installed with npm ci
into DATA/sdk). Needs root, Node.js >= 20 and npm. Prints a markdown report;
--out also writes report.md, tti.png (the TTI distribution) and results.json.

Flags (each also read from the environment variable shown):
`)
		fs.PrintDefaults()
	}
	e := &envFlags{fs: fs}
	o := bench.Options{Progress: os.Stderr}
	dataDir := e.String("data-dir", "WARREN_BENCH_DATA_DIR", "/var/tmp/warren-bench", "the bench's own data dir (its store is reset every run; kernel, base image and base build are kept)")
	seedFrom := e.String("seed-from", "WARREN_BENCH_SEED_FROM", "", "hard-link the guest kernel and base root image from this warren data dir (e.g. /var/lib/warren) when --data-dir has none")
	sdkDir := e.String("sdk-dir", "WARREN_BENCH_SDK_DIR", "", "directory with warren-bench.mjs, package.json and package-lock.json (default: test/compat of the source tree)")
	envd := e.String("envd", "WARREN_ENVD", defaultEnvd(), "the static envd binary put into every sandbox")
	accel := e.String("vm-accel", "WARREN_VM_ACCEL", "auto", "microVM acceleration: auto, kvm, tcg")
	tti := e.Int("tti", "WARREN_BENCH_TTI", 20, "sandboxes created one after the other for TTI (and raw restores for its floor)")
	burst := e.Int("burst", "WARREN_BENCH_BURST", 10, "sandboxes created at once for the burst TTI")
	rtt := e.Int("rtt", "WARREN_BENCH_RTT", 200, "commands.run('true') round trips timed")
	density := e.Int("density", "WARREN_BENCH_DENSITY", 12, "idle sandboxes started for the density measure (0 skips); more than ~15 saturate 2 cores under TCG")
	idle := e.Duration("idle", "WARREN_BENCH_IDLE", 10*time.Second, "how long the density sandboxes idle before memory is read")
	pause := e.Int("pause", "WARREN_BENCH_PAUSE", 3, "pause and resume rounds (0 skips)")
	noLarge := fs.Bool("no-large-files", false, "skip the 100 MiB transfers")
	out := fs.String("out", "", "also write report.md, tti.png and results.json into this directory")
	fs.Parse(args)
	if err := e.err(); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench takes no arguments, got %q", fs.Args())
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("bench needs root: it boots microVMs in network namespaces")
	}
	o.DataDir, o.SeedFrom, o.Envd, o.VMAccel = *dataDir, *seedFrom, *envd, *accel
	o.Warmup, o.TTI, o.Burst, o.RTT, o.Density, o.Idle, o.Pause = 1, *tti, *burst, *rtt, *density, *idle, *pause
	o.LargeFiles = !*noLarge
	if o.SDKDir = *sdkDir; o.SDKDir == "" {
		d, err := bench.FindSDKDir()
		if err != nil {
			return err
		}
		o.SDKDir = d
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	res, err := bench.Run(ctx, o)
	if err != nil {
		return err
	}
	plot := ""
	if *out != "" {
		if err := res.WriteDir(*out); err != nil {
			return err
		}
		plot = bench.PlotFile
		fmt.Fprintf(os.Stderr, "bench: wrote %s/{%s,%s,%s}\n", *out, bench.ReportFile, bench.PlotFile, bench.ResultsFile)
	}
	return res.WriteMarkdown(os.Stdout, plot)
}
