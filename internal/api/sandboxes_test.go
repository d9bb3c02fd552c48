package api_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
)

var sandboxIDPattern = regexp.MustCompile(`^i[a-z0-9]{20}$`)

// approx fails unless got is within a few seconds of want.
func approx(t *testing.T, what string, got, want time.Time) {
	t.Helper()
	if d := got.Sub(want); d < -3*time.Second || d > 3*time.Second {
		t.Errorf("%s = %s, want about %s (off by %s)", what, got, want, d)
	}
}

func TestCreateResponse(t *testing.T) {
	e := newEnv(t, envOptions{})
	res := e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`).wantStatus(t, http.StatusCreated)
	// trafficAccessToken and domain are present and null, as upstream sends them.
	for _, raw := range []string{`"trafficAccessToken":null`, `"domain":null`, `"clientID":"6532622b"`} {
		if !strings.Contains(string(res.body), raw) {
			t.Errorf("body %s lacks %s", res.body, raw)
		}
	}
	var sb sandbox
	res.decode(t, &sb)
	spec := e.node.lastSpec()
	if !sandboxIDPattern.MatchString(sb.SandboxID) || sb.SandboxID != spec.ID {
		t.Errorf("sandboxID = %q, node created %q", sb.SandboxID, spec.ID)
	}
	if sb.TemplateID != baseID || sb.Alias != "base" || sb.EnvdVersion != "0.6.5" {
		t.Errorf("templateID, alias, envdVersion = %q, %q, %q; want %q, base, 0.6.5", sb.TemplateID, sb.Alias, sb.EnvdVersion, baseID)
	}
	if sb.EnvdAccessToken == "" || sb.EnvdAccessToken != spec.AccessToken {
		t.Errorf("envdAccessToken = %q, node was given %q", sb.EnvdAccessToken, spec.AccessToken)
	}
	if !spec.AllowInternet {
		t.Error("internet access is off by default; want on")
	}

	e2 := newEnv(t, envOptions{domain: "sbx.example.com"})
	e2.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`).wantStatus(t, http.StatusCreated).decode(t, &sb)
	if sb.Domain == nil || *sb.Domain != "sbx.example.com" {
		t.Errorf("domain = %v, want sbx.example.com", sb.Domain)
	}
}

func TestCreateDefaultsAndOptions(t *testing.T) {
	tests := []struct {
		name, path, body string
		timeout          time.Duration
		allowInternet    bool
	}{
		{"v2 default timeout is 300 s", "/v2/sandboxes", `{"templateID":"base"}`, 300 * time.Second, true},
		{"v1 default timeout is 15 s", "/sandboxes", `{"templateID":"base"}`, 15 * time.Second, true},
		{"v1 as older SDKs send it", "/sandboxes", `{"templateID":"base","timeout":30,"secure":true,"allow_internet_access":true}`, 30 * time.Second, true},
		{"v1 secure false still works", "/sandboxes", `{"templateID":"base","timeout":30,"secure":false}`, 30 * time.Second, true},
		{"v2 timeout", "/v2/sandboxes", `{"templateID":"base","timeout":120}`, 120 * time.Second, true},
		{"internet off", "/v2/sandboxes", `{"templateID":"base","allow_internet_access":false}`, 300 * time.Second, false},
		{"denyOut everything is internet off", "/v2/sandboxes", `{"templateID":"base","network":{"denyOut":["0.0.0.0/0"]}}`, 300 * time.Second, false},
		{"allowOut with nothing denied changes nothing", "/v2/sandboxes", `{"templateID":"base","network":{"allowOut":["8.8.8.8"],"allowPublicTraffic":true,"httpsPorts":[443]}}`, 300 * time.Second, true},
		{"unknown and optional fields are ignored", "/v2/sandboxes", `{"templateID":"base","iam":{"tokens":{}},"volumeMounts":[],"fromTheFuture":{"x":1},"mcp":null}`, 300 * time.Second, true},
		{"autoPause with memory and autoResume", "/v2/sandboxes", `{"templateID":"base","autoPause":true,"autoPauseMemory":true,"autoResume":{"enabled":true}}`, 300 * time.Second, true},
	}
	e := newEnv(t, envOptions{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sb sandbox
			e.do("POST", tt.path, keyA, tt.body).wantStatus(t, http.StatusCreated).decode(t, &sb)
			got := e.get(keyA, sb.SandboxID)
			if d := got.EndAt.Sub(got.StartedAt); d != tt.timeout {
				t.Errorf("endAt - startedAt = %s, want %s", d, tt.timeout)
			}
			if spec := e.node.lastSpec(); spec.AllowInternet != tt.allowInternet {
				t.Errorf("node AllowInternet = %v, want %v", spec.AllowInternet, tt.allowInternet)
			}
		})
	}
}

