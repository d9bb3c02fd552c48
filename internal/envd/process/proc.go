package process

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	pb "github.com/warren-sh/warren/gen/process"
)

const (
	// pipeChunk and ptyChunk bound the bytes of one data event, as upstream envd.
	pipeChunk = 32 << 10
	ptyChunk  = 16 << 10
	// drainIdle is how long output may stay silent after the process exited
	// before its stream ends: grandchildren that inherited the pipes (`cmd &`)
	// must not keep the command's stream open.
	drainIdle = 100 * time.Millisecond
	// drainMax bounds the whole drain after exit, even for chatty grandchildren.
	drainMax = 2 * time.Second
	// retainExited is how long an exited process can still be re-attached to
	// with Connect (and yields its end event).
	retainExited = 30 * time.Second
	// subscriberBuffer lets a stream fall a few events behind before it holds
	// back the process's output.
	subscriberBuffer = 16
)

// proc is one process started by Start, from registration until it is forgotten
// retainExited after its end.
type proc struct {
	pid    uint32
	tag    *string
	config *pb.ProcessConfig // as List reports it: the request, with the resolved cwd

	pty     *os.File  // the pseudo-terminal's master, or nil for a pipe process
	outputs []*output // read and closed by run

	stdinMu sync.Mutex
	stdin   *os.File // write end of the stdin pipe; nil without one or once closed
	writeMu sync.Mutex

	deadline *time.Timer // kills the process when Connect-Timeout-Ms elapses

	// Set by the reaper under Service.mu, then exited is closed.
	status   unix.WaitStatus
	exitedAt time.Time
	exited   chan struct{}

	mu   sync.Mutex
	subs map[*subscriber]struct{}
	end  *pb.ProcessEvent_EndEvent
	done chan struct{} // closed once end is set: all output has been published
}

// subscriber is one stream following a process: Start's own, or a Connect.
type subscriber struct {
	events chan *pb.ProcessEvent
	gone   chan struct{} // closed when the stream stops listening
}

func newProc() *proc {
	return &proc{
		exited: make(chan struct{}),
		subs:   map[*subscriber]struct{}{},
		done:   make(chan struct{}),
	}
}

// hasExited reports whether the reaper has collected the process.
func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// markExited records the exit status; the reaper calls it under Service.mu.
func (p *proc) markExited(ws unix.WaitStatus) {
	p.status = ws
	p.exitedAt = time.Now()
	close(p.exited)
}

// subscribe starts delivering the process's events to a new subscriber.
func (p *proc) subscribe() *subscriber {
	sub := &subscriber{events: make(chan *pb.ProcessEvent, subscriberBuffer), gone: make(chan struct{})}
	p.mu.Lock()
	p.subs[sub] = struct{}{}
	p.mu.Unlock()
	return sub
}

func (p *proc) unsubscribe(sub *subscriber) {
	p.mu.Lock()
	delete(p.subs, sub)
	p.mu.Unlock()
	close(sub.gone)
}

// publish hands ev to every subscriber. A slow stream holds back the output,
// and through the pipe the process, rather than losing data; a stream that
// stops listening releases it at once.
func (p *proc) publish(ev *pb.ProcessEvent) {
	p.mu.Lock()
	subs := make([]*subscriber, 0, len(p.subs))
	for sub := range p.subs {
		subs = append(subs, sub)
	}
	p.mu.Unlock()
	for _, sub := range subs {
		select {
		case sub.events <- ev:
		case <-sub.gone:
		}
	}
}

// output is one stream of the process's output: the stdout or stderr pipe, or
// the pseudo-terminal.
type output struct {
	f     *os.File
	chunk int
	wrap  func([]byte) *pb.ProcessEvent_DataEvent
	// owed counts the bytes that were waiting in f when the process exited:
	// they are delivered however slowly the streams take them.
	owed atomic.Int64
}

func newOutput(f *os.File, chunk int, wrap func([]byte) *pb.ProcessEvent_DataEvent) *output {
	return &output{f: f, chunk: chunk, wrap: wrap}
}

// outputsOf lists the outputs of a PTY or pipe process.
func outputsOf(pty, stdout, stderr *os.File) []*output {
	if pty != nil {
		return []*output{newOutput(pty, ptyChunk, func(b []byte) *pb.ProcessEvent_DataEvent {
			return &pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Pty{Pty: b}}
		})}
	}
	return []*output{
		newOutput(stdout, pipeChunk, func(b []byte) *pb.ProcessEvent_DataEvent {
			return &pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stdout{Stdout: b}}
		}),
		newOutput(stderr, pipeChunk, func(b []byte) *pb.ProcessEvent_DataEvent {
			return &pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stderr{Stderr: b}}
		}),
	}
}

// pump publishes what the process writes to o until EOF, or until the output
// stays silent for drainIdle after the process exited.
func (p *proc) pump(o *output) {
	buf := make([]byte, o.chunk)
	for {
		if p.hasExited() {
			// Set before each read, after the previous publish, so a slow
			// stream never counts as silence.
			o.f.SetReadDeadline(p.drainDeadline(o))
		}
		n, err := o.f.Read(buf)
		if n > 0 {
			o.owed.Add(-int64(n))
			p.publish(&pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: o.wrap(bytes.Clone(buf[:n]))}})
		}
		if err != nil {
			// EOF; EIO from a pseudo-terminal whose last user closed it; or the
			// drain deadline.
			return
		}
	}
}

// drainDeadline is when the next read of o after the exit gives up: after
// drainIdle of silence, and, once what was there at the exit is read, no
// later than drainMax after the exit.
func (p *proc) drainDeadline(o *output) time.Time {
	d := time.Now().Add(drainIdle)
	if limit := p.exitedAt.Add(drainMax); o.owed.Load() <= 0 && d.After(limit) {
		return limit
	}
	return d
}

