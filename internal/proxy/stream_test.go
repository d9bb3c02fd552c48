package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/websocket"

	pb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/certs"
	"github.com/warren-sh/warren/internal/envd/envdtest"
)

// routeHeaders is a Connect client option setting the SDK's routing headers.
func routeHeaders(id string) connect.ClientOption {
	return connect.WithInterceptors(routingInterceptor{id})
}

type routingInterceptor struct{ id string }

func (i routingInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("E2b-Sandbox-Id", i.id)
		req.Header().Set("E2b-Sandbox-Port", "49983")
		return next(ctx, req)
	}
}

func (i routingInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("E2b-Sandbox-Id", i.id)
		conn.RequestHeader().Set("E2b-Sandbox-Port", "49983")
		return conn
	}
}

func (i routingInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// runCommand runs script through client's Process.Start and returns its
// stdout and exit code.
func runCommand(t *testing.T, client processconnect.ProcessClient, script string) (string, int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := client.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}},
	}))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer stream.Close()
	out, err := envdtest.Collect(stream)
	if err != nil {
		t.Fatalf("stream: %v", err)
	}
	return out.Stdout, out.End.GetExitCode()
}

func TestConnectStreamThroughProxy(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "stream1")
	// The SDK's codec: JSON, over HTTP/1.1 with routing headers (mode A).
	client := processconnect.NewProcessClient(e.server.Client(), e.server.URL, connect.WithProtoJSON(), routeHeaders(sbx.id))
	out, exit := runCommand(t, client, "echo hello; sleep 0.2; echo world")
	if out != "hello\nworld\n" || exit != 0 {
		t.Errorf("stdout %q exit %d, want \"hello\\nworld\\n\" 0", out, exit)
	}
}

// tlsEnv serves e's handler over TLS with warren's self-signed certificates
// and returns a client that trusts ca.pem and reaches the listener whatever
// host a URL names.
func tlsEnv(t *testing.T, e *env) *http.Client {
	t.Helper()
	cfg, caPath, err := certs.SelfSigned(t.TempDir(), testDomain, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: e.server.Config.Handler, TLSConfig: cfg}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })

	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatalf("no certificate in %s", caPath)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, ln.Addr().String())
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func TestHTTP2OverTLS(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "h2sbx")
	client := tlsEnv(t, e)
	base := "https://49983-" + sbx.id + "." + testDomain

	resp, err := client.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("GET /health: %s %d, want HTTP/2 204", resp.Proto, resp.StatusCode)
	}
	// A Connect stream multiplexed on the same h2 connection.
	out, exit := runCommand(t, processconnect.NewProcessClient(client, base, connect.WithProtoJSON()), "echo over h2")
	if out != "over h2\n" || exit != 0 {
		t.Errorf("stdout %q exit %d", out, exit)
	}
}

// envelope frames a Connect streaming message.
func envelope(flags byte, payload []byte) []byte {
	b := make([]byte, 5, 5+len(payload))
	b[0] = flags
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

// readEnvelope reads one Connect envelope; at a clean end of the body it
// returns io.EOF, on a cut connection the transport's error.
func readEnvelope(r io.Reader) (flags byte, payload []byte, err error) {
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	payload = make([]byte, binary.BigEndian.Uint32(head[1:]))
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, err
	}
	return head[0], payload, nil
}

// startEvent is the part of a StartResponse the abort test reads (JSON codec).
type startEvent struct {
	Event struct {
		Start *struct{ Pid uint32 }    `json:"start"`
		Data  *struct{ Stdout []byte } `json:"data"`
	} `json:"event"`
}

// rawStart opens a Process.Start stream with plain HTTP, so the test sees
// exactly how the response body ends.
func rawStart(t *testing.T, client *http.Client, url string, headers map[string]string, script string) *http.Response {
	t.Helper()
	req, _ := json.Marshal(map[string]any{"process": map[string]any{"cmd": "/bin/bash", "args": []string{"-c", script}}})
	r, err := http.NewRequest(http.MethodPost, url+"/process.Process/Start", bytes.NewReader(envelope(0, req)))
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Content-Type", "application/connect+json")
	r.Header.Set("Connect-Protocol-Version", "1")
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	resp, err := client.Do(r)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if resp.StatusCode != 200 {
		resp.Body.Close()
		t.Fatalf("Start: status %d", resp.StatusCode)
	}
	return resp
}

// untilStdout reads events until one carries stdout and returns the pid.
func untilStdout(t *testing.T, body io.Reader) (pid uint32, stdout string) {
	t.Helper()
	for {
		flags, payload, err := readEnvelope(body)
		if err != nil {
			t.Fatalf("stream ended before output: %v", err)
		}
		if flags&2 != 0 {
			t.Fatalf("stream ended before output: %s", payload)
		}
		var ev startEvent
		if err := json.Unmarshal(payload, &ev); err != nil {
			t.Fatalf("event %s: %v", payload, err)
		}
		if ev.Event.Start != nil {
			pid = ev.Event.Start.Pid
		}
		if ev.Event.Data != nil && len(ev.Event.Data.Stdout) > 0 {
			return pid, string(ev.Event.Data.Stdout)
		}
	}
}