func TestCreatePassesMetadataEnvVarsAndLifecycle(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base","metadata":{"k":"v"},"envVars":{"A":"1"},"autoPause":true,"autoResume":{"enabled":true}}`)
	spec := e.node.lastSpec()
	if spec.EnvVars["A"] != "1" || spec.EnvVars["E2B_SANDBOX_ID"] != sb.SandboxID {
		t.Errorf("node env vars = %v, want A=1 and E2B_SANDBOX_ID", spec.EnvVars)
	}
	var detail struct {
		listedSandbox
		EnvdAccessToken     string `json:"envdAccessToken"`
		AllowInternetAccess *bool  `json:"allowInternetAccess"`
		Lifecycle           struct {
			AutoResume bool   `json:"autoResume"`
			OnTimeout  string `json:"onTimeout"`
		} `json:"lifecycle"`
	}
	e.do("GET", "/sandboxes/"+sb.SandboxID, keyA, "").wantStatus(t, http.StatusOK).decode(t, &detail)
	if detail.Metadata["k"] != "v" || detail.State != "running" || detail.CPUCount != 2 || detail.MemoryMB != 512 || detail.DiskSizeMB != 4096 {
		t.Errorf("detail = %+v", detail)
	}
	if detail.EnvdAccessToken != sb.EnvdAccessToken || detail.AllowInternetAccess == nil || !*detail.AllowInternetAccess {
		t.Errorf("envdAccessToken %q (want %q), allowInternetAccess %v", detail.EnvdAccessToken, sb.EnvdAccessToken, detail.AllowInternetAccess)
	}
	if !detail.Lifecycle.AutoResume || detail.Lifecycle.OnTimeout != "pause" {
		t.Errorf("lifecycle = %+v, want autoResume and onTimeout pause", detail.Lifecycle)
	}
}

