package envd_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/internal/envd/envdtest"
)

func do(t *testing.T, method, url string, body string, headers map[string]string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, string(raw)
}

func TestHealthNeedsNoToken(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	if code := a.Init(t, map[string]any{"accessToken": "secret"}, nil); code != http.StatusNoContent {
		t.Fatalf("/init: %d", code)
	}
	resp, body := do(t, "GET", a.URL+"/health", "", nil)
	if resp.StatusCode != http.StatusNoContent || body != "" {
		t.Fatalf("/health = %d %q, want 204 and no body", resp.StatusCode, body)
	}
}

func TestInitAnswersWithVersion(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	resp, _ := do(t, "POST", a.URL+"/init", `{"envVars":{"A":"1"}}`, map[string]string{"Content-Type": "application/json"})
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("/init = %d, want 204", resp.StatusCode)
	}
	if v := resp.Header.Get("X-Envd-Version"); !atLeast(v, 0, 6, 4) {
		t.Fatalf("X-Envd-Version = %q, want a version >= 0.6.4", v)
	}
	// Each step's time in the guest, for the node's debug log.
	st := resp.Header.Get("Server-Timing")
	for _, step := range []string{"parse", "dns", "clock", "rng", "files"} {
		if !regexp.MustCompile(`(^|, )` + step + `;dur=[0-9]+\.[0-9]{3}(,|$)`).MatchString(st) {
			t.Errorf("Server-Timing %q lacks step %s", st, step)
		}
	}
}

func TestInitBadInput(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	for name, body := range map[string]string{
		"not json":     `{"envVars":`,
		"unknown user": `{"defaultUser":"no-such-user-here"}`,
		"wrong type":   `{"envVars":["A"]}`,
		"bad dns":      `{"dns":["resolver.example"]}`,
		// entropy is warren's extension: base64 bytes, at most 512 of them.
		"entropy not base64": `{"entropy":"not base64!"}`,
		"entropy too long":   `{"entropy":"` + base64.StdEncoding.EncodeToString(make([]byte, 513)) + `"}`,
	} {
		t.Run(name, func(t *testing.T) {
			resp, raw := do(t, "POST", a.URL+"/init", body, nil)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400 (body %s)", resp.StatusCode, raw)
			}
			var e struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			}
			if err := json.Unmarshal([]byte(raw), &e); err != nil || e.Code != 400 || e.Message == "" {
				t.Fatalf("body %q is not an E2B error body", raw)
			}
		})
	}
}

// TestInitEntropyOnHost: a host agent accepts the entropy field and leaves the
// host's RNG alone (reseeding is for VMs; the microvm tests check that clones
// diverge).
func TestInitEntropyOnHost(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	body := map[string]any{"entropy": make([]byte, 64), "envVars": map[string]string{"A": "1"}}
	if code := a.Init(t, body, nil); code != http.StatusNoContent {
		t.Fatalf("/init with entropy: %d, want 204", code)
	}
}

func TestEnvsReflectInit(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	a.Init(t, map[string]any{"envVars": map[string]string{"FOO": "bar"}}, nil)
	a.Init(t, map[string]any{"envVars": map[string]string{"BAZ": "qux", "FOO": "later"}}, nil)
	resp, body := do(t, "GET", a.URL+"/envs", "", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/envs = %d", resp.StatusCode)
	}
	var envs map[string]string
	if err := json.Unmarshal([]byte(body), &envs); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"FOO": "later", "BAZ": "qux", "E2B_SANDBOX": "true"}
	for k, v := range want {
		if envs[k] != v {
			t.Errorf("envs[%s] = %q, want %q (all: %v)", k, envs[k], v, envs)
		}
	}
}

