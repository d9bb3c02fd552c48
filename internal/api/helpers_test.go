package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/api"
	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/sqlite"
)

// Fixed test data: team A is the caller in most tests; team B owns the
// public global "base" template and a private one.
const (
	keyA = "e2b_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	keyB = "e2b_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

	baseID   = "basetemplate00000001" // team B, public, global alias "base"
	mineID   = "minetemplate00000001" // team A, private, alias team-a/mine, tag v1 = old build
	secretID = "secrettemplate000001" // team B, private, alias team-b/secret

	baseBuild    = "00000000-0000-4000-8000-000000000001"
	mineOldBuild = "00000000-0000-4000-8000-000000000002"
	mineNewBuild = "00000000-0000-4000-8000-000000000003"
	secretBuild  = "00000000-0000-4000-8000-000000000004"
)

// envOptions changes the fixture.
type envOptions struct {
	maxSandboxes int           // team A's limit (0 = none)
	maxLifetime  time.Duration // team A's limit (default 1 h)
	domain       string
	maxBody      int64
	// run starts the controller's background loop (evictor) with this interval.
	evictEvery time.Duration
}

// env is an API served on a loopback port over a real SQLite store, a real
// controller and a fake node.
type env struct {
	t     testing.TB
	url   string
	h     http.Handler
	store *sqlite.Store
	ctrl  *control.Controller
	node  *fakeNode
	teamA *store.Team
	teamB *store.Team
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "warren.db"))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	if o.maxLifetime == 0 {
		o.maxLifetime = time.Hour
	}
	e := &env{t: t, store: st, node: newFakeNode()}
	now := time.Now().UTC()
	e.teamA = &store.Team{ID: "team-a-id", Name: "Team A", Slug: "team-a", MaxSandboxes: o.maxSandboxes, MaxLifetime: o.maxLifetime, CreatedAt: now}
	e.teamB = &store.Team{ID: "team-b-id", Name: "Team B", Slug: "team-b", MaxLifetime: time.Hour, CreatedAt: now}
	must(t, st.CreateTeam(ctx, e.teamA))
	must(t, st.CreateTeam(ctx, e.teamB))
	for i, k := range []struct{ team, key string }{{e.teamA.ID, keyA}, {e.teamB.ID, keyB}} {
		must(t, st.CreateAPIKey(ctx, &store.APIKey{
			ID: "00000000-0000-4000-9000-00000000000" + string(rune('1'+i)), TeamID: k.team, Name: "test",
			Hash: sha(k.key), Mask: k.key[:8] + "..." + k.key[len(k.key)-4:], CreatedAt: now,
		}))
	}
	addTemplate := func(id, team string, public bool, aliases []store.Alias, builds ...*store.Build) {
		must(t, st.CreateTemplate(ctx, &store.Template{ID: id, TeamID: team, Public: public, CreatedAt: now, UpdatedAt: now}))
		for i, b := range builds {
			b.TemplateID, b.Status, b.EnvdVersion = id, store.BuildReady, "0.6.5"
			b.CPUCount, b.MemoryMB, b.DiskSizeMB = 2, 512, 4096
			b.CreatedAt = now.Add(time.Duration(i) * time.Second)
			b.UpdatedAt = b.CreatedAt
			must(t, st.CreateBuild(ctx, b))
		}
		for _, a := range aliases {
			a.TemplateID = id
			must(t, st.SetAlias(ctx, &a))
		}
	}
	addTemplate(baseID, e.teamB.ID, true, []store.Alias{{Alias: "base"}}, &store.Build{ID: baseBuild})
	addTemplate(mineID, e.teamA.ID, false, []store.Alias{{Namespace: "team-a", Alias: "mine"}},
		&store.Build{ID: mineOldBuild}, &store.Build{ID: mineNewBuild})
	must(t, st.SetTag(ctx, &store.Tag{TemplateID: mineID, Tag: "v1", BuildID: mineOldBuild, CreatedAt: now}))
	addTemplate(secretID, e.teamB.ID, false, []store.Alias{{Namespace: "team-b", Alias: "secret"}}, &store.Build{ID: secretBuild})

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	e.ctrl = control.New(control.Config{Store: st, Node: e.node, Log: quiet, EvictInterval: o.evictEvery})
	if o.evictEvery > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			e.ctrl.Run(ctx)
		}()
		t.Cleanup(func() { cancel(); <-done })
	}
	e.h = api.New(api.Config{Control: e.ctrl, Store: st, Log: quiet, Domain: o.domain, MaxBodyBytes: o.maxBody})
	srv := httptest.NewServer(e.h) // listens on 127.0.0.1
	t.Cleanup(srv.Close)
	e.url = srv.URL
	return e
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// response is an HTTP answer read in full.
type response struct {
	status int
	header http.Header
	body   []byte
}

