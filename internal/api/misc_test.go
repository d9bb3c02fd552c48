package api_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
)

func TestAuthentication(t *testing.T) {
	e := newEnv(t, envOptions{})
	tests := []struct {
		name   string
		header string // header name, to check any case is accepted
		key    string
		status int
		body   string
	}{
		{"no key", "", "", 401, `{"code":401,"message":"Invalid API key: send it in the X-API-Key header"}`},
		{"unknown key", "X-API-Key", "e2b_0000000000000000000000000000000000000000", 401, `{"code":401,"message":"Invalid API key"}`},
		{"not a key at all", "X-API-Key", "hello", 401, `{"code":401,"message":"Invalid API key"}`},
		{"spec spelling", "X-API-Key", keyA, 200, "[]"},
		{"SDK spelling", "X-API-KEY", keyA, 200, "[]"},
		{"lower case (HTTP/2)", "x-api-key", keyA, 200, "[]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest("GET", e.url+"/v2/sandboxes", nil)
			must(t, err)
			if tt.header != "" {
				req.Header[tt.header] = []string{tt.key}
			}
			res, err := http.DefaultClient.Do(req)
			must(t, err)
			defer res.Body.Close()
			if body := mustRead(t, res); res.StatusCode != tt.status || body != tt.body {
				t.Errorf("= %d %s, want %d %s", res.StatusCode, body, tt.status, tt.body)
			}
			if ct := res.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
		})
	}
	// Every authenticated route refuses a missing key the same way.
	for _, path := range []string{"/sandboxes", "/templates", "/teams", "/api-keys", "/sandboxes/x", "/sandboxes/metrics?sandbox_ids=x"} {
		e.do("GET", path, "", "").wantError(t, 401, "Invalid API key")
	}
	e.do("POST", "/v2/sandboxes", "e2b_nope", `{"templateID":"base"}`).wantError(t, 401, "Invalid API key")
	if e.node.specCount() != 0 {
		t.Error("an unauthenticated create reached the node")
	}
}

func mustRead(t *testing.T, res *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(res.Body)
	must(t, err)
	return string(b)
}

func TestAPIKeyUseIsRecordedAtMostOncePerMinute(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := context.Background()
	lastUsed := func() *time.Time {
		k, err := e.store.APIKeyByHash(ctx, sha(keyA))
		must(t, err)
		return k.LastUsedAt
	}
	if lastUsed() != nil {
		t.Fatal("fresh key already used")
	}
	e.do("GET", "/teams", keyA, "").wantStatus(t, 200)
	first := lastUsed()
	if first == nil || time.Since(*first) > 5*time.Second {
		t.Fatalf("lastUsed = %v after a request, want now", first)
	}
	time.Sleep(5 * time.Millisecond)
	e.do("GET", "/teams", keyA, "").wantStatus(t, 200)
	if second := lastUsed(); !second.Equal(*first) {
		t.Errorf("lastUsed moved from %s to %s within a minute", first, second)
	}
}

