package process_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
)

// codecs are the wire formats the service must serve: the SDKs' JSON and
// binary protobuf.
var codecs = []struct {
	name string
	opts []connect.ClientOption
}{
	{"proto", nil},
	{"json", []connect.ClientOption{connect.WithProtoJSON()}},
}

// bash runs script with /bin/bash -c (no login shell, so profiles do not
// change the environment under test).
func bash(script string) *pb.ProcessConfig {
	return &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}
}

// result is everything one stream delivered.
type result struct {
	first      string // kind of the first event
	pid        uint32
	stdout     bytes.Buffer
	stderr     bytes.Buffer
	pty        bytes.Buffer
	maxChunk   int
	keepalives int
	end        *pb.ProcessEvent_EndEvent
	err        error // the stream's error; nil when it ended cleanly
}

type eventMsg interface{ GetEvent() *pb.ProcessEvent }

// next returns the stream's next event, or io.EOF at its clean end.
func next[T any, PT interface {
	*T
	eventMsg
}](s *connect.ServerStreamForClient[T]) (*pb.ProcessEvent, error) {
	if !s.Receive() {
		if err := s.Err(); err != nil {
			return nil, err
		}
		return nil, io.EOF
	}
	return PT(s.Msg()).GetEvent(), nil
}

// add records one event.
func (r *result) add(ev *pb.ProcessEvent) {
	kind := ""
	switch e := ev.GetEvent().(type) {
	case *pb.ProcessEvent_Start:
		kind = "start"
		r.pid = e.Start.GetPid()
	case *pb.ProcessEvent_Data:
		kind = "data"
		var b []byte
		switch o := e.Data.GetOutput().(type) {
		case *pb.ProcessEvent_DataEvent_Stdout:
			b = o.Stdout
			r.stdout.Write(b)
		case *pb.ProcessEvent_DataEvent_Stderr:
			b = o.Stderr
			r.stderr.Write(b)
		case *pb.ProcessEvent_DataEvent_Pty:
			b = o.Pty
			r.pty.Write(b)
		}
		r.maxChunk = max(r.maxChunk, len(b))
	case *pb.ProcessEvent_Keepalive:
		kind = "keepalive"
		r.keepalives++
	case *pb.ProcessEvent_End:
		kind = "end"
		r.end = e.End
	}
	if r.first == "" {
		r.first = kind
	}
}

// drain reads a stream to its end.
func drain[T any, PT interface {
	*T
	eventMsg
}](s *connect.ServerStreamForClient[T]) *result {
	r := &result{}
	for {
		ev, err := next[T, PT](s)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.err = err
			}
			return r
		}
		r.add(ev)
	}
}

// run starts req and reads its stream to the end.
func run(t *testing.T, c processconnect.ProcessClient, req *pb.StartRequest) *result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	s, err := c.Start(ctx, connect.NewRequest(req))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer s.Close()
	return drain(s)
}

// mustExit checks a clean run with exit code 0 and a start event first.
func mustExit(t *testing.T, r *result, code int32) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("stream error: %v (stdout %q, stderr %q)", r.err, r.stdout.String(), r.stderr.String())
	}
	if r.first != "start" || r.pid == 0 {
		t.Fatalf("first event %q with pid %d; want start with a pid", r.first, r.pid)
	}
	if r.end == nil {
		t.Fatalf("no end event")
	}
	if r.end.GetExitCode() != code || !r.end.GetExited() {
		t.Fatalf("end = %v; want exited with code %d (stdout %q, stderr %q)", r.end, code, r.stdout.String(), r.stderr.String())
	}
}

func codeOf(err error) connect.Code {
	return connect.CodeOf(err)
}

