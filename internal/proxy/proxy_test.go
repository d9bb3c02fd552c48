package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/warren-sh/warren/internal/envd/envdtest"
)

// The tests run the real envd as the sandbox, each agent on its own loopback
// address at port 49983 (any 127.0.0.0/8 address works on Linux), behind a
// fake Router: routing state is not what these tests are about, the proxy is.

const testDomain = "example.test"

// fakeRouter is a map of running sandboxes.
type fakeRouter struct {
	mu      sync.Mutex
	targets map[string]*Target
}

func (f *fakeRouter) Lookup(_ context.Context, id string) (*Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t, ok := f.targets[id]; ok {
		return t, nil
	}
	return nil, ErrSandboxNotFound
}

func (f *fakeRouter) Running(context.Context) ([]*Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*Target
	for _, t := range f.targets {
		out = append(out, t)
	}
	return out, nil
}

func (f *fakeRouter) add(t *Target) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.targets[t.SandboxID] = t
}

func (f *fakeRouter) remove(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.targets, id)
}

// env is a proxy in front of an API stand-in, on a cleartext loopback listener.
type env struct {
	proxy  *Proxy
	router *fakeRouter
	server *httptest.Server
}

// apiBody is what the API stand-in answers, so tests see a request reached it.
const apiBody = "api answered"

func newEnv(t testing.TB) *env { return newEnvDomain(t, testDomain) }

func newEnvDomain(t testing.TB, domain string) *env {
	t.Helper()
	e := &env{router: &fakeRouter{targets: map[string]*Target{}}}
	e.proxy = New(Config{Router: e.router, Domain: domain})
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, apiBody) })
	e.server = httptest.NewServer(e.proxy.Wrap(api))
	t.Cleanup(func() {
		e.server.Close()
		e.proxy.Close()
	})
	return e
}

var loopbackSeq atomic.Int32

// loopbackIP returns a loopback address no other test (or concurrent test
// process) uses: 127.<from pid>.<from pid>.<sequence>.
func loopbackIP() string {
	pid := os.Getpid()
	return fmt.Sprintf("127.%d.%d.%d", 1+(pid>>8)%254, pid&0xff, 1+loopbackSeq.Add(1)%254)
}

// sandbox is a running envd at <ip>:49983, registered with the router.
type sandbox struct {
	id    string
	ip    string
	agent *envdtest.Agent
}

func (e *env) startSandbox(t *testing.T, id string) *sandbox {
	t.Helper()
	ip := loopbackIP()
	a := envdtest.Start(t, envdtest.Options{Host: ip, Port: EnvdPort})
	e.router.add(&Target{SandboxID: id, Host: ip})
	return &sandbox{id: id, ip: ip, agent: a}
}

// userServer runs h at ip on a free port, as a server a user started in the
// sandbox, and returns the port.
func userServer(t *testing.T, ip string, h http.Handler) int {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: h}}
	srv.Start()
	t.Cleanup(srv.Close)
	return ln.Addr().(*net.TCPAddr).Port
}