func TestAccessToken(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	if code := a.Init(t, map[string]any{"accessToken": "tok-1"}, nil); code != http.StatusNoContent {
		t.Fatalf("first /init: %d", code)
	}
	const unauthorized = `{"code":401,"message":"unauthorized access, please provide a valid access token or method signing if supported"}`
	cases := []struct {
		name   string
		method string
		path   string
		token  string
		want   int
	}{
		{"envs without token", "GET", "/envs", "", 401},
		{"envs wrong token", "GET", "/envs", "tok-2", 401},
		{"envs right token", "GET", "/envs", "tok-1", 200},
		{"metrics without token", "GET", "/metrics", "", 401},
		{"metrics right token", "GET", "/metrics", "tok-1", 200},
		{"rpc without token", "POST", "/process.Process/List", "", 401},
		{"rpc right token", "POST", "/process.Process/List", "tok-1", 200},
		{"re-init without token", "POST", "/init", "", 401},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := map[string]string{"Content-Type": "application/json"}
			if c.token != "" {
				h["X-Access-Token"] = c.token
			}
			body := ""
			if c.method == "POST" {
				body = "{}"
			}
			resp, raw := do(t, c.method, a.URL+c.path, body, h)
			if resp.StatusCode != c.want {
				t.Fatalf("status %d, want %d (body %s)", resp.StatusCode, c.want, raw)
			}
			if c.want == 401 && raw != unauthorized {
				t.Fatalf("body %s, want %s", raw, unauthorized)
			}
		})
	}

	// The Connect client sees the 401 as unauthenticated (the SDK's AuthenticationError).
	_, err := a.ProcessClient(connect.WithProtoJSON()).List(context.Background(), connect.NewRequest(&process.ListRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("List without token: %v, want unauthenticated", err)
	}

	// The token holder may rotate it; the old one stops working.
	if code := a.Init(t, map[string]any{"accessToken": "tok-2"}, map[string]string{"X-Access-Token": "tok-1"}); code != 204 {
		t.Fatalf("rotate with token: %d", code)
	}
	if resp, _ := do(t, "GET", a.URL+"/envs", "", map[string]string{"X-Access-Token": "tok-1"}); resp.StatusCode != 401 {
		t.Fatalf("old token after rotation: %d, want 401", resp.StatusCode)
	}
}

func TestInitSecretReplacesToken(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{Args: []string{"--init-secret", "node-secret"}})
	a.Init(t, map[string]any{"accessToken": "template-token"}, nil)
	if code := a.Init(t, map[string]any{"accessToken": "clone-token"}, map[string]string{"X-Warren-Init-Secret": "wrong"}); code != 401 {
		t.Fatalf("wrong init secret: %d, want 401", code)
	}
	if code := a.Init(t, map[string]any{"accessToken": "clone-token"}, map[string]string{"X-Warren-Init-Secret": "node-secret"}); code != 204 {
		t.Fatalf("init secret: %d, want 204", code)
	}
	if resp, _ := do(t, "GET", a.URL+"/envs", "", map[string]string{"X-Access-Token": "clone-token"}); resp.StatusCode != 200 {
		t.Fatalf("new token: %d, want 200", resp.StatusCode)
	}
}

func TestMetrics(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	resp, body := do(t, "GET", a.URL+"/metrics", "", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics = %d", resp.StatusCode)
	}
	var m map[string]float64
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	for _, k := range []string{"ts", "cpu_count", "mem_total", "mem_total_mib", "disk_total"} {
		if m[k] <= 0 {
			t.Errorf("%s = %v, want > 0 (%s)", k, m[k], body)
		}
	}
	for _, k := range []string{"cpu_used_pct", "mem_used", "mem_cache", "mem_used_mib", "disk_used"} {
		if _, ok := m[k]; !ok {
			t.Errorf("%s missing (%s)", k, body)
		}
	}
	if m["mem_used"] > m["mem_total"] || m["disk_used"] > m["disk_total"] {
		t.Errorf("used exceeds total: %s", body)
	}
}

func TestCORSPreflight(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	a.Init(t, map[string]any{"accessToken": "tok"}, nil)
	resp, _ := do(t, "OPTIONS", a.URL+"/process.Process/Start", "", map[string]string{
		"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
	})
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("preflight = %d, allow-origin %q", resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"))
	}
}

// The agent speaks cleartext HTTP/2 (h2c) as well as HTTP/1.1.
func TestH2C(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: protocols}}
	resp, err := client.Get(a.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("got %s %d, want HTTP/2 204", resp.Proto, resp.StatusCode)
	}
}

// atLeast reports whether the semver v (major.minor.patch) is at least want.
func atLeast(v string, want ...int) bool {
	parts := strings.Split(v, ".")
	if len(parts) != 3 {
		return false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return false
		}
		if n != want[i] {
			return n > want[i]
		}
	}
	return true
}