func TestStartOutputAndEnd(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	errStatus3 := "exit status 3"
	cases := []struct {
		name       string
		script     string
		stdout     string
		stderr     string
		exitCode   int32
		exited     bool
		status     string
		wantErrMsg *string
	}{
		{name: "echo", script: "echo hi", stdout: "hi\n", exited: true, status: "exit status 0"},
		{name: "exit code", script: "echo out; exit 3", stdout: "out\n", exitCode: 3, exited: true, status: "exit status 3", wantErrMsg: &errStatus3},
		{name: "stderr", script: "echo oops >&2", stderr: "oops\n", exited: true, status: "exit status 0"},
		{name: "killed by signal", script: "kill -KILL $$", exitCode: -1, exited: false, status: "signal: killed", wantErrMsg: ptr("signal: killed")},
	}
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		for _, tc := range cases {
			t.Run(codec.name+"/"+tc.name, func(t *testing.T) {
				r := run(t, c, &pb.StartRequest{Process: bash(tc.script), Stdin: ptr(false)})
				if r.err != nil {
					t.Fatalf("stream error: %v", r.err)
				}
				if r.first != "start" || r.pid == 0 {
					t.Fatalf("first event %q pid %d; want start with a pid", r.first, r.pid)
				}
				if got := r.stdout.String(); got != tc.stdout {
					t.Errorf("stdout = %q; want %q", got, tc.stdout)
				}
				if got := r.stderr.String(); got != tc.stderr {
					t.Errorf("stderr = %q; want %q", got, tc.stderr)
				}
				if r.end == nil {
					t.Fatal("no end event")
				}
				if r.end.GetExitCode() != tc.exitCode || r.end.GetExited() != tc.exited || r.end.GetStatus() != tc.status {
					t.Errorf("end = {exitCode %d, exited %v, status %q}; want {%d, %v, %q}",
						r.end.GetExitCode(), r.end.GetExited(), r.end.GetStatus(), tc.exitCode, tc.exited, tc.status)
				}
				switch {
				case tc.wantErrMsg == nil && r.end.Error != nil:
					t.Errorf("end.error = %q; want none for a clean exit", r.end.GetError())
				case tc.wantErrMsg != nil && r.end.GetError() != *tc.wantErrMsg:
					t.Errorf("end.error = %q; want %q", r.end.GetError(), *tc.wantErrMsg)
				}
			})
		}
	}
}

func TestEnvironment(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	if code := agent.Init(t, map[string]any{"envVars": map[string]string{"FROM_SANDBOX": "sandbox", "OVERRIDDEN": "sandbox"}}, nil); code != 204 {
		t.Fatalf("/init = %d", code)
	}
	u := envdtest.EnsureUser(t)
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		t.Run(codec.name+"/precedence", func(t *testing.T) {
			cfg := bash(`echo "$FROM_SANDBOX|$OVERRIDDEN|$ONLY_HERE|$HOME|$USER|$LOGNAME|$E2B_SANDBOX"`)
			cfg.Envs = map[string]string{"OVERRIDDEN": "request", "ONLY_HERE": "here"}
			r := run(t, c, &pb.StartRequest{Process: cfg, Stdin: ptr(false)})
			mustExit(t, r, 0)
			want := fmt.Sprintf("sandbox|request|here|%s|user|user|true\n", u.HomeDir)
			if got := r.stdout.String(); got != want {
				t.Errorf("stdout = %q; want %q", got, want)
			}
		})
		t.Run(codec.name+"/request envs reach only their process", func(t *testing.T) {
			r := run(t, c, &pb.StartRequest{Process: bash(`echo "[$ONLY_HERE|$OVERRIDDEN]"`), Stdin: ptr(false)})
			mustExit(t, r, 0)
			if got := r.stdout.String(); got != "[|sandbox]\n" {
				t.Errorf("stdout = %q; want %q", got, "[|sandbox]\n")
			}
		})
	}
}

func TestWorkingDirectory(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	u := envdtest.EnsureUser(t)
	cases := []struct {
		name    string
		cwd     *string
		want    string
		code    connect.Code
		message string
	}{
		{name: "home by default", want: u.HomeDir},
		{name: "explicit", cwd: ptr("/tmp"), want: "/tmp"},
		{name: "tilde", cwd: ptr("~"), want: u.HomeDir},
		{name: "missing", cwd: ptr("/no/such/dir"), code: connect.CodeInvalidArgument, message: "cwd '/no/such/dir' does not exist"},
		{name: "not a directory", cwd: ptr("/etc/passwd"), code: connect.CodeInvalidArgument, message: "cwd '/etc/passwd' is not a directory"},
	}
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		for _, tc := range cases {
			t.Run(codec.name+"/"+tc.name, func(t *testing.T) {
				cfg := bash("pwd")
				cfg.Cwd = tc.cwd
				r := run(t, c, &pb.StartRequest{Process: cfg, Stdin: ptr(false)})
				if tc.code != 0 {
					if codeOf(r.err) != tc.code || !strings.Contains(r.err.Error(), tc.message) {
						t.Fatalf("err = %v; want %v containing %q", r.err, tc.code, tc.message)
					}
					return
				}
				mustExit(t, r, 0)
				if got := strings.TrimSpace(r.stdout.String()); got != tc.want {
					t.Errorf("pwd = %q; want %q", got, tc.want)
				}
			})
		}
	}
	t.Run("sandbox default workdir", func(t *testing.T) {
		if code := agent.Init(t, map[string]any{"defaultWorkdir": "/var"}, nil); code != 204 {
			t.Fatalf("/init = %d", code)
		}
		r := run(t, agent.ProcessClient(), &pb.StartRequest{Process: bash("pwd"), Stdin: ptr(false)})
		mustExit(t, r, 0)
		if got := strings.TrimSpace(r.stdout.String()); got != "/var" {
			t.Errorf("pwd = %q; want /var", got)
		}
	})
}