func TestProtocolDetails(t *testing.T) {
	e := newEnv(t, envOptions{})

	res := e.do("GET", "/health", "", "").wantStatus(t, http.StatusOK)
	if res.header.Get("Content-Length") != "0" || len(res.body) != 0 {
		t.Errorf("health: Content-Length %q, body %q; want 0 and empty", res.header.Get("Content-Length"), res.body)
	}
	res = e.do("GET", "/openapi.yaml", "", "").wantStatus(t, http.StatusOK)
	if !strings.HasPrefix(string(res.body), "openapi: 3.") || res.header.Get("Content-Type") != "application/yaml" {
		t.Errorf("openapi.yaml: %q, starts %q", res.header.Get("Content-Type"), res.body[:min(20, len(res.body))])
	}

	e.do("GET", "/no/such/route", keyA, "").wantError(t, http.StatusNotFound, "Not found: GET /no/such/route")
	e.do("GET", "/sandboxes/x/y/z", keyA, "").wantError(t, http.StatusNotFound, "Not found")
	e.do("GET", "/templates/"+mineID+"/nottags", keyA, "").wantError(t, http.StatusNotFound, "Not found")
	res = e.do("PUT", "/sandboxes", keyA, "{}")
	res.wantError(t, http.StatusMethodNotAllowed, "Method PUT is not allowed on /sandboxes")
	if allow := res.header.Get("Allow"); !strings.Contains(allow, "GET") || !strings.Contains(allow, "POST") {
		t.Errorf("Allow = %q, want GET and POST", allow)
	}

	// CORS preflight for the browser SDK: no key needed, its headers allowed.
	req, err := http.NewRequest("OPTIONS", e.url+"/v2/sandboxes", nil)
	must(t, err)
	req.Header.Set("Origin", "https://app.example.com")
	req.Header.Set("Access-Control-Request-Method", "POST")
	req.Header.Set("Access-Control-Request-Headers", "content-type,x-api-key,browser,lang,package_version")
	pre, err := http.DefaultClient.Do(req)
	must(t, err)
	pre.Body.Close()
	if pre.StatusCode != http.StatusNoContent {
		t.Errorf("preflight status %d, want 204", pre.StatusCode)
	}
	for h, want := range map[string]string{
		"Access-Control-Allow-Origin":   "*",
		"Access-Control-Allow-Methods":  "POST",
		"Access-Control-Allow-Headers":  "x-api-key",
		"Access-Control-Expose-Headers": "X-Next-Token",
	} {
		if got := pre.Header.Get(h); !strings.Contains(got, want) {
			t.Errorf("preflight %s = %q, want it to contain %q", h, got, want)
		}
	}
	res = e.do("GET", "/sandboxes", "", "")
	if res.header.Get("Access-Control-Allow-Origin") != "*" {
		t.Error("error answers lack CORS headers; the browser could not read them")
	}
}

type metricJSON struct {
	Timestamp     time.Time `json:"timestamp"`
	TimestampUnix int64     `json:"timestampUnix"`
	CPUCount      int       `json:"cpuCount"`
	CPUUsedPct    float64   `json:"cpuUsedPct"`
	MemUsed       uint64    `json:"memUsed"`
	MemTotal      uint64    `json:"memTotal"`
	MemCache      uint64    `json:"memCache"`
	DiskUsed      uint64    `json:"diskUsed"`
	DiskTotal     uint64    `json:"diskTotal"`
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base"}`)
	other := e.create(keyB, `{"templateID":"base"}`)
	path := "/sandboxes/" + sb.SandboxID + "/metrics"

	var ms []metricJSON
	e.do("GET", path, keyA, "").wantStatus(t, http.StatusOK).decode(t, &ms)
	if len(ms) == 0 {
		t.Fatal("no metrics for a running sandbox")
	}
	m := ms[len(ms)-1]
	if m.CPUCount != 2 || m.CPUUsedPct != 12.5 || m.MemTotal != 512<<20 || m.MemUsed != 100<<20 || m.MemCache != 10<<20 ||
		m.DiskUsed != 1<<30 || m.DiskTotal != 4<<30 || m.TimestampUnix != m.Timestamp.Unix() {
		t.Errorf("metric = %+v", m)
	}
	now := time.Now().Unix()
	e.do("GET", fmt.Sprintf("%s?start=%d&end=%d", path, now-60, now), keyA, "").wantStatus(t, http.StatusOK).decode(t, &ms)
	if len(ms) == 0 {
		t.Error("no metrics in the last minute")
	}
	for _, m := range ms {
		if m.TimestampUnix < now-60 || m.TimestampUnix > now {
			t.Errorf("sample at %d outside [%d, %d]", m.TimestampUnix, now-60, now)
		}
	}
	res := e.do("GET", fmt.Sprintf("%s?start=%d&end=%d", path, now-7200, now-3600), keyA, "").wantStatus(t, http.StatusOK)
	if string(res.body) != "[]" {
		t.Errorf("past window = %s, want []", res.body)
	}
	e.do("GET", path+"?start=abc", keyA, "").wantError(t, 400, `"start"`)
	e.do("GET", path+"?start=-1", keyA, "").wantError(t, 400, `"start"`)
	e.do("GET", fmt.Sprintf("%s?start=%d&end=%d", path, now, now-10), keyA, "").wantError(t, 400, "is after")
	e.do("GET", "/sandboxes/nosuch/metrics", keyA, "").wantError(t, 404, "doesn't exist")

	var batch struct {
		Sandboxes map[string]metricJSON `json:"sandboxes"`
	}
	e.do("GET", "/sandboxes/metrics?sandbox_ids="+sb.SandboxID+",nosuch,"+other.SandboxID, keyA, "").wantStatus(t, http.StatusOK).decode(t, &batch)
	if _, ok := batch.Sandboxes[sb.SandboxID]; !ok || len(batch.Sandboxes) != 1 {
		t.Errorf("batch = %+v, want only %s", batch.Sandboxes, sb.SandboxID)
	}
	e.do("GET", "/sandboxes/metrics", keyA, "").wantError(t, 400, `"sandbox_ids" is required`)
	ids := make([]string, 101)
	for i := range ids {
		ids[i] = fmt.Sprintf("id%d", i)
	}
	e.do("GET", "/sandboxes/metrics?sandbox_ids="+strings.Join(ids, ","), keyA, "").wantError(t, 400, "at most 100")
}