// killProcess stops a test command through the agent directly (the proxy may
// already refuse the sandbox): envd leaves processes running when a client goes.
func killProcess(t *testing.T, sbx *sandbox, pid uint32) {
	t.Cleanup(func() {
		sbx.agent.ProcessClient().SendSignal(context.Background(), connect.NewRequest(&pb.SendSignalRequest{
			Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}},
			Signal:  pb.Signal_SIGNAL_SIGKILL,
		}))
	})
}

func TestAbortCutsStreams(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  bool
	}{
		{"HTTP/1.1 with routing headers", false},
		{"HTTP/2 over TLS with host routing", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			victim := e.startSandbox(t, "victim")
			// A second sandbox ID served by the same agent: its streams must survive.
			e.router.add(&Target{SandboxID: "bystander", Host: victim.ip})

			client, base := e.server.Client(), e.server.URL
			headers := func(id string) map[string]string { return routed(id, EnvdPort) }
			urlOf := func(string) string { return base }
			if tc.tls {
				client = tlsEnv(t, e)
				headers = func(string) map[string]string { return nil }
				urlOf = func(id string) string { return "https://49983-" + id + "." + testDomain }
			}

			stream := rawStart(t, client, urlOf("victim"), headers("victim"), "sleep 1; echo a; sleep 30")
			defer stream.Body.Close()
			other := rawStart(t, client, urlOf("bystander"), headers("bystander"), "sleep 1; echo b; sleep 2; echo still-here")
			defer other.Body.Close()
			if tc.tls && (stream.ProtoMajor != 2 || other.ProtoMajor != 2) {
				t.Fatalf("protocols %s, %s; want HTTP/2", stream.Proto, other.Proto)
			}
			pid, out := untilStdout(t, stream.Body)
			killProcess(t, victim, pid)
			if out != "a\n" {
				t.Fatalf("first output %q, want \"a\\n\"", out)
			}
			otherPid, _ := untilStdout(t, other.Body)
			killProcess(t, victim, otherPid)

			e.router.remove("victim") // the control plane forgets the sandbox, then aborts
			aborted := time.Now()
			e.proxy.Abort("victim")

			ended := make(chan error, 1)
			go func() {
				for {
					flags, payload, err := readEnvelope(stream.Body)
					if err != nil {
						ended <- err
						return
					}
					if flags&2 != 0 {
						ended <- fmt.Errorf("clean end-of-stream %s", payload)
						return
					}
				}
			}()
			select {
			case err := <-ended:
				if elapsed := time.Since(aborted); elapsed > time.Second {
					t.Errorf("stream ended %v after Abort, want < 1s", elapsed)
				}
				switch {
				case err == io.EOF:
					t.Errorf("stream ended cleanly (terminating chunk / END_STREAM); want it cut")
				case !tc.tls && !errors.Is(err, io.ErrUnexpectedEOF):
					t.Errorf("HTTP/1.1 stream error %v, want unexpected EOF (no terminating chunk)", err)
				case tc.tls && !strings.Contains(err.Error(), "INTERNAL_ERROR"):
					t.Errorf("h2 stream error %v, want RST_STREAM INTERNAL_ERROR", err)
				default:
					t.Logf("client saw: %v", err)
				}
			case <-time.After(time.Second):
				t.Fatal("stream still open 1s after Abort")
			}

			// The bystander's stream carries on.
			if _, out := untilStdout(t, other.Body); out != "still-here\n" {
				t.Errorf("bystander's next output %q", out)
			}

			// New requests find no sandbox.
			req, _ := http.NewRequest(http.MethodGet, urlOf("victim")+"/health", nil)
			for k, v := range headers("victim") {
				req.Header.Set(k, v)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := `{"sandboxId":"victim","message":"The sandbox was not found","code":502}`; resp.StatusCode != 502 || string(body) != want {
				t.Errorf("after abort: %d %s, want 502 %s", resp.StatusCode, body, want)
			}
		})
	}
}