func TestCreateValidation(t *testing.T) {
	tests := []struct {
		name, body string
		status     int
		msg        string
	}{
		{"timeout zero", `{"templateID":"base","timeout":0}`, 400, "Timeout must be greater than 0"},
		{"timeout negative", `{"templateID":"base","timeout":-5}`, 400, "Timeout must be greater than 0"},
		{"timeout beyond team maximum", `{"templateID":"base","timeout":7200}`, 400, "Timeout cannot be greater than 1 hours"},
		{"timeout as string", `{"templateID":"base","timeout":"30"}`, 400, `"timeout": want an integer (32-bit), got string`},
		{"timeout fractional", `{"templateID":"base","timeout":1.5}`, 400, `"timeout"`},
		{"timeout beyond int32", `{"templateID":"base","timeout":99999999999}`, 400, `"timeout"`},
		{"templateID missing", `{"timeout":30}`, 400, `"templateID" is required`},
		{"empty body", ``, 400, `"templateID" is required`},
		{"templateID not a string", `{"templateID":7}`, 400, `"templateID": want a string, got number`},
		{"malformed reference", `{"templateID":"Bad Ref!"}`, 400, "Invalid template reference"},
		{"too many slashes", `{"templateID":"a/b/c"}`, 400, "Invalid template reference"},
		{"bad tag", `{"templateID":"base:Bad Tag"}`, 400, "Invalid template reference"},
		{"unknown template", `{"templateID":"nosuchtemplate"}`, 404, "template 'nosuchtemplate' not found"},
		{"unknown tag", `{"templateID":"base:nope"}`, 404, "tag 'nope' does not exist for template 'base'"},
		{"other team's private alias", `{"templateID":"team-b/secret"}`, 404, "template 'team-b/secret' not found"},
		{"other team's private ID", `{"templateID":"` + secretID + `"}`, 404, "not found"},
		{"not JSON", `{"templateID":`, 400, "not valid JSON"},
		{"not an object", `["base"]`, 400, "must be a JSON object"},
		{"metadata value not a string", `{"templateID":"base","metadata":{"k":1}}`, 400, `"metadata": want a string, got number`},
		{"envVars not an object", `{"templateID":"base","envVars":"A=1"}`, 400, `"envVars": want an object, got string`},
		{"autoPauseMemory without autoPause", `{"templateID":"base","autoPauseMemory":false}`, 400, "autoPauseMemory"},
		{"filesystem-only pause with autoResume", `{"templateID":"base","autoPause":true,"autoPauseMemory":false,"autoResume":{"enabled":true}}`, 400, "autoResume"},
		{"autoResume without enabled", `{"templateID":"base","autoResume":{}}`, 400, `"autoResume.enabled" is required`},
		{"mcp", `{"templateID":"base","mcp":{"github":{"token":"x"}}}`, 400, `"mcp" is not supported yet`},
		{"private traffic", `{"templateID":"base","network":{"allowPublicTraffic":false}}`, 400, "network.allowPublicTraffic"},
		{"partial deny", `{"templateID":"base","network":{"denyOut":["10.0.0.0/8"]}}`, 400, "network.denyOut"},
		{"allow exceptions to a deny", `{"templateID":"base","network":{"denyOut":["0.0.0.0/0"],"allowOut":["8.8.8.8"]}}`, 400, "network.allowOut"},
		{"allow exceptions without internet", `{"templateID":"base","allow_internet_access":false,"network":{"allowOut":["example.com"]}}`, 400, "network.allowOut"},
		{"egress proxy", `{"templateID":"base","network":{"egressProxy":{"address":"p:1080"}}}`, 400, "network.egressProxy"},
		{"host mask", `{"templateID":"base","network":{"maskRequestHost":"x-${PORT}"}}`, 400, "network.maskRequestHost"},
		{"transform rules", `{"templateID":"base","network":{"rules":{"api.example.com":[]}}}`, 400, "network.rules"},
	}
	e := newEnv(t, envOptions{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, path := range []string{"/sandboxes", "/v2/sandboxes"} {
				before := e.node.specCount()
				e.do("POST", path, keyA, tt.body).wantError(t, tt.status, tt.msg)
				if e.node.specCount() != before {
					t.Errorf("%s: the node was asked to create a sandbox", path)
				}
			}
		})
	}
}

func TestCreateResolvesTemplateReferences(t *testing.T) {
	tests := []struct {
		ref, templateID, build, alias string
	}{
		{"base", baseID, baseBuild, "base"},
		{"base:default", baseID, baseBuild, "base"},
		{"BASE", baseID, baseBuild, "base"},
		{"mine", mineID, mineNewBuild, "mine"},
		{"team-a/mine", mineID, mineNewBuild, "mine"},
		{"mine:v1", mineID, mineOldBuild, "mine"},
		{mineID, mineID, mineNewBuild, ""},
		{mineID + ":v1", mineID, mineOldBuild, ""},
		{baseID, baseID, baseBuild, ""},
	}
	e := newEnv(t, envOptions{})
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			sb := e.create(keyA, `{"templateID":"`+tt.ref+`"}`)
			spec := e.node.lastSpec()
			if sb.TemplateID != tt.templateID || spec.BuildID != tt.build || sb.Alias != tt.alias {
				t.Errorf("templateID %q build %q alias %q; want %q %q %q", sb.TemplateID, spec.BuildID, sb.Alias, tt.templateID, tt.build, tt.alias)
			}
		})
	}
}