func TestLogs(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base"}`)
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	e.node.setLogs(sb.SandboxID, []node.LogLine{
		{Time: t0.Add(2 * time.Second), Source: "envd", Message: "envd ready"},
		{Time: t0, Source: "boot", Message: "kernel up"},
		{Time: t0.Add(time.Second), Source: "boot", Message: "init done"},
	})
	var v1 struct {
		Logs []struct {
			Timestamp time.Time `json:"timestamp"`
			Line      string    `json:"line"`
		} `json:"logs"`
		LogEntries []struct {
			Timestamp time.Time         `json:"timestamp"`
			Level     string            `json:"level"`
			Message   string            `json:"message"`
			Fields    map[string]string `json:"fields"`
		} `json:"logEntries"`
	}
	e.do("GET", "/sandboxes/"+sb.SandboxID+"/logs", keyA, "").wantStatus(t, 200).decode(t, &v1)
	if len(v1.Logs) != 3 || v1.Logs[0].Line != "kernel up" || v1.Logs[2].Line != "envd ready" || !v1.Logs[0].Timestamp.Equal(t0) {
		t.Errorf("v1 logs = %+v, want 3 oldest first", v1.Logs)
	}
	if len(v1.LogEntries) != 3 || v1.LogEntries[0].Level != "info" || v1.LogEntries[0].Fields["source"] != "boot" {
		t.Errorf("v1 logEntries = %+v", v1.LogEntries)
	}
	e.do("GET", fmt.Sprintf("/sandboxes/%s/logs?start=%d&limit=1", sb.SandboxID, t0.Add(time.Second).UnixMilli()), keyA, "").wantStatus(t, 200).decode(t, &v1)
	if len(v1.Logs) != 1 || v1.Logs[0].Line != "init done" {
		t.Errorf("v1 logs from t0+1s, limit 1 = %+v", v1.Logs)
	}

	v2 := func(query string) []string {
		t.Helper()
		var out struct {
			Logs []struct {
				Message string `json:"message"`
			} `json:"logs"`
		}
		e.do("GET", "/v2/sandboxes/"+sb.SandboxID+"/logs?"+query, keyA, "").wantStatus(t, 200).decode(t, &out)
		var msgs []string
		for _, l := range out.Logs {
			msgs = append(msgs, l.Message)
		}
		return msgs
	}
	for _, tt := range []struct {
		query string
		want  []string
	}{
		{"", []string{"kernel up", "init done", "envd ready"}},
		{"direction=backward", []string{"envd ready", "init done", "kernel up"}},
		{"direction=backward&limit=1", []string{"envd ready"}},
		{fmt.Sprintf("cursor=%d", t0.Add(time.Second).UnixMilli()), []string{"init done", "envd ready"}},
		{fmt.Sprintf("cursor=%d&direction=backward", t0.Add(time.Second).UnixMilli()), []string{"init done", "kernel up"}},
		{"search=done", []string{"init done"}},
		{"search=Done", nil},
		{"level=info", []string{"kernel up", "init done", "envd ready"}},
		{"level=error", nil},
		{"limit=0", nil},
	} {
		if got := v2(tt.query); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("v2 ?%s = %v, want %v", tt.query, got, tt.want)
		}
	}
	for _, q := range []string{"direction=up", "level=loud", "limit=1001", "cursor=x"} {
		e.do("GET", "/v2/sandboxes/"+sb.SandboxID+"/logs?"+q, keyA, "").wantError(t, 400, "Query parameter")
	}
	e.do("GET", "/v2/sandboxes/nosuch/logs", keyA, "").wantError(t, 404, "doesn't exist")
}

