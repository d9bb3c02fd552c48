// Package process implements E2B's process.Process Connect service: starting,
// streaming, signalling and feeding processes inside the sandbox.
//
// A process lives independently of the stream that started it: it is
// registered by pid (and optional tag) before its start event is sent, any
// number of streams can follow it (Start's own, Connects), and it ends only by
// itself, by a signal, or when the Start request's Connect-Timeout-Ms elapses.
// After it exits it stays findable by Connect for retainExited.
package process

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/state"
)

// defaultKeepalive is the keepalive interval without a Keepalive-Ping-Interval header.
const defaultKeepalive = 90 * time.Second

// Service implements processconnect.ProcessHandler.
type Service struct {
	processconnect.UnimplementedProcessHandler
	state *state.Sandbox
	log   *slog.Logger

	// mu guards procs, and is held across cmd.Start + registration, across
	// the reaper's wait4, and around signalling, so a pid is never looked up,
	// reaped or signalled while it might belong to another process.
	mu    sync.Mutex
	procs map[uint32]*proc // running, and exited ones for retainExited

	sigchld    chan os.Signal
	stopReap   chan struct{}
	reaperDone chan struct{}
}

// NewService returns the process service of a sandbox. It makes envd the
// reaper of all its descendants (see reaper.go).
func NewService(st *state.Sandbox, log *slog.Logger) *Service {
	s := &Service{
		state:      st,
		log:        log,
		procs:      map[uint32]*proc{},
		stopReap:   make(chan struct{}),
		reaperDone: make(chan struct{}),
	}
	s.startReaper()
	return s
}

// Close stops background work; running processes are left alone.
func (s *Service) Close() {
	s.stopReaper()
}

// Start runs a process and streams its events; see the package comment for
// its lifetime.
func (s *Service) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	// The request deadline (Connect-Timeout-Ms) is the process's lifetime.
	deadline, hasDeadline := ctx.Deadline()
	u, err := identity.ForRPC(req.Header(), s.state.DefaultUser())
	if err != nil {
		return err
	}
	cfg := req.Msg.GetProcess()
	if cfg.GetCmd() == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd is empty"))
	}
	cwd, err := u.Resolve(cfg.GetCwd(), s.state.DefaultWorkdir())
	if err != nil {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cwd: %w", err))
	}
	if fi, err := os.Stat(cwd); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cwd '%s' does not exist", cwd))
		}
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cwd '%s': %w", cwd, err))
	} else if !fi.IsDir() {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cwd '%s' is not a directory", cwd))
	}
	env, err := environ(u, s.state.EnvVars(), cfg.GetEnvs())
	if err != nil {
		return err
	}
	keepalive := keepaliveInterval(req.Header().Get("Keepalive-Ping-Interval"))

	std, err := openStdio(req.Msg)
	if err != nil {
		return asConnectError(err)
	}
	cmd, err := command(u, cfg, cwd, env, std)
	if err != nil {
		std.close()
		return err
	}

	p := newProc()
	p.tag = req.Msg.Tag
	p.config = proto.CloneOf(cfg)
	p.config.Cwd = &cwd
	p.pty, p.stdin = std.pty, std.stdin
	p.outputs = outputsOf(std.pty, std.stdout, std.stderr)

	s.mu.Lock()
	if p.tag != nil {
		if other := s.runningByTag(*p.tag); other != nil {
			s.mu.Unlock()
			std.close()
			return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("tag %q is already used by running process %d", *p.tag, other.pid))
		}
	}
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		std.close()
		return startError(cfg.GetCmd(), err)
	}
	p.pid = uint32(cmd.Process.Pid)
	s.procs[p.pid] = p
	sub := p.subscribe()
	s.mu.Unlock()
	defer p.unsubscribe(sub)

	std.closeChild()
	// The pid is all envd needs; Release frees the pidfd os/exec holds.
	cmd.Process.Release()
	s.lowerOOMPriority(p.pid)
	if hasDeadline {
		p.deadline = time.AfterFunc(time.Until(deadline), func() { s.signal(p, unix.SIGKILL) })
	}
	s.log.Debug("process started", "pid", p.pid, "cmd", cfg.GetCmd(), "user", u.Name, "pty", p.pty != nil)
	go s.run(p)

	return p.follow(ctx, sub, keepalive, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.StartResponse{Event: ev})
	})
}

// run owns p from its start to being forgotten retainExited after its end.
func (s *Service) run(p *proc) {
	p.run()
	s.log.Debug("process ended", "pid", p.pid, "status", p.end.GetStatus())
	time.AfterFunc(retainExited, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		// The pid may have been reused by a newer process meanwhile.
		if s.procs[p.pid] == p {
			delete(s.procs, p.pid)
		}
	})
}

// lowerOOMPriority makes the kernel's OOM killer pick user processes before
// envd, so the sandbox stays reachable under memory pressure. Best effort.
func (s *Service) lowerOOMPriority(pid uint32) {
	path := fmt.Sprintf("/proc/%d/oom_score_adj", pid)
	if err := os.WriteFile(path, []byte("100"), 0); err != nil {
		s.log.Debug("cannot set oom_score_adj", "pid", pid, "err", err)
	}
}

// Connect follows a running or recently exited process.
func (s *Service) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	p, err := s.find(req.Msg.GetProcess(), true)
	if err != nil {
		return err
	}
	sub := p.subscribe()
	defer p.unsubscribe(sub)
	return p.follow(ctx, sub, keepaliveInterval(req.Header().Get("Keepalive-Ping-Interval")), func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.ConnectResponse{Event: ev})
	})
}