// closedPort returns a port of ip nothing listens on.
func closedPort(t *testing.T, ip string) int {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

// request is one plain HTTP request to the proxy.
type request struct {
	method  string
	host    string // Host header; the listener's address when empty
	path    string
	headers map[string]string
	body    io.Reader
}

type response struct {
	status int
	header http.Header
	body   string
}

func (e *env) do(t *testing.T, req request) response {
	t.Helper()
	if req.method == "" {
		req.method = http.MethodGet
	}
	r, err := http.NewRequest(req.method, e.server.URL+req.path, req.body)
	if err != nil {
		t.Fatal(err)
	}
	if req.host != "" {
		r.Host = req.host
	}
	for k, v := range req.headers {
		r.Header.Set(k, v)
	}
	resp, err := e.server.Client().Do(r)
	if err != nil {
		t.Fatalf("%s %s (Host %s): %v", req.method, req.path, req.host, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body of %s %s: %v", req.method, req.path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: string(body)}
}

// routed are the headers that send a request to port of sandbox id.
func routed(id string, port int) map[string]string {
	return map[string]string{"E2b-Sandbox-Id": id, "E2b-Sandbox-Port": strconv.Itoa(port)}
}

func TestRouting(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "sbx1")
	const agentOK, api = http.StatusNoContent, http.StatusOK
	for _, tc := range []struct {
		name    string
		host    string
		headers map[string]string
		status  int
		body    string // checked when not empty
	}{
		{"headers on the listener's IP literal reach the agent", "", routed(sbx.id, EnvdPort), agentOK, ""},
		{"headers on localhost reach the agent", "localhost:3000", routed(sbx.id, EnvdPort), agentOK, ""},
		{"headers on sandbox.<domain> reach the agent", "sandbox." + testDomain, routed(sbx.id, EnvdPort), agentOK, ""},
		{"headers on any other host reach the agent (single origin)", "warren.internal:3000", routed(sbx.id, EnvdPort), agentOK, ""},
		{"no headers go to the API", "", nil, api, apiBody},
		{"api.<domain> goes to the API", "api." + testDomain, nil, api, apiBody},
		{"<port>-<id>.<domain> reaches the agent", "49983-sbx1." + testDomain, nil, agentOK, ""},
		{"<port>-<id>.<domain> with a port in Host", "49983-sbx1." + testDomain + ":443", nil, agentOK, ""},
		{"host labels are case-insensitive", "49983-SBX1.Example.Test", nil, agentOK, ""},
		{"extra dash-separated parts are ignored", "49983-sbx1-extra." + testDomain, nil, agentOK, ""},
		{"<port>-<id> first label on another domain", "49983-sbx1.elsewhere.test", nil, agentOK, ""},
		{"host routing wins over headers", "49983-sbx1." + testDomain, routed("other", 1), agentOK, ""},

		{"header ID without port", "", map[string]string{"E2b-Sandbox-Id": sbx.id}, 400, "missing header: E2b-Sandbox-Port\n"},
		{"header port without ID", "", map[string]string{"E2b-Sandbox-Port": "49983"}, 400, "missing header: E2b-Sandbox-Id\n"},
		{"non-numeric header port", "", map[string]string{"E2b-Sandbox-Id": sbx.id, "E2b-Sandbox-Port": "envd"}, 400, "Invalid sandbox port\n"},
		{"header port out of range", "", map[string]string{"E2b-Sandbox-Id": sbx.id, "E2b-Sandbox-Port": "70000"}, 400, "Invalid sandbox port\n"},
		{"upper-case header ID", "", map[string]string{"E2b-Sandbox-Id": "SBX1", "E2b-Sandbox-Port": "49983"}, 400, "Invalid sandbox ID\n"},
		{"host ID with an underscore", "49983-sbx_1." + testDomain, nil, 400, "Invalid sandbox ID\n"},
		{"host under the domain without a port part", "www." + testDomain, nil, 400, "Invalid host\n"},
		{"host under the domain with a non-numeric port", "envd-sbx1." + testDomain, nil, 400, "Invalid sandbox port\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, request{path: "/health", host: tc.host, headers: tc.headers})
			if r.status != tc.status {
				t.Fatalf("status %d, want %d (body %q)", r.status, tc.status, r.body)
			}
			if tc.body != "" && r.body != tc.body {
				t.Errorf("body %q, want %q", r.body, tc.body)
			}
			if tc.status == 400 && r.header.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Errorf("Content-Type %q, want text/plain", r.header.Get("Content-Type"))
			}
		})
	}
}

func TestHostRoutingWithoutDomain(t *testing.T) {
	e := newEnvDomain(t, "")
	sbx := e.startSandbox(t, "sbx2")
	if r := e.do(t, request{path: "/health", host: "49983-" + sbx.id + ".anywhere.test"}); r.status != http.StatusNoContent {
		t.Errorf("<port>-<id> host: status %d, want 204 from the agent", r.status)
	}
	if r := e.do(t, request{path: "/health", host: "www.anywhere.test"}); r.status != http.StatusOK || r.body != apiBody {
		t.Errorf("other host: status %d body %q, want the API", r.status, r.body)
	}
}