func TestUsers(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	u := envdtest.EnsureUser(t)
	gids, err := u.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(gids)
	cases := []struct {
		name   string
		as     string
		script string
		want   string
	}{
		{name: "default user uid", script: "id -u", want: u.Uid},
		{name: "default user groups", script: "id -G | tr ' ' '\\n' | sort | tr '\\n' ' '", want: strings.Join(gids, " ")},
		{name: "named user", as: envdtest.TestUser, script: "id -un", want: envdtest.TestUser},
		{name: "root", as: "root", script: "id -u; id -g", want: "0\n0"},
		{name: "root home", as: "root", script: "pwd", want: "/root"},
	}
	for _, codec := range codecs {
		for _, tc := range cases {
			t.Run(codec.name+"/"+tc.name, func(t *testing.T) {
				opts := slices.Clone(codec.opts)
				if tc.as != "" {
					opts = append(opts, envdtest.AsUser(tc.as, ""))
				}
				r := run(t, agent.ProcessClient(opts...), &pb.StartRequest{Process: bash(tc.script), Stdin: ptr(false)})
				mustExit(t, r, 0)
				if got := strings.TrimSpace(r.stdout.String()); got != tc.want {
					t.Errorf("output = %q; want %q", got, tc.want)
				}
			})
		}
		t.Run(codec.name+"/unknown user", func(t *testing.T) {
			opts := append(slices.Clone(codec.opts), envdtest.AsUser("no-such-user", ""))
			r := run(t, agent.ProcessClient(opts...), &pb.StartRequest{Process: bash("true"), Stdin: ptr(false)})
			if codeOf(r.err) != connect.CodeUnauthenticated || !strings.Contains(r.err.Error(), "invalid username: 'no-such-user'") {
				t.Fatalf("err = %v; want unauthenticated \"invalid username: 'no-such-user'\"", r.err)
			}
		})
	}
}

// started opens a Start stream and returns it after its start event.
func started(t *testing.T, ctx context.Context, c processconnect.ProcessClient, req *connect.Request[pb.StartRequest]) (*connect.ServerStreamForClient[pb.StartResponse], uint32) {
	t.Helper()
	s, err := c.Start(ctx, req)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	ev, err := next(s)
	if err != nil {
		t.Fatalf("first event: %v", err)
	}
	if ev.GetStart() == nil || ev.GetStart().GetPid() == 0 {
		t.Fatalf("first event = %v; want start with a pid", ev)
	}
	return s, ev.GetStart().GetPid()
}