// List returns the processes that are still running, by pid.
func (s *Service) List(ctx context.Context, req *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	s.mu.Lock()
	var infos []*pb.ProcessInfo
	for _, p := range s.procs {
		if !p.hasExited() {
			infos = append(infos, &pb.ProcessInfo{Config: p.config, Pid: p.pid, Tag: p.tag})
		}
	}
	s.mu.Unlock()
	slices.SortFunc(infos, func(a, b *pb.ProcessInfo) int { return int(a.Pid) - int(b.Pid) })
	return connect.NewResponse(&pb.ListResponse{Processes: infos}), nil
}

// SendInput writes stdin bytes to a pipe process or pty bytes to a PTY process.
func (s *Service) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	p, err := s.find(req.Msg.GetProcess(), false)
	if err != nil {
		return nil, err
	}
	if err := s.input(ctx, p, req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

// StreamInput feeds one process from a client stream: a start event naming
// the process, then data events.
func (s *Service) StreamInput(ctx context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	var p *proc
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			found, err := s.find(ev.Start.GetProcess(), false)
			if err != nil {
				return nil, err
			}
			p = found
		case *pb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("data before start: the first event must name the process"))
			}
			if err := s.input(ctx, p, ev.Data.GetInput()); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

func (s *Service) input(ctx context.Context, p *proc, in *pb.ProcessInput) error {
	switch in := in.GetInput().(type) {
	case *pb.ProcessInput_Stdin:
		if p.pty != nil {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has a pty: send input as pty, not stdin", p.pid))
		}
		f := p.stdinFile()
		if f == nil {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("stdin of process %d is not open (started with stdin: false, or closed)", p.pid))
		}
		return p.write(ctx, f, "stdin", in.Stdin)
	case *pb.ProcessInput_Pty:
		if p.pty == nil {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no pty: send input as stdin", p.pid))
		}
		return p.write(ctx, p.pty, "pty", in.Pty)
	}
	return connect.NewError(connect.CodeInvalidArgument, errors.New("input is empty: set stdin or pty"))
}

// SendSignal sends SIGTERM or SIGKILL to a running process's process group.
func (s *Service) SendSignal(ctx context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	var sig unix.Signal
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGTERM:
		sig = unix.SIGTERM
	case pb.Signal_SIGNAL_SIGKILL:
		sig = unix.SIGKILL
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %v is not one of SIGNAL_SIGTERM, SIGNAL_SIGKILL", req.Msg.GetSignal()))
	}
	p, err := s.find(req.Msg.GetProcess(), false)
	if err != nil {
		return nil, err
	}
	if !s.signal(p, sig) {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process %d is not running", p.pid))
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

// signal sends sig to p's process group, which reaches `a && b`, pipelines
// and background jobs. It reports false when p has already exited. Holding
// s.mu keeps the reaper from freeing the pid for reuse meanwhile.
func (s *Service) signal(p *proc, sig unix.Signal) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.hasExited() {
		return false
	}
	// The group exists while its leader is unreaped (a zombie still counts),
	// and exec completed its setpgid/setsid before Start returned.
	unix.Kill(-int(p.pid), sig)
	return true
}

// CloseStdin closes a pipe process's stdin, so it reads EOF.
func (s *Service) CloseStdin(ctx context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	p, err := s.find(req.Msg.GetProcess(), false)
	if err != nil {
		return nil, err
	}
	if p.pty != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has a pty, which has no stdin to close: send 0x04 (Ctrl-D) as pty input", p.pid))
	}
	if !p.closeStdin() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("stdin of process %d is not open (started with stdin: false, or already closed)", p.pid))
	}
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

// Update resizes a PTY process's terminal.
func (s *Service) Update(ctx context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	p, err := s.find(req.Msg.GetProcess(), false)
	if err != nil {
		return nil, err
	}
	if p.pty == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no pty to resize", p.pid))
	}
	size := req.Msg.GetPty().GetSize()
	if size == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("pty.size is missing: nothing to update"))
	}
	if size.Cols == 0 || size.Rows == 0 || size.Cols > 0xffff || size.Rows > 0xffff {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("pty size %dx%d: cols and rows must be 1-65535", size.Cols, size.Rows))
	}
	if err := p.resize(uint16(size.Cols), uint16(size.Rows)); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process %d is not running", p.pid))
		}
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

// find looks a process up by pid or tag: running ones, and with withExited
// also those that exited within retainExited.
func (s *Service) find(sel *pb.ProcessSelector, withExited bool) (*proc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch sel := sel.GetSelector().(type) {
	case *pb.ProcessSelector_Pid:
		if p := s.procs[sel.Pid]; p != nil && (withExited || !p.hasExited()) {
			return p, nil
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d not found", sel.Pid))
	case *pb.ProcessSelector_Tag:
		if p := s.runningByTag(sel.Tag); p != nil {
			return p, nil
		}
		if withExited {
			var latest *proc
			for _, p := range s.procs {
				if p.tag != nil && *p.tag == sel.Tag && (latest == nil || p.exitedAt.After(latest.exitedAt)) {
					latest = p
				}
			}
			if latest != nil {
				return latest, nil
			}
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with tag %q not found", sel.Tag))
	}
	return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector is empty: set pid or tag"))
}

// runningByTag returns the running process with tag, or nil. The caller holds s.mu.
func (s *Service) runningByTag(tag string) *proc {
	for _, p := range s.procs {
		if p.tag != nil && *p.tag == tag && !p.hasExited() {
			return p
		}
	}
	return nil
}

// keepaliveInterval parses Keepalive-Ping-Interval (seconds).
func keepaliveInterval(header string) time.Duration {
	if n, err := strconv.Atoi(header); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	return defaultKeepalive
}

// asConnectError keeps Connect errors and makes others internal.
func asConnectError(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	return connect.NewError(connect.CodeInternal, err)
}