func TestBodyLimitAndChunkedBodies(t *testing.T) {
	e := newEnv(t, envOptions{maxBody: 1024})
	big := `{"templateID":"base","metadata":{"k":"` + strings.Repeat("x", 2000) + `"}}`
	// Declared too large: refused before reading.
	e.do("POST", "/v2/sandboxes", keyA, big).wantError(t, http.StatusRequestEntityTooLarge, "larger than 1024 bytes")

	chunked := func(body string) *response {
		// Written by hand so the body is certainly chunked without
		// Content-Length, as the SDK's fetch streams it over HTTP/1.1.
		conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
		must(t, err)
		defer conn.Close()
		var req strings.Builder
		fmt.Fprintf(&req, "POST /v2/sandboxes HTTP/1.1\r\nHost: api\r\nX-API-KEY: %s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", keyA)
		for rest := body; rest != ""; {
			n := min(len(rest), 100)
			fmt.Fprintf(&req, "%x\r\n%s\r\n", n, rest[:n])
			rest = rest[n:]
		}
		req.WriteString("0\r\n\r\n")
		_, err = io.WriteString(conn, req.String())
		must(t, err)
		res, err := http.ReadResponse(bufio.NewReader(conn), nil)
		must(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return &response{status: res.StatusCode, header: res.Header, body: b}
	}
	chunked(`{"templateID":"base","timeout":30}`).wantStatus(t, http.StatusCreated)
	chunked(big).wantError(t, http.StatusRequestEntityTooLarge, "larger than 1024 bytes")
}

func TestNodeFullIs503(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.node.set(func(n *fakeNode) { n.createErr = fmt.Errorf("no slot: %w", node.ErrFull) })
	res := e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`)
	res.wantError(t, http.StatusServiceUnavailable, "no capacity")
	if !strings.Contains(string(res.body), `"error_code":"sandbox_capacity_unavailable"`) {
		t.Errorf("body %s lacks error_code", res.body)
	}
	e.node.set(func(n *fakeNode) { n.createErr = fmt.Errorf("qemu exploded") })
	res = e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`)
	res.wantError(t, http.StatusInternalServerError, "Internal server error")
	if strings.Contains(string(res.body), "qemu") {
		t.Errorf("500 body leaks the internal error: %s", res.body)
	}
}

func TestTeamLimitIs429WithRetryAfter(t *testing.T) {
	e := newEnv(t, envOptions{maxSandboxes: 2})
	first := e.create(keyA, `{"templateID":"base"}`)
	e.create(keyA, `{"templateID":"base"}`)
	res := e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`)
	res.wantError(t, http.StatusTooManyRequests, "you have reached the maximum number of concurrent E2B sandboxes (2)")
	if ra := res.header.Get("Retry-After"); !regexp.MustCompile(`^[1-9][0-9]*$`).MatchString(ra) {
		t.Errorf("Retry-After = %q, want whole seconds", ra)
	}
	// Another team is not limited by team A's sandboxes.
	e.create(keyB, `{"templateID":"base"}`)
	e.do("DELETE", "/sandboxes/"+first.SandboxID, keyA, "").wantStatus(t, http.StatusNoContent)
	e.create(keyA, `{"templateID":"base"}`)
}

func TestTeamLimitCountsCreatesInFlight(t *testing.T) {
	e := newEnv(t, envOptions{maxSandboxes: 1})
	gate, started := make(chan struct{}), make(chan struct{}, 1)
	e.node.set(func(n *fakeNode) { n.createGate, n.createStarted = gate, started })
	done := make(chan *response)
	go func() { done <- doRequest(t, "POST", e.url+"/v2/sandboxes", keyA, `{"templateID":"base"}`) }()
	<-started // the first create is booting
	e.node.set(func(n *fakeNode) { n.createGate = nil })
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"base"}`).wantError(t, http.StatusTooManyRequests, "(1)")
	close(gate)
	(<-done).wantStatus(t, http.StatusCreated)
}