func TestStdin(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		t.Run(codec.name+"/SendInput then CloseStdin", func(t *testing.T) {
			s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}}))
			defer s.Close()
			sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
			for _, chunk := range []string{"hello ", "world\n"} {
				if _, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte(chunk)}}})); err != nil {
					t.Fatalf("SendInput: %v", err)
				}
			}
			if _, err := c.CloseStdin(t.Context(), connect.NewRequest(&pb.CloseStdinRequest{Process: sel})); err != nil {
				t.Fatalf("CloseStdin: %v", err)
			}
			r := drain(s)
			r.first, r.pid = "start", pid
			mustExit(t, r, 0)
			if got := r.stdout.String(); got != "hello world\n" {
				t.Errorf("stdout = %q; want %q", got, "hello world\n")
			}
		})
		t.Run(codec.name+"/pty input to a pipe process", func(t *testing.T) {
			s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}}))
			defer s.Close()
			sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
			_, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte("x")}}}))
			if codeOf(err) != connect.CodeFailedPrecondition {
				t.Errorf("SendInput pty = %v; want failed_precondition", err)
			}
			_, err = c.Update(t.Context(), connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 10, Rows: 10}}}))
			if codeOf(err) != connect.CodeFailedPrecondition {
				t.Errorf("Update = %v; want failed_precondition", err)
			}
			if _, err := c.CloseStdin(t.Context(), connect.NewRequest(&pb.CloseStdinRequest{Process: sel})); err != nil {
				t.Fatalf("CloseStdin: %v", err)
			}
			mustExit(t, drainStarted(s, pid), 0)
		})
		t.Run(codec.name+"/stdin false reads EOF", func(t *testing.T) {
			r := run(t, c, &pb.StartRequest{Process: bash("read x"), Stdin: ptr(false)})
			mustExit(t, r, 1)
		})
	}
	t.Run("CloseStdin without stdin", func(t *testing.T) {
		c := agent.ProcessClient()
		s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("sleep 0.5"), Stdin: ptr(false)}))
		defer s.Close()
		_, err := c.CloseStdin(t.Context(), connect.NewRequest(&pb.CloseStdinRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}}))
		if codeOf(err) != connect.CodeFailedPrecondition {
			t.Errorf("CloseStdin = %v; want failed_precondition", err)
		}
		mustExit(t, drainStarted(s, pid), 0)
	})
	t.Run("StreamInput", func(t *testing.T) {
		c := agent.ProcessClient()
		s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("head -n 2")}))
		defer s.Close()
		in := c.StreamInput(t.Context())
		msgs := []*pb.StreamInputRequest{
			{Event: &pb.StreamInputRequest_Start{Start: &pb.StreamInputRequest_StartEvent{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}}}},
			{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("one\n")}}}}},
			{Event: &pb.StreamInputRequest_Keepalive{Keepalive: &pb.StreamInputRequest_KeepAlive{}}},
			{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("two\n")}}}}},
		}
		for _, m := range msgs {
			if err := in.Send(m); err != nil {
				t.Fatalf("StreamInput send: %v", err)
			}
		}
		if _, err := in.CloseAndReceive(); err != nil {
			t.Fatalf("StreamInput: %v", err)
		}
		r := drainStarted(s, pid)
		mustExit(t, r, 0)
		if got := r.stdout.String(); got != "one\ntwo\n" {
			t.Errorf("stdout = %q; want %q", got, "one\ntwo\n")
		}
	})
}

// drainStarted reads the rest of a stream whose start event was consumed.
func drainStarted(s *connect.ServerStreamForClient[pb.StartResponse], pid uint32) *result {
	r := drain(s)
	r.first, r.pid = "start", pid
	return r
}

// waitFor reads events into r until ok(r) or the stream ends.
func waitFor[T any, PT interface {
	*T
	eventMsg
}](t *testing.T, s *connect.ServerStreamForClient[T], r *result, what string, ok func(*result) bool) {
	t.Helper()
	for !ok(r) {
		ev, err := next[T, PT](s)
		if err != nil {
			t.Fatalf("waiting for %s: %v (pty so far %q, stdout %q)", what, err, r.pty.String(), r.stdout.String())
		}
		r.add(ev)
	}
}