func TestTeams(t *testing.T) {
	e := newEnv(t, envOptions{})
	res := e.do("GET", "/teams", keyA, "").wantStatus(t, 200)
	want := `[{"teamID":"team-a-id","name":"Team A","apiKey":"` + keyA + `","isDefault":true}]`
	if string(res.body) != want {
		t.Errorf("teams = %s, want %s", res.body, want)
	}
}

func TestAPIKeys(t *testing.T) {
	e := newEnv(t, envOptions{})
	var created struct {
		ID   string `json:"id"`
		Key  string `json:"key"`
		Name string `json:"name"`
		Mask struct {
			Prefix            string `json:"prefix"`
			ValueLength       int    `json:"valueLength"`
			MaskedValuePrefix string `json:"maskedValuePrefix"`
			MaskedValueSuffix string `json:"maskedValueSuffix"`
		} `json:"mask"`
		CreatedAt time.Time  `json:"createdAt"`
		LastUsed  *time.Time `json:"lastUsed"`
	}
	e.do("POST", "/api-keys", keyA, `{"name":"ci"}`).wantStatus(t, http.StatusCreated).decode(t, &created)
	if !regexp.MustCompile(`^e2b_[0-9a-f]{40}$`).MatchString(created.Key) {
		t.Fatalf("key %q is not e2b_ + 40 hex", created.Key)
	}
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(created.ID) {
		t.Errorf("id %q is not a UUID", created.ID)
	}
	m := created.Mask
	if created.Name != "ci" || m.Prefix != "e2b_" || m.ValueLength != 40 || m.MaskedValuePrefix != created.Key[4:8] || m.MaskedValueSuffix != created.Key[40:] {
		t.Errorf("created = %+v", created)
	}
	stored, err := e.store.APIKeyByHash(context.Background(), sha(created.Key))
	if err != nil || stored.ID != created.ID || strings.Contains(stored.Mask, created.Key[8:40]) {
		t.Errorf("stored key = %+v, %v; want it found by hash and masked", stored, err)
	}

	// The new key works, for its own team.
	var teams []struct{ TeamID string }
	e.do("GET", "/teams", created.Key, "").wantStatus(t, 200).decode(t, &teams)
	if len(teams) != 1 || teams[0].TeamID != "team-a-id" {
		t.Errorf("teams with the new key = %+v", teams)
	}

	res := e.do("GET", "/api-keys", keyA, "").wantStatus(t, 200)
	if strings.Contains(string(res.body), created.Key) || strings.Contains(string(res.body), `"key"`) {
		t.Errorf("listing shows a key's text: %s", res.body)
	}
	var list []struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	res.decode(t, &list)
	if len(list) != 2 || list[1].ID != created.ID {
		t.Errorf("keys = %+v, want the fixture key and the new one", list)
	}
	var listB []struct{ ID string }
	e.do("GET", "/api-keys", keyB, "").wantStatus(t, 200).decode(t, &listB)
	if len(listB) != 1 {
		t.Errorf("team B sees %d keys, want its own 1", len(listB))
	}

	e.do("DELETE", "/api-keys/"+created.ID, keyB, "").wantError(t, 404, "doesn't exist")
	e.do("DELETE", "/api-keys/"+created.ID, keyA, "").wantStatus(t, http.StatusNoContent)
	e.do("GET", "/teams", created.Key, "").wantError(t, 401, "Invalid API key")
	e.do("DELETE", "/api-keys/"+created.ID, keyA, "").wantError(t, 404, "doesn't exist")

	e.do("POST", "/api-keys", keyA, `{}`).wantError(t, 400, `"name" is required`)
	e.do("POST", "/api-keys", keyA, `{"name":"  "}`).wantError(t, 400, `"name" is required`)
	e.do("POST", "/api-keys", keyA, `{"name":5}`).wantError(t, 400, `"name"`)
}