func TestGetAndKill(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base","metadata":{"a":"b"}}`)
	got := e.get(keyA, sb.SandboxID)
	if got.SandboxID != sb.SandboxID || got.ClientID != "6532622b" || got.Alias != "base" || got.EnvdVersion != "0.6.5" {
		t.Errorf("get = %+v", got)
	}
	// The legacy "<id>-<clientID>" form names the same sandbox.
	e.get(keyA, sb.SandboxID+"-6532622b")

	res := e.do("DELETE", "/sandboxes/"+sb.SandboxID, keyA, "").wantStatus(t, http.StatusNoContent)
	if len(res.body) != 0 {
		t.Errorf("204 has a body: %q", res.body)
	}
	if n := e.node.killCount(sb.SandboxID); n != 1 || e.node.isRunning(sb.SandboxID) {
		t.Errorf("node kills = %d, running = %v; want 1, false", n, e.node.isRunning(sb.SandboxID))
	}
	// The SDK's kill() returns false on a 404 whose body says code 404.
	res = e.do("DELETE", "/sandboxes/"+sb.SandboxID, keyA, "")
	want := fmt.Sprintf(`{"code":404,"message":"Sandbox \"%s\" doesn't exist or you don't have access to it"}`, sb.SandboxID)
	if res.status != 404 || string(res.body) != want || res.header.Get("Content-Type") != "application/json" {
		t.Errorf("second kill = %d %q %s, want 404 application/json %s", res.status, res.header.Get("Content-Type"), res.body, want)
	}
	e.do("GET", "/sandboxes/"+sb.SandboxID, keyA, "").wantError(t, 404, "doesn't exist")

	other := e.create(keyA, `{"templateID":"base"}`)
	e.do("DELETE", "/sandboxes/"+other.SandboxID+"-6532622b", keyA, "").wantStatus(t, http.StatusNoContent)
	e.do("DELETE", "/sandboxes/nosuchsandbox", keyA, "").wantError(t, 404, `Sandbox "nosuchsandbox" doesn't exist`)
}

func TestOtherTeamsSandboxesAreNotFound(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyB, `{"templateID":"base"}`)
	id := sb.SandboxID
	tests := []struct{ method, path, body string }{
		{"GET", "/sandboxes/" + id, ""},
		{"DELETE", "/sandboxes/" + id, ""},
		{"POST", "/sandboxes/" + id + "/timeout", `{"timeout":1}`},
		{"POST", "/sandboxes/" + id + "/refreshes", `{"duration":60}`},
		{"POST", "/sandboxes/" + id + "/connect", `{"timeout":60}`},
		{"POST", "/v2/sandboxes/" + id + "/connect", `{}`},
		{"GET", "/sandboxes/" + id + "/metrics", ""},
		{"GET", "/sandboxes/" + id + "/logs", ""},
		{"GET", "/v2/sandboxes/" + id + "/logs", ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			e.do(tt.method, tt.path, keyA, tt.body).wantError(t, 404, fmt.Sprintf("Sandbox %q doesn't exist or you don't have access to it", id))
		})
	}
	var list []listedSandbox
	e.do("GET", "/v2/sandboxes", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 0 {
		t.Errorf("team A lists team B's sandboxes: %+v", list)
	}
	if !e.node.isRunning(id) || e.get(keyB, id).EndAt.Sub(time.Now()) < 200*time.Second {
		t.Error("team A's requests changed team B's sandbox")
	}
}

func TestSetTimeout(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base","timeout":300}`)
	path := "/sandboxes/" + sb.SandboxID + "/timeout"

	res := e.do("POST", path, keyA, `{"timeout":60}`).wantStatus(t, http.StatusNoContent)
	if len(res.body) != 0 {
		t.Errorf("204 has a body %q", res.body)
	}
	approx(t, "endAt after shortening to 60 s", e.get(keyA, sb.SandboxID).EndAt, time.Now().Add(60*time.Second))
	e.do("POST", path, keyA, `{"timeout":600}`).wantStatus(t, http.StatusNoContent)
	approx(t, "endAt after extending to 600 s", e.get(keyA, sb.SandboxID).EndAt, time.Now().Add(600*time.Second))
	// Never past the team's maximum lifetime, counted from the start.
	e.do("POST", path, keyA, `{"timeout":86400}`).wantStatus(t, http.StatusNoContent)
	got := e.get(keyA, sb.SandboxID)
	if got.EndAt.Sub(got.StartedAt) != time.Hour {
		t.Errorf("endAt - startedAt = %s, want the 1 h maximum", got.EndAt.Sub(got.StartedAt))
	}

	e.do("POST", path, keyA, `{}`).wantError(t, 400, `"timeout" is required`)
	e.do("POST", path, keyA, ``).wantError(t, 400, `"timeout" is required`)
	e.do("POST", path, keyA, `{"timeout":"soon"}`).wantError(t, 400, `"timeout"`)
	e.do("POST", "/sandboxes/nosuch/timeout", keyA, `{"timeout":5}`).wantError(t, 404, "doesn't exist")
}