func TestPTY(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		t.Run(codec.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			cfg := bash(`tty; stty size; read line; echo "got:$line"; read resized; stty size`)
			cfg.Envs = map[string]string{"TERM": "xterm-256color"}
			s, pid := started(t, ctx, c, connect.NewRequest(&pb.StartRequest{Process: cfg, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 100, Rows: 30}}}))
			defer s.Close()
			sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
			r := &result{first: "start", pid: pid}

			waitFor(t, s, r, "tty and size", func(r *result) bool { return strings.Contains(r.pty.String(), "30 100") })
			if !regexp.MustCompile(`/dev/pts/\d+`).MatchString(r.pty.String()) {
				t.Errorf("tty printed %q; want /dev/pts/N", r.pty.String())
			}

			send := func(b string) {
				t.Helper()
				if _, err := c.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte(b)}}})); err != nil {
					t.Fatalf("SendInput pty: %v", err)
				}
			}
			send("abc\n")
			// The terminal echoes the input and bash prints what it read.
			waitFor(t, s, r, "echo", func(r *result) bool { return strings.Contains(r.pty.String(), "got:abc") })
			if !strings.Contains(r.pty.String(), "abc\r\n") {
				t.Errorf("pty output %q lacks the terminal's echo of the input", r.pty.String())
			}

			if _, err := c.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 120, Rows: 40}}})); err != nil {
				t.Fatalf("Update: %v", err)
			}
			send("\n")
			waitFor(t, s, r, "new size", func(r *result) bool { return strings.Contains(r.pty.String(), "40 120") })

			rest := drain(s)
			if rest.err != nil || rest.end == nil || rest.end.GetExitCode() != 0 {
				t.Fatalf("end = %v, err %v; want exit 0", rest.end, rest.err)
			}
			if r.stdout.Len()+r.stderr.Len()+rest.stdout.Len()+rest.stderr.Len() != 0 {
				t.Errorf("a pty process produced stdout/stderr events; output must only be data.pty")
			}
		})
	}
	t.Run("wrong kind of input", func(t *testing.T) {
		c := agent.ProcessClient()
		s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("read x"), Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}}}))
		defer s.Close()
		sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
		_, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x\n")}}}))
		if codeOf(err) != connect.CodeFailedPrecondition {
			t.Errorf("SendInput stdin to a pty = %v; want failed_precondition", err)
		}
		_, err = c.CloseStdin(t.Context(), connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
		if codeOf(err) != connect.CodeFailedPrecondition {
			t.Errorf("CloseStdin on a pty = %v; want failed_precondition", err)
		}
		// Ctrl-D ends the read.
		if _, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte{4}}}})); err != nil {
			t.Fatalf("SendInput: %v", err)
		}
		mustExit(t, drainStarted(s, pid), 1)
	})
}

func TestPTYStreamEndsDespiteGrandchild(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	c := agent.ProcessClient()
	// The background sleep ignores the hangup and keeps the terminal open
	// after the shell exits; the stream must end anyway.
	begin := time.Now()
	s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{
		Process: bash("trap '' HUP; sleep 30 & echo bye"),
		Pty:     &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}},
	}))
	defer s.Close()
	t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
	r := drainStarted(s, pid)
	mustExit(t, r, 0)
	if took := time.Since(begin); took > 1500*time.Millisecond {
		t.Errorf("the stream took %v; want it to end soon after the shell", took)
	}
	if !strings.Contains(r.pty.String(), "bye") {
		t.Errorf("pty output = %q; want bye", r.pty.String())
	}
	if n := len(groupMembers(t, int(pid))); n != 1 {
		t.Errorf("process group %d has %d members; want the surviving sleep (the test is moot otherwise)", pid, n)
	}
}

func TestStartErrors(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	cases := []struct {
		name string
		req  *pb.StartRequest
		code connect.Code
		msg  string
	}{
		{name: "empty cmd", req: &pb.StartRequest{Process: &pb.ProcessConfig{}}, code: connect.CodeInvalidArgument, msg: "cmd is empty"},
		{name: "unknown cmd", req: &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "no-such-command-xyz"}}, code: connect.CodeInvalidArgument, msg: "no-such-command-xyz"},
		{name: "missing executable", req: &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/no/such/bin"}}, code: connect.CodeInvalidArgument, msg: "/no/such/bin"},
		{name: "bad env name", req: &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true", Envs: map[string]string{"A=B": "x"}}}, code: connect.CodeInvalidArgument, msg: "A=B"},
	}
	for _, codec := range codecs {
		for _, tc := range cases {
			t.Run(codec.name+"/"+tc.name, func(t *testing.T) {
				r := run(t, agent.ProcessClient(codec.opts...), tc.req)
				if codeOf(r.err) != tc.code || !strings.Contains(r.err.Error(), tc.msg) {
					t.Errorf("err = %v; want %v naming %q", r.err, tc.code, tc.msg)
				}
				if r.first != "" {
					t.Errorf("got a %s event before the error; a failed start sends none", r.first)
				}
			})
		}
	}
	t.Run("unsupported signal", func(t *testing.T) {
		c := agent.ProcessClient()
		s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("sleep 30"), Stdin: ptr(false)}))
		defer s.Close()
		t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
		_, err := c.SendSignal(t.Context(), connect.NewRequest(&pb.SendSignalRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: pb.Signal_SIGNAL_UNSPECIFIED}))
		if codeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("SendSignal(SIGNAL_UNSPECIFIED) = %v; want invalid_argument", err)
		}
	})
}

