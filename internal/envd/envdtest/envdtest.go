// Package envdtest runs the real envd binary for tests: built once per test
// process, started as a child process on a loopback port, stopped by PID at the
// end of the test.
package envdtest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
)

// TestUser is the account tests act as, as in E2B templates: uid 1000, home /home/user.
const TestUser = "user"

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// Binary builds cmd/envd (static, like the guest agent) once per test process,
// under the module's bin/test/<pid>/; builds of test processes that are gone
// are removed first, so nothing piles up. Under -race, envd is built with the
// race detector too, so the agent's own code is race-checked by its tests.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		base := filepath.Join(root, "bin", "test")
		removeStaleBuilds(base)
		dir := filepath.Join(base, strconv.Itoa(os.Getpid()))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "envd")
		args := []string{"build", "-o", buildPath}
		env := append(os.Environ(), "CGO_ENABLED=0")
		if raceEnabled {
			args = append(args, "-race")
			env = append(os.Environ(), "CGO_ENABLED=1")
		}
		cmd := exec.Command("go", append(args, "./cmd/envd")...)
		cmd.Dir = root
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/envd: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// removeStaleBuilds deletes bin/test/<pid> directories of processes that no longer run.
func removeStaleBuilds(base string) {
	entries, _ := os.ReadDir(base)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
			os.RemoveAll(filepath.Join(base, e.Name()))
		}
	}
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside the warren module")
	}
	return filepath.Dir(mod), nil
}

var userOnce sync.Once

// EnsureUser makes sure the account "user" exists (uid 1000 when free) with a
// home directory, creating it with useradd when missing. Tests need root.
func EnsureUser(t testing.TB) *user.User {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("envd tests run envd as root to act as other users; run them as root (make test does)")
	}
	userOnce.Do(func() {
		if _, err := user.Lookup(TestUser); err == nil {
			return
		}
		args := []string{"--create-home", "--shell", "/bin/bash"}
		if _, err := user.LookupId("1000"); err != nil {
			args = append(args, "--uid", "1000")
		}
		args = append(args, TestUser)
		if out, err := exec.Command("useradd", args...).CombinedOutput(); err != nil {
			t.Fatalf("useradd %s: %v\n%s", TestUser, err, out)
		}
	})
	u, err := user.Lookup(TestUser)
	if err != nil {
		t.Fatalf("look up %s: %v", TestUser, err)
	}
	return u
}

// Agent is a running envd.
type Agent struct {
	URL  string
	PID  int
	logs *syncWriter
}

// Options change how Start runs envd.
type Options struct {
	Args []string // extra flags
	Env  []string // extra environment
	// Host is the loopback address to listen on (default 127.0.0.1); any
	// 127.0.0.0/8 address lets a test run several agents on the same port.
	Host string
	// Port is the port to listen on (default: a free one); e.g. 49983 for
	// tests of code that treats the agent's port specially.
	Port int
}

// Start runs envd (by default on a free 127.0.0.1 port) and waits until /health answers.
// It is stopped (SIGTERM, then SIGKILL) when the test ends; its log is printed
// if the test failed.
func Start(t testing.TB, opts Options) *Agent {
	t.Helper()
	EnsureUser(t)
	bin := Binary(t)
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	attempts := 5
	if opts.Port != 0 {
		attempts = 1 // a fixed port does not get freer by retrying
	}
	var lastErr error
	for attempt := 0; attempt < attempts; attempt++ {
		port := opts.Port
		if port == 0 {
			var err error
			if port, err = freePort(opts.Host); err != nil {
				t.Fatal(err)
			}
		}
		a, err := startOn(t, bin, port, opts)
		if err == nil {
			return a
		}
		lastErr = err
	}
	t.Fatalf("start envd: %v", lastErr)
	return nil
}

