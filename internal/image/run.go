package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// toolEnv is the whole environment of the tools a build runs: the host's
// variables (locale, proxies, a user's PATH without sbin) must not leak into
// debootstrap or the chroot, where they would change what gets built.
var toolEnv = []string{
	"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LC_ALL=C",
	"DEBIAN_FRONTEND=noninteractive",
}

// stopGrace is how long a cancelled tool gets after SIGTERM to run its exit
// traps (debootstrap unmounts the target's /proc and /sys there) before SIGKILL.
const stopGrace = 10 * time.Second

// run runs a tool in its own process group with its output going to out. When
// ctx ends, the whole group gets SIGTERM, then SIGKILL: debootstrap's children
// (dpkg, maintainer scripts in the chroot) must stop with it.
func run(ctx context.Context, out *toolOutput, path string, args ...string) error {
	return runCapture(ctx, out, out, path, args...)
}

// runCapture is run with the tool's stdout going to stdout instead of out.
func runCapture(ctx context.Context, out *toolOutput, stdout io.Writer, path string, args ...string) error {
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = toolEnv
	cmd.Stdout = stdout
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = stopGrace
	err := cmd.Run()
	if err != nil && ctx.Err() != nil && cmd.Process != nil {
		// The leader is gone (or was killed after WaitDelay); stragglers in its
		// group are not, and would keep writing into a work dir being removed.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err != nil {
		name := out.tool
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", name, ctx.Err())
		}
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return fmt.Errorf("%s %s: %w; last output:\n%s", name, strings.Join(args, " "), err, out.lastLines())
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	out.flush()
	return nil
}