func TestOOMScoreAdj(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	c := agent.ProcessClient()
	// The start event is sent after envd set the score; reading it only once
	// input arrives avoids racing that write.
	s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("read x; cat /proc/$$/oom_score_adj")}))
	defer s.Close()
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
	if _, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("go\n")}}})); err != nil {
		t.Fatal(err)
	}
	r := drainStarted(s, pid)
	mustExit(t, r, 0)
	if got := strings.TrimSpace(r.stdout.String()); got != "100" {
		t.Errorf("oom_score_adj = %q; want 100 so the OOM killer picks user processes before envd", got)
	}
}

// listed returns the running process with pid from List, or nil.
func listed(t *testing.T, c processconnect.ProcessClient, pid uint32) *pb.ProcessInfo {
	t.Helper()
	resp, err := c.List(t.Context(), connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	for _, p := range resp.Msg.GetProcesses() {
		if p.GetPid() == pid {
			return p
		}
	}
	return nil
}

func TestBackgroundProcess(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	u := envdtest.EnsureUser(t)
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		t.Run(codec.name, func(t *testing.T) {
			tag := "bg-" + codec.name
			cfg := bash(`for i in $(seq 1 300); do echo tick $i; sleep 0.1; done`)
			cfg.Envs = map[string]string{"A": "1"}
			startCtx, cancelStart := context.WithCancel(t.Context())
			s, pid := started(t, startCtx, c, connect.NewRequest(&pb.StartRequest{Process: cfg, Tag: &tag, Stdin: ptr(false)}))
			t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
			if ev, err := next(s); err != nil || len(ev.GetData().GetStdout()) == 0 {
				t.Fatalf("second event = %v, %v; want stdout", ev, err)
			}
			// The client goes away; the process must not.
			cancelStart()
			s.Close()
			time.Sleep(500 * time.Millisecond)

			info := listed(t, c, pid)
			if info == nil {
				t.Fatalf("List does not show pid %d after its client disconnected", pid)
			}
			if info.GetTag() != tag || info.GetConfig().GetCmd() != "/bin/bash" || !slices.Equal(info.GetConfig().GetArgs(), cfg.Args) ||
				info.GetConfig().GetEnvs()["A"] != "1" || info.GetConfig().GetCwd() != u.HomeDir {
				t.Errorf("List entry = %v; want tag %q and the requested config with cwd %q", info, tag, u.HomeDir)
			}

			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			cs, err := c.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}}))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			defer cs.Close()
			r := &result{}
			waitFor(t, cs, r, "output after re-attaching", func(r *result) bool { return strings.Contains(r.stdout.String(), "tick") })
			if r.first != "start" || r.pid != pid {
				t.Errorf("Connect's first event %q pid %d; want start with pid %d", r.first, r.pid, pid)
			}

			if _, err := c.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
				t.Fatalf("SendSignal: %v", err)
			}
			rest := drain(cs)
			if rest.err != nil || rest.end == nil {
				t.Fatalf("after SIGKILL: end %v, err %v", rest.end, rest.err)
			}
			if rest.end.GetExitCode() != -1 || rest.end.GetExited() || rest.end.GetStatus() != "signal: killed" {
				t.Errorf("end = %v; want exitCode -1, exited false, status \"signal: killed\"", rest.end)
			}
			if info := listed(t, c, pid); info != nil {
				t.Errorf("List still shows killed pid %d", pid)
			}
			_, err = c.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: pb.Signal_SIGNAL_SIGKILL}))
			if codeOf(err) != connect.CodeNotFound {
				t.Errorf("SendSignal to an exited process = %v; want not_found", err)
			}

			// A recently exited process can still be connected to: start, then its end.
			again, err := c.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}}))
			if err != nil {
				t.Fatalf("Connect after exit: %v", err)
			}
			late := drain(again)
			if late.err != nil || late.first != "start" || late.pid != pid || late.end.GetStatus() != "signal: killed" {
				t.Errorf("Connect after exit: first %q pid %d end %v err %v; want start, then the end", late.first, late.pid, late.end, late.err)
			}
		})
	}
}

// groupMembers lists the pids whose process group is pgid.
func groupMembers(t *testing.T, pgid int) []int {
	t.Helper()
	var pids []int
	for _, st := range procStats(t) {
		if st.pgrp == pgid {
			pids = append(pids, st.pid)
		}
	}
	return pids
}

type procStat struct {
	pid, ppid, pgrp int
	state           string
}

// procStats reads /proc/*/stat.
func procStats(t *testing.T) []procStat {
	t.Helper()
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []procStat
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may contain spaces.
		s := string(raw)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		pid, _ := strconv.Atoi(strings.Fields(s)[0])
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		out = append(out, procStat{pid: pid, ppid: ppid, pgrp: pgrp, state: f[0]})
	}
	return out
}