func TestErrorAnswers(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "sbx3")
	closed := closedPort(t, sbx.ip)
	const browserUA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36"
	const notFound = `{"sandboxId":"nosuch","message":"The sandbox was not found","code":502}`
	for _, tc := range []struct {
		name    string
		method  string
		path    string
		headers map[string]string
		status  int
		json    string // exact body; empty: an HTML page is expected
		html    string // a string the HTML page contains
	}{
		{name: "unknown sandbox", path: "/health", headers: routed("nosuch", EnvdPort), status: 502, json: notFound},
		{name: "unknown sandbox on a user port", path: "/", headers: routed("nosuch", 8080), status: 502, json: notFound},
		{name: "closed port", path: "/", headers: routed(sbx.id, closed), status: 502,
			json: fmt.Sprintf(`{"sandboxId":"sbx3","message":"The sandbox is running but port is not open","port":%d,"code":502}`, closed)},
		{name: "/init on the agent port", method: "POST", path: "/init", headers: routed(sbx.id, EnvdPort), status: 404,
			json: `{"message":"This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL","path":"/init","code":404}`},
		{name: "/init of an unknown sandbox", method: "POST", path: "/init", headers: routed("nosuch", EnvdPort), status: 404,
			json: `{"message":"This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL","path":"/init","code":404}`},
		{name: "/init spelled //init/", method: "POST", path: "//init/", headers: routed(sbx.id, EnvdPort), status: 404,
			json: `{"message":"This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL","path":"/init","code":404}`},
		{name: "/fsfreeze on the agent port", method: "POST", path: "/fsfreeze", headers: routed(sbx.id, EnvdPort), status: 404,
			json: `{"message":"This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL","path":"/fsfreeze","code":404}`},
		{name: "browser navigation gets HTML", path: "/", status: 502, html: "The sandbox was not found",
			headers: merge(routed("nosuch", EnvdPort), map[string]string{"Sec-Fetch-Mode": "navigate"})},
		{name: "browser user agent gets HTML", path: "/", status: 502, html: "port is not open",
			headers: merge(routed(sbx.id, closed), map[string]string{"User-Agent": browserUA})},
		{name: "browser fetch (cors mode) gets JSON", path: "/health", status: 502, json: notFound,
			headers: merge(routed("nosuch", EnvdPort), map[string]string{"User-Agent": browserUA, "Sec-Fetch-Mode": "cors"})},
		{name: "browser asking for JSON gets JSON", path: "/health", status: 502, json: notFound,
			headers: merge(routed("nosuch", EnvdPort), map[string]string{"User-Agent": browserUA, "Accept": "application/json"})},
		{name: "XMLHttpRequest gets JSON", path: "/health", status: 502, json: notFound,
			headers: merge(routed("nosuch", EnvdPort), map[string]string{"User-Agent": browserUA, "X-Requested-With": "XMLHttpRequest"})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, request{method: tc.method, path: tc.path, headers: tc.headers})
			if r.status != tc.status {
				t.Fatalf("status %d, want %d (body %q)", r.status, tc.status, r.body)
			}
			if tc.json != "" {
				if r.body != tc.json {
					t.Errorf("body\n%s\nwant\n%s", r.body, tc.json)
				}
				if ct := r.header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
					t.Errorf("Content-Type %q", ct)
				}
				return
			}
			if ct := r.header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
				t.Errorf("Content-Type %q, want text/html", ct)
			}
			if !strings.HasPrefix(r.body, "<!DOCTYPE html>") || !strings.Contains(r.body, tc.html) {
				t.Errorf("HTML page lacks %q:\n%s", tc.html, r.body)
			}
		})
	}
}

func merge(maps ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range maps {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// TestAgentInternalPathsStayClosed checks the agent really keeps its /init
// untouched by the refused request: the token set directly still rules.
func TestAgentInternalPathsStayClosed(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "sbx4")
	if code := sbx.agent.Init(t, map[string]any{"accessToken": "tok"}, nil); code != http.StatusNoContent {
		t.Fatalf("direct /init: %d", code)
	}
	r := e.do(t, request{method: "POST", path: "/init", headers: merge(routed(sbx.id, EnvdPort), map[string]string{"X-Access-Token": "tok"}),
		body: strings.NewReader(`{"accessToken":"stolen"}`)})
	if r.status != 404 {
		t.Fatalf("/init through the proxy: %d, want 404", r.status)
	}
	if r := e.do(t, request{path: "/envs", headers: merge(routed(sbx.id, EnvdPort), map[string]string{"X-Access-Token": "tok"})}); r.status != 200 {
		t.Errorf("/envs with the original token: %d, want 200", r.status)
	}
}

func TestTrafficToken(t *testing.T) {
	e := newEnv(t)
	ip := loopbackIP()
	envdtest.Start(t, envdtest.Options{Host: ip, Port: EnvdPort})
	e.router.add(&Target{SandboxID: "private", Host: ip, TrafficToken: "traffic-secret"})
	e.router.add(&Target{SandboxID: "public", Host: ip})
	userPort := userServer(t, ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "user server")
	}))
	const missing = `{"sandboxId":"private","message":"Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing","code":403}`
	const invalid = `{"sandboxId":"private","message":"Sandbox is secured with traffic access token. Provided token in header 'e2b-traffic-access-token' is invalid","code":403}`
	for _, tc := range []struct {
		name    string
		id      string
		port    int
		path    string
		headers map[string]string
		status  int
		body    string
	}{
		{"private user port without token", "private", userPort, "/", nil, 403, missing},
		{"private user port with a wrong token", "private", userPort, "/", map[string]string{"e2b-traffic-access-token": "nope"}, 403, invalid},
		{"private user port with the token", "private", userPort, "/", map[string]string{"e2b-traffic-access-token": "traffic-secret"}, 200, "user server"},
		{"token header in code-interpreter's spelling", "private", userPort, "/", map[string]string{"E2B-Traffic-Access-Token": "traffic-secret"}, 200, "user server"},
		{"private agent port needs no traffic token", "private", EnvdPort, "/health", nil, 204, ""},
		{"public user port needs no token", "public", userPort, "/", nil, 200, "user server"},
		{"/init is only internal on the agent port", "public", userPort, "/init", nil, 200, "user server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, request{path: tc.path, headers: merge(routed(tc.id, tc.port), tc.headers)})
			if r.status != tc.status || r.body != tc.body {
				t.Errorf("got %d %q, want %d %q", r.status, r.body, tc.status, tc.body)
			}
		})
	}
}