// A server shutting down cuts the Connect streams (which end only with their
// command) and lets other requests in flight finish.
func TestAbortStreamsCutsOnlyStreams(t *testing.T) {
	e := newEnv(t)
	sb := e.startSandbox(t, "sb")
	slow := userServer(t, sb.ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(500 * time.Millisecond)
		io.WriteString(w, "done")
	}))
	client := e.server.Client()

	stream := rawStart(t, client, e.server.URL, routed("sb", EnvdPort), "echo a; sleep 30")
	defer stream.Body.Close()
	pid, _ := untilStdout(t, stream.Body)
	defer killProcess(t, sb, pid)

	type answer struct {
		status int
		body   string
		err    error
	}
	unary := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, e.server.URL+"/slow", nil)
		for k, v := range routed("sb", slow) {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			unary <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		unary <- answer{status: resp.StatusCode, body: string(b), err: err}
	}()
	time.Sleep(100 * time.Millisecond) // the slow request is in flight
	aborted := time.Now()
	e.proxy.AbortStreams()

	ended := make(chan error, 1)
	go func() {
		for {
			if _, _, err := readEnvelope(stream.Body); err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case err := <-ended:
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("stream ended with %v, want it cut (unexpected EOF)", err)
		}
		if elapsed := time.Since(aborted); elapsed > time.Second {
			t.Errorf("stream ended %v after AbortStreams, want < 1s", elapsed)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("stream still open 2s after AbortStreams")
	}
	select {
	case r := <-unary:
		if r.err != nil || r.status != http.StatusOK || r.body != "done" {
			t.Errorf("the unary request in flight got %d %q (%v), want 200 done", r.status, r.body, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the unary request in flight did not end")
	}
	// The sandbox still serves new requests.
	if r := e.do(t, request{method: "GET", path: "/health", headers: routed("sb", EnvdPort)}); r.status != http.StatusNoContent {
		t.Errorf("/health after AbortStreams: %d", r.status)
	}
}

func TestWebSocket(t *testing.T) {
	e := newEnv(t)
	ip := loopbackIP()
	e.router.add(&Target{SandboxID: "ws", Host: ip})
	port := userServer(t, ip, websocket.Handler(func(ws *websocket.Conn) { io.Copy(ws, ws) }))

	cfg, err := websocket.NewConfig("ws"+strings.TrimPrefix(e.server.URL, "http")+"/echo", "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Header = http.Header{}
	for k, v := range routed("ws", port) {
		cfg.Header.Set(k, v)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("WebSocket handshake through the proxy: %v", err)
	}
	defer ws.Close()
	ws.SetDeadline(time.Now().Add(5 * time.Second))
	for _, msg := range []string{"hello", "second message"} {
		if err := websocket.Message.Send(ws, msg); err != nil {
			t.Fatal(err)
		}
		var got string
		if err := websocket.Message.Receive(ws, &got); err != nil {
			t.Fatal(err)
		}
		if got != msg {
			t.Errorf("echo %q, want %q", got, msg)
		}
	}

	// A kill cuts the upgraded connection too.
	e.router.remove("ws")
	e.proxy.Abort("ws")
	ws.SetDeadline(time.Now().Add(time.Second))
	var got string
	if err := websocket.Message.Receive(ws, &got); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("after Abort: receive %q, err %v; want the connection closed at once", got, err)
	}
}

// TestDialRetry: a server that starts listening shortly after the request
// (as behind the guest's loopback forwarder) is still reached.
func TestDialRetry(t *testing.T) {
	e := newEnv(t)
	ip := loopbackIP()
	e.router.add(&Target{SandboxID: "late", Host: ip})
	port := closedPort(t, ip)
	started := make(chan struct{})
	go func() {
		defer close(started)
		time.Sleep(300 * time.Millisecond)
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			t.Errorf("listen late: %v", err)
			return
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "late server") })}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}()
	r := e.do(t, request{path: "/", headers: routed("late", port)})
	<-started
	if r.status != 200 || r.body != "late server" {
		t.Errorf("got %d %q, want the late server's answer", r.status, r.body)
	}
}

// TestForwardedRequest checks what a user's server sees: the public Host, the
// client's headers, and a chunked body streamed through as chunked.
func TestForwardedRequest(t *testing.T) {
	e := newEnv(t)
	ip := loopbackIP()
	e.router.add(&Target{SandboxID: "fwd", Host: ip})
	type seen struct {
		Host, Authorization, AccessToken, Custom string
		TransferEncoding                         []string
		BodyLen                                  int
	}
	port := userServer(t, ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		json.NewEncoder(w).Encode(seen{r.Host, r.Header.Get("Authorization"), r.Header.Get("X-Access-Token"),
			r.Header.Get("X-Custom"), r.TransferEncoding, len(body)})
	}))
	host := fmt.Sprintf("%d-fwd.%s", port, testDomain)

	pr, pw := io.Pipe()
	go func() {
		chunk := bytes.Repeat([]byte("x"), 10_000)
		for range 50 {
			if _, err := pw.Write(chunk); err != nil {
				return
			}
		}
		pw.Close()
	}()
	r := e.do(t, request{method: "POST", host: host, path: "/upload", body: pr, headers: map[string]string{
		"Authorization": "Basic dXNlcjo=", "X-Access-Token": "tok", "X-Custom": "kept"}})
	if r.status != 200 {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	var got seen
	if err := json.Unmarshal([]byte(r.body), &got); err != nil {
		t.Fatal(err)
	}
	want := seen{host, "Basic dXNlcjo=", "tok", "kept", []string{"chunked"}, 500_000}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("user server saw %+v\nwant %+v", got, want)
	}
}