func TestTemplates(t *testing.T) {
	e := newEnv(t, envOptions{})
	type template struct {
		TemplateID  string   `json:"templateID"`
		BuildID     string   `json:"buildID"`
		CPUCount    int      `json:"cpuCount"`
		MemoryMB    int      `json:"memoryMB"`
		DiskSizeMB  int      `json:"diskSizeMB"`
		Public      bool     `json:"public"`
		Aliases     []string `json:"aliases"`
		Names       []string `json:"names"`
		BuildCount  int      `json:"buildCount"`
		BuildStatus string   `json:"buildStatus"`
		EnvdVersion string   `json:"envdVersion"`
		SpawnCount  int64    `json:"spawnCount"`
	}
	var list []template
	e.do("GET", "/templates", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 1 {
		t.Fatalf("team A's templates = %+v, want only its own", list)
	}
	got := list[0]
	if got.TemplateID != mineID || got.BuildID != mineNewBuild || got.BuildCount != 2 || got.BuildStatus != "ready" ||
		got.Public || fmt.Sprint(got.Aliases) != "[mine]" || fmt.Sprint(got.Names) != "[team-a/mine]" ||
		got.CPUCount != 2 || got.MemoryMB != 512 || got.DiskSizeMB != 4096 || got.EnvdVersion != "0.6.5" {
		t.Errorf("template = %+v", got)
	}
	e.create(keyA, `{"templateID":"mine"}`)
	e.do("GET", "/v2/templates", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 1 || list[0].SpawnCount != 1 {
		t.Errorf("v2 templates = %+v, want one spawn recorded", list)
	}
	e.do("GET", "/templates?teamID=team-b-id", keyA, "").wantError(t, 403, "team-b-id")
	e.do("GET", "/v2/templates?teamID=team-b-id", keyA, "").wantError(t, 403, "team-b-id")
	e.do("GET", "/templates?teamID=team-a-id", keyA, "").wantStatus(t, 200)

	// Team B's two templates, one per page.
	page1 := e.do("GET", "/v2/templates?limit=1", keyB, "").wantStatus(t, 200)
	var p1, p2 []template
	page1.decode(t, &p1)
	token := page1.header.Get("X-Next-Token")
	if len(p1) != 1 || token == "" {
		t.Fatalf("page 1 = %+v, token %q", p1, token)
	}
	page2 := e.do("GET", "/v2/templates?limit=1&nextToken="+token, keyB, "").wantStatus(t, 200)
	page2.decode(t, &p2)
	if len(p2) != 1 || p2[0].TemplateID == p1[0].TemplateID || page2.header.Get("X-Next-Token") != "" {
		t.Errorf("page 2 = %+v, token %q", p2, page2.header.Get("X-Next-Token"))
	}
	e.do("GET", "/v2/templates?limit=0", keyB, "").wantError(t, 400, `"limit"`)
	e.do("GET", "/v2/templates?nextToken=zz", keyB, "").wantError(t, 400, "nextToken")

	// One template with its builds, newest first, paged.
	var withBuilds struct {
		TemplateID string   `json:"templateID"`
		Names      []string `json:"names"`
		Builds     []struct {
			BuildID string `json:"buildID"`
			Status  string `json:"status"`
		} `json:"builds"`
	}
	e.do("GET", "/templates/"+mineID, keyA, "").wantStatus(t, 200).decode(t, &withBuilds)
	if withBuilds.TemplateID != mineID || len(withBuilds.Builds) != 2 || withBuilds.Builds[0].BuildID != mineNewBuild || withBuilds.Builds[1].Status != "ready" {
		t.Errorf("template with builds = %+v", withBuilds)
	}
	res := e.do("GET", "/templates/mine?limit=1", keyA, "").wantStatus(t, 200)
	res.decode(t, &withBuilds)
	res = e.do("GET", "/templates/mine?limit=1&nextToken="+res.header.Get("X-Next-Token"), keyA, "").wantStatus(t, 200)
	res.decode(t, &withBuilds)
	if len(withBuilds.Builds) != 1 || withBuilds.Builds[0].BuildID != mineOldBuild || res.header.Get("X-Next-Token") != "" {
		t.Errorf("second page of builds = %+v, token %q", withBuilds.Builds, res.header.Get("X-Next-Token"))
	}
	e.do("GET", "/templates/"+secretID, keyA, "").wantError(t, 404, "template '"+secretID+"' not found")
	e.do("GET", "/templates/"+baseID, keyA, "").wantError(t, 404, "not found")
	e.do("GET", "/templates/nosuch", keyA, "").wantError(t, 404, "template 'nosuch' not found")

	// Template.exists: 200 own or public, 403 someone else's, 404 none.
	for _, tt := range []struct {
		key, alias string
		status     int
		body       string
	}{
		{keyA, "base", 200, `{"templateID":"` + baseID + `","public":true}`},
		{keyA, "mine", 200, `{"templateID":"` + mineID + `","public":false}`},
		{keyA, "team-a%2Fmine", 200, `{"templateID":"` + mineID + `","public":false}`},
		{keyA, "team-b%2Fsecret", 403, ""},
		{keyB, "team-b%2Fsecret", 200, `{"templateID":"` + secretID + `","public":false}`},
		{keyB, "mine", 404, ""},
		{keyA, "nosuch", 404, ""},
		{keyA, "Bad%21", 400, ""},
	} {
		res := e.do("GET", "/templates/aliases/"+tt.alias, tt.key, "")
		if tt.body != "" {
			res.wantStatus(t, tt.status)
			if string(res.body) != tt.body {
				t.Errorf("alias %s = %s, want %s", tt.alias, res.body, tt.body)
			}
		} else {
			res.wantError(t, tt.status, "")
		}
	}

	// Tags.
	res = e.do("GET", "/templates/mine/tags", keyA, "").wantStatus(t, 200)
	var tags []struct {
		Tag       string    `json:"tag"`
		BuildID   string    `json:"buildID"`
		CreatedAt time.Time `json:"createdAt"`
	}
	res.decode(t, &tags)
	if len(tags) != 1 || tags[0].Tag != "v1" || tags[0].BuildID != mineOldBuild || tags[0].CreatedAt.IsZero() {
		t.Errorf("tags = %+v", tags)
	}
	e.do("GET", "/templates/"+baseID+"/tags", keyA, "").wantError(t, 403, "another team")
	e.do("GET", "/templates/"+secretID+"/tags", keyA, "").wantError(t, 404, "not found")
	e.do("GET", "/templates/aliases/tags", keyA, "").wantError(t, 404, "template 'tags' not found")
}