func startOn(t testing.TB, bin string, port int, opts Options) (*Agent, error) {
	args := append([]string{"--host", opts.Host, "--port", strconv.Itoa(port)}, opts.Args...)
	cmd := exec.Command(bin, args...)
	logs := &syncWriter{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.Env = append(os.Environ(), opts.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	a := &Agent{URL: "http://" + net.JoinHostPort(opts.Host, strconv.Itoa(port)), PID: cmd.Process.Pid, logs: logs}
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case err := <-exited:
			return nil, fmt.Errorf("envd exited during start-up: %v\n%s", err, logs.String())
		default:
		}
		resp, err := http.Get(a.URL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNoContent {
				break
			}
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			return nil, fmt.Errorf("envd did not answer /health within 15s\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("envd log:\n%s", logs.String())
		}
	})
	return a, nil
}

// Logs returns what envd printed so far.
func (a *Agent) Logs() string { return a.logs.String() }

// Init calls POST /init with body (marshalled to JSON) and returns the status.
func (a *Agent) Init(t testing.TB, body any, headers map[string]string) int {
	t.Helper()
	raw, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, a.URL+"/init", bytes.NewReader(raw))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST /init: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// ProcessClient returns a Connect client of process.Process; connect.WithProtoJSON()
// among opts selects the JSON codec the SDKs use.
func (a *Agent) ProcessClient(opts ...connect.ClientOption) processconnect.ProcessClient {
	return processconnect.NewProcessClient(http.DefaultClient, a.URL, opts...)
}

// FilesystemClient returns a Connect client of filesystem.Filesystem.
func (a *Agent) FilesystemClient(opts ...connect.ClientOption) filesystemconnect.FilesystemClient {
	return filesystemconnect.NewFilesystemClient(http.DefaultClient, a.URL, opts...)
}

// BasicAuth is the Authorization header value that selects user, as the SDK sends it.
func BasicAuth(user string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"))
}

// AsUser returns a client interceptor that sets the Authorization (user) and,
// when token is not empty, X-Access-Token headers on every call.
func AsUser(user, token string) connect.ClientOption {
	return connect.WithInterceptors(headerInterceptor{user: user, token: token})
}

type headerInterceptor struct{ user, token string }

func (h headerInterceptor) set(hd http.Header) {
	if h.user != "" {
		hd.Set("Authorization", BasicAuth(h.user))
	}
	if h.token != "" {
		hd.Set("X-Access-Token", h.token)
	}
}

func (h headerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		h.set(req.Header())
		return next(ctx, req)
	}
}

func (h headerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		h.set(conn.RequestHeader())
		return conn
	}
}

func (h headerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func freePort(host string) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// syncWriter collects a child's output; the child's two pipes write concurrently.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// Output is what a process stream carried.
type Output struct {
	Stdout, Stderr string
	// Combined is stdout and stderr in the order they came.
	Combined string
	// End is the end event; nil when the stream ended without one.
	End *processpb.ProcessEvent_EndEvent
}

// OK reports whether the process exited with status 0.
func (o Output) OK() bool { return o.End != nil && o.End.GetExited() && o.End.GetExitCode() == 0 }

// Collect reads a process stream (Start's or Connect's) to its end. The error
// is the stream's, or says that it ended without an end event.
func Collect[T any, P interface {
	*T
	GetEvent() *processpb.ProcessEvent
}](stream *connect.ServerStreamForClient[T]) (Output, error) {
	var out Output
	var stdout, stderr, combined strings.Builder
	for stream.Receive() {
		ev := P(stream.Msg()).GetEvent()
		if d := ev.GetData(); d != nil {
			stdout.Write(d.GetStdout())
			stderr.Write(d.GetStderr())
			combined.Write(d.GetStdout())
			combined.Write(d.GetStderr())
		}
		if end := ev.GetEnd(); end != nil {
			out.End = end
		}
	}
	out.Stdout, out.Stderr, out.Combined = stdout.String(), stderr.String(), combined.String()
	if err := stream.Err(); err != nil {
		return out, err
	}
	if out.End == nil {
		return out, fmt.Errorf("the process stream ended without an end event")
	}
	return out, nil
}