// do sends a request with the given API key ("" for none) and JSON body (""
// for none).
func (e *env) do(method, path, key, body string) *response {
	e.t.Helper()
	return doRequest(e.t, method, e.url+path, key, body)
}

func doRequest(t testing.TB, method, url, key, body string) *response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("X-API-KEY", key)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return &response{status: res.StatusCode, header: res.Header, body: b}
}

// decode unmarshals the body into v.
func (r *response) decode(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

// wantStatus fails unless the answer has the status.
func (r *response) wantStatus(t testing.TB, status int) *response {
	t.Helper()
	if r.status != status {
		t.Fatalf("status = %d, want %d; body %s", r.status, status, r.body)
	}
	return r
}

// wantError fails unless the answer is E2B's error body with this status and
// a message containing msg.
func (r *response) wantError(t testing.TB, status int, msg string) {
	t.Helper()
	r.wantStatus(t, status)
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var body map[string]any
	r.decode(t, &body)
	if code, _ := body["code"].(float64); int(code) != status {
		t.Errorf("body code = %v, want %d; body %s", body["code"], status, r.body)
	}
	if m, _ := body["message"].(string); !strings.Contains(m, msg) {
		t.Errorf("body message = %q, want it to contain %q", m, msg)
	}
}

// sandbox is the Sandbox schema as a client reads it.
type sandbox struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	Alias              string  `json:"alias"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

// listedSandbox is ListedSandbox / SandboxDetail as a client reads it.
type listedSandbox struct {
	SandboxID   string            `json:"sandboxID"`
	TemplateID  string            `json:"templateID"`
	Alias       string            `json:"alias"`
	ClientID    string            `json:"clientID"`
	StartedAt   time.Time         `json:"startedAt"`
	EndAt       time.Time         `json:"endAt"`
	CPUCount    int               `json:"cpuCount"`
	MemoryMB    int               `json:"memoryMB"`
	DiskSizeMB  int               `json:"diskSizeMB"`
	Metadata    map[string]string `json:"metadata"`
	State       string            `json:"state"`
	EnvdVersion string            `json:"envdVersion"`
}

// create makes a sandbox through the v2 API and returns it.
func (e *env) create(key, body string) sandbox {
	e.t.Helper()
	var sb sandbox
	e.do("POST", "/v2/sandboxes", key, body).wantStatus(e.t, http.StatusCreated).decode(e.t, &sb)
	return sb
}

// get returns a sandbox's detail as the given key sees it.
func (e *env) get(key, id string) listedSandbox {
	e.t.Helper()
	var sb listedSandbox
	e.do("GET", "/sandboxes/"+id, key, "").wantStatus(e.t, http.StatusOK).decode(e.t, &sb)
	return sb
}

// insertSandboxes stores n running sandboxes of a team straight into the
// store, one second apart (newest last), with metadata from md(i).
func (e *env) insertSandboxes(t testing.TB, team *store.Team, n int, start time.Time, md func(i int) map[string]string) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range n {
		id := fmt.Sprintf("i%020d", i)
		ids[i] = id
		must(t, e.store.InsertSandbox(context.Background(), &store.Sandbox{
			ID: id, TeamID: team.ID, TemplateID: baseID, BuildID: baseBuild, Alias: "base", NodeID: e.node.ID(),
			State: store.StateRunning, Metadata: md(i), CPUCount: 2, MemoryMB: 512, DiskSizeMB: 4096,
			EnvdVersion: "0.6.5", EnvdAccessToken: "token", AllowInternet: true,
			StartedAt: start.Add(time.Duration(i) * time.Second), EndAt: start.Add(time.Hour),
		}))
	}
	return ids
}
