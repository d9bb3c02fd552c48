package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// sdkScript is the SDK side of the bench, in the SDK directory
// (test/compat of the source tree) beside the package.json and
// package-lock.json that pin the npm e2b SDK.
const sdkScript = "warren-bench.mjs"

// FindSDKDir returns the directory holding warren-bench.mjs and the pinned
// package files: test/compat beside the binary's bin/ directory (as `make
// build` lays it out), else test/compat under the working directory.
func FindSDKDir() (string, error) {
	var tried []string
	if exe, err := os.Executable(); err == nil {
		tried = append(tried, filepath.Join(filepath.Dir(exe), "..", "test", "compat"))
	}
	if wd, err := os.Getwd(); err == nil {
		tried = append(tried, filepath.Join(wd, "test", "compat"))
	}
	for _, d := range tried {
		if _, err := os.Stat(filepath.Join(d, sdkScript)); err == nil {
			return filepath.Clean(d), nil
		}
	}
	return "", fmt.Errorf("no %s in %s: run from warren's source tree or pass --sdk-dir", sdkScript, strings.Join(tried, " or "))
}

// installSDK makes dir a copy of the SDK directory's script and package
// files with the pinned npm packages installed (`npm ci`, only when the lock
// file changed since the last install), and returns the script's path there.
func installSDK(ctx context.Context, sdkDir, dir string, progress io.Writer) (string, error) {
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("the bench drives warren with the npm e2b SDK and needs Node.js >= 20 and npm: %s not found (install them: make setup-test, or apt-get install nodejs npm)", tool)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	for _, f := range []string{sdkScript, "package.json", "package-lock.json"} {
		b, err := os.ReadFile(filepath.Join(sdkDir, f))
		if err != nil {
			return "", fmt.Errorf("SDK files: %w (--sdk-dir must be warren's test/compat)", err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			return "", err
		}
	}
	lock, _ := os.ReadFile(filepath.Join(dir, "package-lock.json"))
	stamp := filepath.Join(dir, "node_modules", ".warren-bench-lock")
	if old, err := os.ReadFile(stamp); err != nil || !bytes.Equal(old, lock) {
		fmt.Fprintf(progress, "bench: npm ci in %s (the pinned e2b SDK)\n", dir)
		cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
		cmd.Dir = dir
		cmd.Stdout, cmd.Stderr = progress, progress
		if err := cmd.Run(); err != nil {
			return "", fmt.Errorf("npm ci in %s: %w", dir, err)
		}
		if err := os.WriteFile(stamp, lock, 0o644); err != nil {
			return "", err
		}
	}
	return filepath.Join(dir, sdkScript), nil
}

// sdkConfig is what the script reads from WARREN_BENCH.
type sdkConfig struct {
	Warmup      int    `json:"warmup"`
	TTI         int    `json:"tti"`
	Burst       int    `json:"burst"`
	RTT         int    `json:"rtt"`
	Density     int    `json:"density"`
	Pause       int    `json:"pause"`
	LargeFiles  bool   `json:"largeFiles"`
	LoopbackURL string `json:"loopbackURL"`
	// RefillMs is the pause before each pool-hit create.
	RefillMs int `json:"refillMs"`
	// WarmPool is the warm pool's size for pool hits and the burst; the
	// script empties the pool (event warm-pool) for misses and density.
	WarmPool int `json:"warmPool"`
}

// SDKResults is what the script measured, in milliseconds.
type SDKResults struct {
	TTI struct {
		// Serial are pool misses (the warm pool emptied); Hit the creates
		// that claimed a warm VM, HitMissed those that found the pool empty.
		Serial, SerialCreate []float64
		Hit, HitCreate       []float64
		HitMissed            []float64
		// Echo is commands.run('echo ready') on a sandbox already up.
		Echo               []float64
		Burst, BurstCreate []float64
		BurstErrors        []string
	}
	RTT struct {
		Command []float64 // commands.run('true')
		Health  []float64 // GET envd /health through warren's proxy
		Guest   []float64 // bash -l -c true inside the guest
	}
	Files   []FileResult
	Pause   *PauseResult
	Density *struct {
		Started  int
		CreateMs []float64
		Stop     string // why it stopped before the count, if it did
	}
}

// FileResult is one kind of transfer of one size: upload, upload-stream,
// download, download-stream (the SDK) or loopback-upload,
// loopback-download (the floor).
type FileResult struct {
	Name  string
	Bytes int64
	Ms    []float64
}

// PauseResult is pause (Sandbox.pause) and resume (Sandbox.connect) of one
// sandbox, round after round.
type PauseResult struct {
	Supported       bool
	Error           string // why pause is not supported: the server's answer
	Failed          string // a later round failed
	Pause, Resume   []float64
	ResumeToCommand []float64
}

// sdkEvent is a line of the script's stdout: a question or the result.
type sdkEvent struct {
	Event   string      `json:"event"`
	Started int         `json:"started"`
	Size    *int        `json:"size"` // warm-pool
	Result  *SDKResults `json:"result"`
}

// runSDK runs the script with node against the server at url. Every event
// line is handed to answer, whose return value is written back as the
// script's answer; stderr goes to progress.
func runSDK(ctx context.Context, script string, env []string, answer func(sdkEvent) (any, error), progress io.Writer) (*SDKResults, error) {
	cmd := exec.CommandContext(ctx, "node", script)
	cmd.Dir = filepath.Dir(script)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = progress
	// Node must not outlive a cancelled bench: SIGTERM, then SIGKILL.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start node %s: %w", script, err)
	}
	var res *SDKResults
	var protoErr error
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var ev sdkEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			protoErr = fmt.Errorf("the SDK script printed %q, not a JSON line", sc.Text())
			break
		}
		if ev.Result != nil {
			res = ev.Result
			continue
		}
		reply, err := answer(ev)
		if err != nil {
			protoErr = err
			break
		}
		b, _ := json.Marshal(reply)
		if _, err := stdin.Write(append(b, '\n')); err != nil {
			protoErr = fmt.Errorf("answer the SDK script: %w", err)
			break
		}
	}
	stdin.Close()
	if protoErr != nil {
		cmd.Process.Signal(syscall.SIGTERM)
	}
	io.Copy(io.Discard, stdout)
	werr := cmd.Wait()
	switch {
	case protoErr != nil:
		return nil, protoErr
	case werr != nil:
		return nil, fmt.Errorf("the SDK script failed (its output above): %w", werr)
	case res == nil:
		return nil, errors.New("the SDK script ended without a result line")
	}
	return res, nil
}

// nodeVersion is `node --version`.
func nodeVersion(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "node", "--version").Output()
	return strings.TrimSpace(string(out)), err
}

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}