func TestSendSignal(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	c := agent.ProcessClient(connect.WithProtoJSON())
	cases := []struct {
		name   string
		script string
		signal pb.Signal
		status string
	}{
		{name: "SIGKILL reaches the whole group", script: "sleep 100 & sleep 100; echo unreachable", signal: pb.Signal_SIGNAL_SIGKILL, status: "signal: killed"},
		{name: "SIGTERM", script: "sleep 100 & sleep 100", signal: pb.Signal_SIGNAL_SIGTERM, status: "signal: terminated"},
		{name: "and-list", script: "sleep 100 && echo unreachable", signal: pb.Signal_SIGNAL_SIGKILL, status: "signal: killed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			s, pid := started(t, ctx, c, connect.NewRequest(&pb.StartRequest{Process: bash(tc.script), Stdin: ptr(false)}))
			t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
			defer s.Close()
			// Wait until the shell has started its children.
			deadline := time.Now().Add(5 * time.Second)
			for len(groupMembers(t, int(pid))) < 2 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if n := len(groupMembers(t, int(pid))); n < 2 {
				t.Fatalf("process group %d has %d members; want the shell and its sleeps", pid, n)
			}
			if _, err := c.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: tc.signal})); err != nil {
				t.Fatalf("SendSignal: %v", err)
			}
			begin := time.Now()
			r := drainStarted(s, pid)
			if r.err != nil || r.end == nil || r.end.GetStatus() != tc.status || r.end.GetExitCode() != -1 {
				t.Fatalf("end = %v, err %v; want status %q, exitCode -1", r.end, r.err, tc.status)
			}
			if took := time.Since(begin); took > 3*time.Second {
				t.Errorf("stream ended %v after the signal; want promptly", took)
			}
			if strings.Contains(r.stdout.String(), "unreachable") {
				t.Errorf("the command after the killed one ran: %q", r.stdout.String())
			}
			deadline = time.Now().Add(3 * time.Second)
			for len(groupMembers(t, int(pid))) > 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if left := groupMembers(t, int(pid)); len(left) > 0 {
				t.Errorf("processes %v of the group survived the signal", left)
			}
		})
	}
}

func TestNotFound(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	byPid := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: 4_000_000}}
	byTag := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: "no-such-tag"}}
	for _, codec := range codecs {
		c := agent.ProcessClient(codec.opts...)
		for _, sel := range []*pb.ProcessSelector{byPid, byTag} {
			calls := map[string]func() error{
				"SendSignal": func() error {
					_, err := c.SendSignal(t.Context(), connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL}))
					return err
				},
				"SendInput": func() error {
					_, err := c.SendInput(t.Context(), connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
					return err
				},
				"CloseStdin": func() error {
					_, err := c.CloseStdin(t.Context(), connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
					return err
				},
				"Update": func() error {
					_, err := c.Update(t.Context(), connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 1, Rows: 1}}}))
					return err
				},
				"Connect": func() error {
					s, err := c.Connect(t.Context(), connect.NewRequest(&pb.ConnectRequest{Process: sel}))
					if err != nil {
						return err
					}
					defer s.Close()
					return drain(s).err
				},
			}
			for name, call := range calls {
				t.Run(fmt.Sprintf("%s/%s/%v", codec.name, name, sel), func(t *testing.T) {
					if err := call(); codeOf(err) != connect.CodeNotFound {
						t.Errorf("err = %v; want not_found", err)
					}
				})
			}
		}
	}
}