func TestCORS(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "sbx5")
	preflight := map[string]string{
		"Origin":                         "https://app.example",
		"Access-Control-Request-Method":  "POST",
		"Access-Control-Request-Headers": "authorization,connect-protocol-version,content-type,e2b-sandbox-id,e2b-sandbox-port,x-access-token,x-metadata-owner",
	}
	t.Run("single-origin preflight naming routing headers", func(t *testing.T) {
		r := e.do(t, request{method: "OPTIONS", path: "/process.Process/Start", headers: preflight})
		if r.status != 204 || r.header.Get("Access-Control-Allow-Origin") != "*" {
			t.Fatalf("status %d, Allow-Origin %q", r.status, r.header.Get("Access-Control-Allow-Origin"))
		}
		allowed := strings.ToLower(r.header.Get("Access-Control-Allow-Headers"))
		for _, h := range []string{"authorization", "e2b-sandbox-id", "x-access-token", "x-metadata-owner"} {
			if !strings.Contains(allowed, h) {
				t.Errorf("Allow-Headers %q lacks %s", allowed, h)
			}
		}
		if !strings.Contains(r.header.Get("Access-Control-Allow-Methods"), "POST") {
			t.Errorf("Allow-Methods %q", r.header.Get("Access-Control-Allow-Methods"))
		}
	})
	t.Run("preflight of a sandbox host's agent port", func(t *testing.T) {
		r := e.do(t, request{method: "OPTIONS", host: "49983-" + sbx.id + "." + testDomain, path: "/files", headers: preflight})
		if r.status != 204 || !strings.Contains(strings.ToLower(r.header.Get("Access-Control-Allow-Headers")), "authorization") {
			t.Errorf("status %d, Allow-Headers %q", r.status, r.header.Get("Access-Control-Allow-Headers"))
		}
	})
	t.Run("API preflight goes to the API", func(t *testing.T) {
		r := e.do(t, request{method: "OPTIONS", path: "/sandboxes", headers: map[string]string{
			"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}})
		if r.body != apiBody {
			t.Errorf("got %d %q, want the API", r.status, r.body)
		}
	})
	t.Run("agent's own CORS headers pass through", func(t *testing.T) {
		r := e.do(t, request{path: "/health", headers: merge(routed(sbx.id, EnvdPort), map[string]string{"Origin": "https://app.example"})})
		if r.status != 204 || r.header.Get("Access-Control-Allow-Origin") != "*" || r.header.Get("Access-Control-Expose-Headers") == "" {
			t.Errorf("status %d, headers %v", r.status, r.header)
		}
	})
	t.Run("proxy errors are readable cross-origin", func(t *testing.T) {
		r := e.do(t, request{path: "/health", headers: merge(routed("nosuch", EnvdPort), map[string]string{"Origin": "https://app.example"})})
		if r.status != 502 || r.header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("status %d, Allow-Origin %q", r.status, r.header.Get("Access-Control-Allow-Origin"))
		}
	})
}

// countingTransport is a Target.Agent: a real transport that counts what it carries.
type countingTransport struct {
	http.Transport
	n atomic.Int32
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.Transport.RoundTrip(r)
}

func TestTargetAgentCarriesAgentTraffic(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "sbxagent")
	agent := &countingTransport{}
	t.Cleanup(agent.CloseIdleConnections)
	e.router.add(&Target{SandboxID: sbx.id, Host: sbx.ip, Agent: agent})

	for i := range 3 {
		if r := e.do(t, request{path: "/health", headers: routed(sbx.id, EnvdPort)}); r.status != http.StatusNoContent {
			t.Fatalf("GET /health #%d: %d %s", i, r.status, r.body)
		}
	}
	if got := agent.n.Load(); got != 3 {
		t.Fatalf("the target's agent transport carried %d of 3 agent requests", got)
	}
	// Other ports never go over the agent's connections.
	port := userServer(t, sbx.ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "user") }))
	if r := e.do(t, request{path: "/", headers: routed(sbx.id, port)}); r.status != http.StatusOK || r.body != "user" {
		t.Fatalf("user port: %d %q", r.status, r.body)
	}
	if got := agent.n.Load(); got != 3 {
		t.Fatalf("a user-port request went over the agent transport (%d requests)", got)
	}
}