func TestShortTimeoutThenEvicted(t *testing.T) {
	e := newEnv(t, envOptions{evictEvery: 20 * time.Millisecond})
	for _, timeout := range []string{"1", "0"} {
		sb := e.create(keyA, `{"templateID":"base","timeout":300}`)
		e.do("POST", "/sandboxes/"+sb.SandboxID+"/timeout", keyA, `{"timeout":`+timeout+`}`).wantStatus(t, http.StatusNoContent)
		deadline := time.Now().Add(5 * time.Second)
		for e.do("GET", "/sandboxes/"+sb.SandboxID, keyA, "").status != http.StatusNotFound {
			if time.Now().After(deadline) {
				t.Fatalf("timeout %s: sandbox still there 5 s later", timeout)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// GET is 404 from the deadline on; the evictor kills the VM soon after.
		for e.node.isRunning(sb.SandboxID) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(100 * time.Millisecond) // the row goes right after the VM
		if e.node.isRunning(sb.SandboxID) || e.node.killCount(sb.SandboxID) != 1 {
			t.Errorf("timeout %s: node running = %v, kills = %d; want false, 1", timeout, e.node.isRunning(sb.SandboxID), e.node.killCount(sb.SandboxID))
		}
		e.do("DELETE", "/sandboxes/"+sb.SandboxID, keyA, "").wantError(t, 404, "doesn't exist")
	}
}

func TestRefresh(t *testing.T) {
	e := newEnv(t, envOptions{})
	short := e.create(keyA, `{"templateID":"base","timeout":5}`)
	e.do("POST", "/sandboxes/"+short.SandboxID+"/refreshes", keyA, ``).wantStatus(t, http.StatusNoContent)
	approx(t, "endAt after an empty refresh (15 s minimum)", e.get(keyA, short.SandboxID).EndAt, time.Now().Add(15*time.Second))
	e.do("POST", "/sandboxes/"+short.SandboxID+"/refreshes", keyA, `{"duration":120}`).wantStatus(t, http.StatusNoContent)
	approx(t, "endAt after refresh 120", e.get(keyA, short.SandboxID).EndAt, time.Now().Add(120*time.Second))

	long := e.create(keyA, `{"templateID":"base","timeout":600}`)
	before := e.get(keyA, long.SandboxID).EndAt
	e.do("POST", "/sandboxes/"+long.SandboxID+"/refreshes", keyA, `{"duration":20}`).wantStatus(t, http.StatusNoContent)
	if after := e.get(keyA, long.SandboxID).EndAt; !after.Equal(before) {
		t.Errorf("refresh shortened endAt from %s to %s", before, after)
	}
	e.do("POST", "/sandboxes/"+long.SandboxID+"/refreshes", keyA, `{"duration":3601}`).wantError(t, 400, `"duration" must be from 0 to 3600`)
	e.do("POST", "/sandboxes/"+long.SandboxID+"/refreshes", keyA, `{"duration":-1}`).wantError(t, 400, `"duration"`)
}

func TestConnect(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base","timeout":30}`)
	id := sb.SandboxID

	// v2 with no body extends to the 300 s default.
	var got sandbox
	res := e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, "").wantStatus(t, http.StatusOK)
	res.decode(t, &got)
	if got.SandboxID != id || got.EnvdAccessToken != sb.EnvdAccessToken || got.ClientID != "6532622b" || got.TemplateID != baseID {
		t.Errorf("connect = %+v, want the created sandbox %+v", got, sb)
	}
	approx(t, "endAt after connect", e.get(keyA, id).EndAt, time.Now().Add(300*time.Second))

	// A shorter timeout never shortens the deadline.
	before := e.get(keyA, id).EndAt
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{"timeout":10}`).wantStatus(t, http.StatusOK)
	e.do("POST", "/sandboxes/"+id+"/connect", keyA, `{"timeout":10}`).wantStatus(t, http.StatusOK)
	if after := e.get(keyA, id).EndAt; !after.Equal(before) {
		t.Errorf("connect with a shorter timeout moved endAt from %s to %s", before, after)
	}
	e.do("POST", "/sandboxes/"+id+"/connect", keyA, `{"timeout":900}`).wantStatus(t, http.StatusOK)
	approx(t, "endAt after v1 connect 900", e.get(keyA, id).EndAt, time.Now().Add(900*time.Second))

	e.do("POST", "/sandboxes/"+id+"/connect", keyA, `{}`).wantError(t, 400, `"timeout" is required`)
	e.do("POST", "/sandboxes/"+id+"/connect", keyA, ``).wantError(t, 400, `"timeout" is required`)
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{"timeout":-1}`).wantError(t, 400, `"timeout" must be at least 0`)
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{"timeout":7200}`).wantError(t, 400, "Timeout cannot be greater than 1 hours")
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{"timeout":60,"memory":false}`).wantStatus(t, http.StatusOK)
	e.do("POST", "/v2/sandboxes/nosuch/connect", keyA, `{}`).wantError(t, 404, `Sandbox "nosuch" doesn't exist`)
}

