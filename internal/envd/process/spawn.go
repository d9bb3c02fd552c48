package process

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"connectrpc.com/connect"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	pb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/internal/envd/identity"
)

// Default pseudo-terminal size when the request gives none (the SDK's default too).
const (
	defaultCols = 80
	defaultRows = 24
)

// stdio is a process's standard streams: the child's ends, handed to exec and
// closed in envd once the child has them, and envd's ends, owned by the proc.
type stdio struct {
	child []*os.File

	pty            *os.File
	stdout, stderr *os.File
	stdin          *os.File // nil with a PTY or with stdin: false
}

// openStdio creates the pipes or the pseudo-terminal. Every end is an
// *os.File so os/exec starts no copying goroutines and no Wait is needed.
func openStdio(req *pb.StartRequest) (*stdio, error) {
	if req.Pty != nil {
		return openPTY(req.GetPty().GetSize())
	}
	std := &stdio{}
	ok := false
	defer func() {
		if !ok {
			std.close()
		}
	}()
	var in *os.File
	if req.Stdin == nil || req.GetStdin() {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("stdin pipe: %w", err)
		}
		in, std.stdin = r, w
	} else {
		// stdin: false means immediate EOF, as upstream.
		f, err := os.Open(os.DevNull)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", os.DevNull, err)
		}
		in = f
	}
	std.child = append(std.child, in)
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	std.stdout = outR
	std.child = append(std.child, outW)
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	std.stderr = errR
	std.child = append(std.child, errW)
	ok = true
	return std, nil
}

func openPTY(size *pb.PTY_Size) (*stdio, error) {
	cols, rows := size.GetCols(), size.GetRows()
	if cols == 0 {
		cols = defaultCols
	}
	if rows == 0 {
		rows = defaultRows
	}
	if cols > 0xffff || rows > 0xffff {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("pty size %dx%d is too large (at most 65535x65535)", cols, rows))
	}
	master, tty, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("open pty: %w", err)
	}
	// pty.Open leaves the master in blocking mode (its ioctls use Fd), where
	// reads ignore deadlines; a non-blocking duplicate is served by Go's poller.
	fd, err := unix.FcntlInt(master.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	master.Close()
	if err != nil {
		tty.Close()
		return nil, fmt.Errorf("duplicate pty master: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		tty.Close()
		return nil, fmt.Errorf("pty master non-blocking: %w", err)
	}
	master = os.NewFile(uintptr(fd), "/dev/ptmx")
	if err := pty.Setsize(tty, &pty.Winsize{Cols: uint16(cols), Rows: uint16(rows)}); err != nil {
		master.Close()
		tty.Close()
		return nil, fmt.Errorf("set pty size: %w", err)
	}
	return &stdio{pty: master, child: []*os.File{tty, tty, tty}}, nil
}

// closeChild closes the child's ends in envd, so EOF reaches envd when the
// child (and its descendants) close theirs.
func (std *stdio) closeChild() {
	for _, f := range std.child {
		f.Close() // the PTY's tty appears three times; later closes are no-ops
	}
}

// close releases everything when the process could not be started.
func (std *stdio) close() {
	std.closeChild()
	for _, f := range []*os.File{std.pty, std.stdout, std.stderr, std.stdin} {
		if f != nil {
			f.Close()
		}
	}
}

// environ merges the environment, later sources winning: the user's basics,
// the sandbox's variables from /init, the request's envs.
func environ(u *identity.User, sandbox, request map[string]string) (map[string]string, error) {
	env := u.Env()
	maps.Copy(env, sandbox)
	for k, v := range request {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("env %q: names must be non-empty without '=' or NUL, values without NUL", k))
		}
		env[k] = v
	}
	return env, nil
}

// lookPath finds cmd in the process's own PATH (not envd's), as a shell would.
func lookPath(cmd, path string) (string, error) {
	if strings.Contains(cmd, "/") {
		return cmd, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, cmd)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cmd %q not found in PATH %q", cmd, path))
}

// command builds the exec.Cmd: the user's credentials, its own process group
// (or session, with a PTY) so signals reach everything it starts.
func command(u *identity.User, cfg *pb.ProcessConfig, cwd string, env map[string]string, std *stdio) (*exec.Cmd, error) {
	path, err := lookPath(cfg.GetCmd(), env["PATH"])
	if err != nil {
		return nil, err
	}
	attr := &syscall.SysProcAttr{}
	switch {
	case os.Geteuid() == 0:
		attr.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	case !u.IsCurrent():
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("envd runs as uid %d and cannot start processes as user %q", os.Geteuid(), u.Name))
	}
	if std.pty != nil {
		// A new session whose controlling terminal is the PTY: job control,
		// SIGWINCH and SIGHUP work as in a login shell. Its pgid is its pid.
		attr.Setsid = true
		attr.Setctty = true
		attr.Ctty = 0
	} else {
		attr.Setpgid = true
	}
	keys := slices.Sorted(maps.Keys(env))
	environ := make([]string, 0, len(keys))
	for _, k := range keys {
		environ = append(environ, k+"="+env[k])
	}
	return &exec.Cmd{
		Path:        path,
		Args:        append([]string{cfg.GetCmd()}, cfg.GetArgs()...),
		Env:         environ,
		Dir:         cwd,
		Stdin:       std.child[0],
		Stdout:      std.child[1],
		Stderr:      std.child[2],
		SysProcAttr: attr,
	}, nil
}

// startError maps a failed exec to a Connect error naming the command.
func startError(cmd string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("start %q: %w", cmd, err))
	case errors.Is(err, fs.ErrPermission):
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("start %q: %w", cmd, err))
	}
	return connect.NewError(connect.CodeInternal, fmt.Errorf("start %q: %w", cmd, err))
}