// pending is how many bytes wait to be read in f. TIOCINQ is Linux's FIONREAD:
// it answers for pipes and pseudo-terminals alike.
func pending(f *os.File) int64 {
	conn, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var n int
	conn.Control(func(fd uintptr) {
		n, _ = unix.IoctlGetInt(int(fd), unix.TIOCINQ)
	})
	return int64(n)
}

// run publishes the output, waits for the exit and the drain, and publishes
// the end. It owns the output files and closes them.
func (p *proc) run() {
	var wg sync.WaitGroup
	for _, o := range p.outputs {
		wg.Go(func() { p.pump(o) })
	}

	<-p.exited
	if p.deadline != nil {
		p.deadline.Stop()
	}
	// Readers blocked on pipes that grandchildren still hold give up after the
	// drain; what was written before the exit is read first.
	for _, o := range p.outputs {
		o.owed.Store(pending(o.f))
		o.f.SetReadDeadline(p.drainDeadline(o))
	}
	wg.Wait()
	for _, o := range p.outputs {
		o.f.Close()
	}
	p.closeStdin()

	p.mu.Lock()
	p.end = endEvent(p.status)
	p.mu.Unlock()
	close(p.done)
}

// endEvent describes an exit status as upstream envd does, from Go's
// ProcessState: exitCode −1 and exited false when a signal ended the process.
func endEvent(ws unix.WaitStatus) *pb.ProcessEvent_EndEvent {
	end := &pb.ProcessEvent_EndEvent{ExitCode: -1}
	switch {
	case ws.Exited():
		end.ExitCode = int32(ws.ExitStatus())
		end.Exited = true
		end.Status = fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		end.Status = "signal: " + ws.Signal().String()
	default:
		end.Status = fmt.Sprintf("wait status %#x", uint32(ws))
	}
	if ws.CoreDump() {
		end.Status += " (core dumped)"
	}
	if !ws.Exited() || ws.ExitStatus() != 0 {
		end.Error = &end.Status
	}
	return end
}

// follow streams a process's events to one client: start{pid} first, then
// data and keepalives, then end. It returns when the process has ended and
// the end was sent, or with the stream's error.
func (p *proc) follow(ctx context.Context, sub *subscriber, keepalive time.Duration, send func(*pb.ProcessEvent) error) error {
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}); err != nil {
		return err
	}
	ping := time.NewTimer(keepalive)
	defer ping.Stop()
	for {
		select {
		case ev := <-sub.events:
			if err := send(ev); err != nil {
				return err
			}
			ping.Reset(keepalive)
		case <-ping.C:
			if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
			ping.Reset(keepalive)
		case <-p.done:
			// Every publish returned before done was closed, so what is left
			// is already buffered.
		drain:
			for {
				select {
				case ev := <-sub.events:
					if err := send(ev); err != nil {
						return err
					}
				default:
					break drain
				}
			}
			p.mu.Lock()
			end := p.end
			p.mu.Unlock()
			return send(&pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: end}})
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return connect.NewError(connect.CodeDeadlineExceeded, fmt.Errorf("process %d: the request timeout (Connect-Timeout-Ms) elapsed", p.pid))
			}
			return connect.NewError(connect.CodeCanceled, ctx.Err())
		}
	}
}

// write sends input to the stdin pipe or the pseudo-terminal, giving up when
// ctx ends (a process that does not read its input must not pin the request).
func (p *proc) write(ctx context.Context, f *os.File, what string, data []byte) error {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	interrupted := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		f.SetWriteDeadline(time.Now())
		close(interrupted)
	})
	defer func() {
		if !stop() {
			// The interruption ran: undo it for the next write.
			<-interrupted
			f.SetWriteDeadline(time.Time{})
		}
	}()
	if _, err := f.Write(data); err != nil {
		switch {
		case errors.Is(err, os.ErrClosed), errors.Is(err, unix.EPIPE), errors.Is(err, unix.EIO):
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%s of process %d is closed", what, p.pid))
		case ctx.Err() != nil:
			return connect.NewError(connect.CodeDeadlineExceeded, fmt.Errorf("write %s of process %d: the process did not read its input before the request ended", what, p.pid))
		}
		return connect.NewError(connect.CodeInternal, fmt.Errorf("write %s of process %d: %w", what, p.pid, err))
	}
	return nil
}

// stdinFile returns the open stdin pipe, or nil.
func (p *proc) stdinFile() *os.File {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	return p.stdin
}

// closeStdin closes the stdin pipe; it reports whether one was open.
func (p *proc) closeStdin() bool {
	p.stdinMu.Lock()
	f := p.stdin
	p.stdin = nil
	p.stdinMu.Unlock()
	if f == nil {
		return false
	}
	// Close interrupts a write blocked on a full pipe.
	f.Close()
	return true
}

// resize sets the pseudo-terminal's window size; the foreground job gets SIGWINCH.
func (p *proc) resize(cols, rows uint16) error {
	// Through SyscallConn, not Fd: Fd would switch the file to blocking mode and
	// lose the read deadlines the drain relies on.
	conn, err := p.pty.SyscallConn()
	if err != nil {
		return fmt.Errorf("resize pty of process %d: %w", p.pid, err)
	}
	var ioctlErr error
	if err := conn.Control(func(fd uintptr) {
		ioctlErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}); err != nil {
		return fmt.Errorf("resize pty of process %d: %w", p.pid, err)
	}
	if ioctlErr != nil {
		return fmt.Errorf("resize pty of process %d: %w", p.pid, ioctlErr)
	}
	return nil
}