// TestConcurrentLifecycleCalls races kill, setTimeout and connect on one
// sandbox: no request may fail with 500, exactly one kill wins, and the node
// is asked to kill it exactly once.
func TestConcurrentLifecycleCalls(t *testing.T) {
	e := newEnv(t, envOptions{})
	for round := range 3 {
		sb := e.create(keyA, `{"templateID":"base"}`)
		id := sb.SandboxID
		type call struct{ method, path, body string }
		calls := []call{
			{"DELETE", "/sandboxes/" + id, ""},
			{"POST", "/sandboxes/" + id + "/timeout", `{"timeout":120}`},
			{"POST", "/v2/sandboxes/" + id + "/connect", `{"timeout":200}`},
			{"POST", "/sandboxes/" + id + "/connect", `{"timeout":200}`},
		}
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex
			statuses = map[string]map[int]int{}
		)
		start := make(chan struct{})
		for i := range 20 {
			c := calls[i%len(calls)]
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				res := doRequest(t, c.method, e.url+c.path, keyA, c.body)
				mu.Lock()
				defer mu.Unlock()
				if statuses[c.method] == nil {
					statuses[c.method] = map[int]int{}
				}
				statuses[c.method][res.status]++
				if res.status >= 500 {
					t.Errorf("round %d: %s %s = %d %s", round, c.method, c.path, res.status, res.body)
				}
				if res.status >= 400 && !strings.Contains(string(res.body), fmt.Sprintf(`"code":%d`, res.status)) {
					t.Errorf("round %d: %s %s = %d with body %s", round, c.method, c.path, res.status, res.body)
				}
			}()
		}
		close(start)
		wg.Wait()
		kills := statuses["DELETE"]
		if kills[http.StatusNoContent] != 1 || kills[http.StatusNoContent]+kills[http.StatusNotFound] != 5 {
			t.Errorf("round %d: kill statuses %v, want one 204 and four 404", round, kills)
		}
		if n := e.node.killCount(id); n != 1 {
			t.Errorf("round %d: node Kill called %d times, want 1", round, n)
		}
		e.do("GET", "/sandboxes/"+id, keyA, "").wantError(t, 404, "doesn't exist")
		if _, err := e.store.GetSandbox(context.Background(), id); err == nil {
			t.Errorf("round %d: the killed sandbox's row is still stored", round)
		}
	}
}