func TestDuplicateTag(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	c := agent.ProcessClient()
	tag := "only-one"
	s, pid := started(t, t.Context(), c, connect.NewRequest(&pb.StartRequest{Process: bash("sleep 30"), Tag: &tag, Stdin: ptr(false)}))
	defer s.Close()
	t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
	r := run(t, c, &pb.StartRequest{Process: bash("true"), Tag: &tag, Stdin: ptr(false)})
	if codeOf(r.err) != connect.CodeAlreadyExists {
		t.Fatalf("second Start with tag %q: err %v; want already_exists", tag, r.err)
	}
	if _, err := c.SendSignal(t.Context(), connect.NewRequest(&pb.SendSignalRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatalf("SendSignal by tag: %v", err)
	}
	if r := drainStarted(s, pid); r.end.GetStatus() != "signal: killed" {
		t.Fatalf("end = %v, err %v; want signal: killed", r.end, r.err)
	}
	// Once the first has ended its tag is free again.
	mustExit(t, run(t, c, &pb.StartRequest{Process: bash("true"), Tag: &tag, Stdin: ptr(false)}), 0)
}

func TestConnectTimeoutKillsProcess(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	for _, codec := range codecs {
		t.Run(codec.name, func(t *testing.T) {
			c := agent.ProcessClient(codec.opts...)
			// The client's deadline travels as Connect-Timeout-Ms.
			ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
			defer cancel()
			s, pid := started(t, ctx, c, connect.NewRequest(&pb.StartRequest{Process: bash("sleep 30"), Stdin: ptr(false)}))
			t.Cleanup(func() { syscall.Kill(-int(pid), syscall.SIGKILL) })
			r := drainStarted(s, pid)
			if codeOf(r.err) != connect.CodeDeadlineExceeded {
				t.Fatalf("stream err = %v; want deadline_exceeded", r.err)
			}
			deadline := time.Now().Add(3 * time.Second)
			for time.Now().Before(deadline) {
				if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				t.Fatalf("pid %d still exists after the request timeout", pid)
			}
		})
	}
	t.Run("no deadline, no limit", func(t *testing.T) {
		// t.Context has no deadline, so no Connect-Timeout-Ms is sent.
		s, err := agent.ProcessClient().Start(t.Context(), connect.NewRequest(&pb.StartRequest{Process: bash("sleep 1.2; echo done"), Stdin: ptr(false)}))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		r := drain(s)
		mustExit(t, r, 0)
		if r.stdout.String() != "done\n" {
			t.Errorf("stdout = %q; want done", r.stdout.String())
		}
	})
}

func TestKeepalive(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	for _, codec := range codecs {
		t.Run(codec.name, func(t *testing.T) {
			req := connect.NewRequest(&pb.StartRequest{Process: bash("sleep 2.5; echo done"), Stdin: ptr(false)})
			req.Header().Set("Keepalive-Ping-Interval", "1")
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			s, err := agent.ProcessClient(codec.opts...).Start(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			r := drain(s)
			mustExit(t, r, 0)
			if r.keepalives < 2 {
				t.Errorf("got %d keepalives during 2.5 s of silence with a 1 s interval; want at least 2", r.keepalives)
			}
		})
	}
}

func TestNoZombies(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	c := agent.ProcessClient()
	// The shell exits at once; its background children are orphaned (envd,
	// a subreaper, inherits them) and still hold the stdout pipe.
	begin := time.Now()
	r := run(t, c, &pb.StartRequest{Process: bash("for i in 1 2 3; do (sleep 1.5; exit 7) & done; echo started"), Stdin: ptr(false)})
	mustExit(t, r, 0)
	if took := time.Since(begin); took > 1200*time.Millisecond {
		t.Errorf("the stream took %v: it waited for grandchildren holding the pipe", took)
	}
	if r.stdout.String() != "started\n" {
		t.Errorf("stdout = %q", r.stdout.String())
	}
	adopted := 0
	for _, st := range procStats(t) {
		if st.ppid == agent.PID {
			adopted++
		}
	}
	if adopted < 3 {
		t.Errorf("envd has %d children after the shell exited; want its 3 orphaned grandchildren (subreaper)", adopted)
	}
	time.Sleep(2500 * time.Millisecond)
	for _, st := range procStats(t) {
		if st.ppid == agent.PID {
			t.Errorf("pid %d (state %s) is still a child of envd; want every orphan reaped", st.pid, st.state)
		}
	}
}

func TestLargeOutput(t *testing.T) {
	agent := envdtest.Start(t, envdtest.Options{})
	const size = 5 << 20
	for _, codec := range codecs {
		t.Run(codec.name, func(t *testing.T) {
			r := run(t, agent.ProcessClient(codec.opts...), &pb.StartRequest{Process: bash(fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x", size)), Stdin: ptr(false)})
			mustExit(t, r, 0)
			if r.stdout.Len() != size || bytes.Count(r.stdout.Bytes(), []byte("x")) != size {
				t.Errorf("got %d bytes of stdout; want %d bytes of x", r.stdout.Len(), size)
			}
			if r.maxChunk > 32<<10 {
				t.Errorf("largest data event %d bytes; want at most 32 KiB", r.maxChunk)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
