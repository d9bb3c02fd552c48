package control_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/sqlite"
)

// fakeNode runs nothing; it records kills. Reconcile and the evictor are
// about what the controller asks of a node, not about VMs.
type fakeNode struct {
	mu      sync.Mutex
	running map[string]*node.SandboxInfo
	kills   []string
	pauses  []string
	saved   map[string]bool // key → memory
	resumes []string        // IDs Create resumed
	// createGate, when set, holds every Create until it is closed.
	createGate chan struct{}
	// pauseHook, when set, runs first in every Pause; an error fails the
	// Pause with the sandbox left running.
	pauseHook func(ctx context.Context, id string) error
}

func (n *fakeNode) ID() string { return "node-1" }

func (n *fakeNode) Create(ctx context.Context, spec node.SandboxSpec) (*node.SandboxInfo, error) {
	n.mu.Lock()
	gate := n.createGate
	n.mu.Unlock()
	if gate != nil {
		<-gate
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if spec.Resume != "" {
		if _, ok := n.saved[spec.Resume]; !ok {
			return nil, fmt.Errorf("no saved state %q", spec.Resume)
		}
		delete(n.saved, spec.Resume)
		n.resumes = append(n.resumes, spec.ID)
	}
	info := &node.SandboxInfo{ID: spec.ID, TemplateID: spec.TemplateID, Host: "127.0.0.1", EnvdVersion: "0.6.5", StartedAt: time.Now()}
	n.running[spec.ID] = info
	return info, nil
}

func (n *fakeNode) Kill(ctx context.Context, id string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.kills = append(n.kills, id)
	if _, ok := n.running[id]; !ok {
		return node.ErrNotFound
	}
	delete(n.running, id)
	return nil
}

func (n *fakeNode) List(ctx context.Context) ([]*node.SandboxInfo, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []*node.SandboxInfo
	for _, info := range n.running {
		out = append(out, info)
	}
	return out, nil
}

func (n *fakeNode) Stats(ctx context.Context, id string) (*node.Stats, error) {
	return &node.Stats{Timestamp: time.Now()}, nil
}

func (n *fakeNode) Logs(ctx context.Context, id string) ([]node.LogLine, error) { return nil, nil }

func (n *fakeNode) run(ids ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, id := range ids {
		n.running[id] = &node.SandboxInfo{ID: id, Host: "10.11.0." + id[len(id)-1:]}
	}
}

func (n *fakeNode) killed() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := append([]string(nil), n.kills...)
	sort.Strings(out)
	return out
}

func (n *fakeNode) isRunning(id string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.running[id]
	return ok
}

type fixture struct {
	store  *sqlite.Store
	node   *fakeNode
	teamA  *store.Team
	teamB  *store.Team
	gone   chan string
	config control.Config
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "warren.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{store: st, node: &fakeNode{running: map[string]*node.SandboxInfo{}, saved: map[string]bool{}}, gone: make(chan string, 100)}
	now := time.Now().UTC()
	f.teamA = &store.Team{ID: "team-a", Name: "A", Slug: "team-a", MaxLifetime: time.Hour, CreatedAt: now}
	f.teamB = &store.Team{ID: "team-b", Name: "B", Slug: "team-b", MaxLifetime: time.Hour, CreatedAt: now}
	must(t, st.CreateTeam(ctx, f.teamA))
	must(t, st.CreateTeam(ctx, f.teamB))
	f.config = control.Config{
		Store: st, Node: f.node, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnGone: func(id string) { f.gone <- id },
	}
	return f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// sandbox stores a sandbox row of team A on node.
func (f *fixture) sandbox(t *testing.T, id, nodeID string, state store.SandboxState, end time.Time) {
	t.Helper()
	must(t, f.store.InsertSandbox(context.Background(), &store.Sandbox{
		ID: id, TeamID: f.teamA.ID, TemplateID: "t", NodeID: nodeID, State: state,
		EnvdAccessToken: "tok-" + id, StartedAt: time.Now().Add(-time.Minute), EndAt: end,
	}))
}

func (f *fixture) exists(id string) bool {
	_, err := f.store.GetSandbox(context.Background(), id)
	return err == nil
}

func TestReconcile(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	later := time.Now().Add(time.Hour)
	f.sandbox(t, "alive1", "node-1", store.StateRunning, later)     // runs: kept and routed
	f.sandbox(t, "lost2", "node-1", store.StateRunning, later)      // gone from the node: forgotten
	f.sandbox(t, "killing3", "node-1", store.StateKilling, later)   // kill half done, VM up: finished
	f.sandbox(t, "killing4", "node-1", store.StateKilling, later)   // kill half done, VM gone: row removed
	f.sandbox(t, "elsewhere5", "node-2", store.StateRunning, later) // another node's: untouched
	f.sandbox(t, "elsewhere6", "node-2", store.StateKilling, later) // another node's kill: untouched
	f.node.run("alive1", "killing3", "orphan7")                     // orphan7: unknown to the store

	c := control.New(f.config)
	if _, err := c.Lookup(ctx, "alive1"); err == nil {
		t.Fatal("a sandbox is routed before reconcile")
	}
	must(t, c.Reconcile(ctx))

	for id, want := range map[string]bool{
		"alive1": true, "lost2": false, "killing3": false, "killing4": false, "elsewhere5": true, "elsewhere6": true,
	} {
		if got := f.exists(id); got != want {
			t.Errorf("row %s exists = %v, want %v", id, got, want)
		}
	}
	if got, want := fmt.Sprint(f.node.killed()), "[killing3 killing4 orphan7]"; got != want {
		t.Errorf("node kills = %s, want %s", got, want)
	}
	if !f.node.isRunning("alive1") || f.node.isRunning("orphan7") || f.node.isRunning("killing3") {
		t.Error("node runs the wrong set after reconcile")
	}
	r, err := c.Lookup(ctx, "alive1")
	if err != nil || r.Host != "10.11.0.1" || r.EnvdToken != "tok-alive1" {
		t.Errorf("route of alive1 = %+v, %v; want host 10.11.0.1 and its token", r, err)
	}
	// Reconcile is idempotent.
	must(t, c.Reconcile(ctx))
	if got := len(f.node.killed()); got != 3 {
		t.Errorf("a second reconcile killed again: %v", f.node.killed())
	}
}

func TestEvictorKillsExpiredSandboxes(t *testing.T) {
	f := newFixture(t)
	f.config.EvictInterval = 10 * time.Millisecond
	now := time.Now()
	f.sandbox(t, "expired1", "node-1", store.StateRunning, now.Add(-time.Second))
	f.sandbox(t, "soon2", "node-1", store.StateRunning, now.Add(300*time.Millisecond))
	f.sandbox(t, "later3", "node-1", store.StateRunning, now.Add(time.Hour))
	f.sandbox(t, "othernode4", "node-2", store.StateRunning, now.Add(-time.Second))
	f.node.run("expired1", "soon2", "later3")

	c := control.New(f.config)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	waitGone := func(id string, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(within)
		for f.exists(id) || f.node.isRunning(id) {
			if time.Now().After(deadline) {
				t.Fatalf("%s not evicted within %s", id, within)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitGone("expired1", 2*time.Second)
	waitGone("soon2", 2*time.Second)
	if _, err := c.Lookup(context.Background(), "soon2"); err == nil {
		t.Error("an evicted sandbox is still routed")
	}
	gone := map[string]bool{}
	for len(gone) < 2 {
		select {
		case id := <-f.gone:
			gone[id] = true
		case <-time.After(2 * time.Second):
			t.Fatalf("OnGone saw only %v", gone)
		}
	}
	if !gone["expired1"] || !gone["soon2"] {
		t.Errorf("OnGone saw %v, want expired1 and soon2", gone)
	}
	time.Sleep(50 * time.Millisecond) // several more evictor rounds
	if !f.exists("later3") || !f.node.isRunning("later3") {
		t.Error("a sandbox before its deadline was evicted")
	}
	if !f.exists("othernode4") {
		t.Error("the evictor touched another node's sandbox")
	}
	if got := fmt.Sprint(f.node.killed()); got != "[expired1 soon2]" {
		t.Errorf("node kills = %s, want each expired sandbox once", got)
	}
}

func TestKillIsOnceAndOtherTeamsGetNotFound(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.sandbox(t, "sb1", "node-1", store.StateRunning, time.Now().Add(time.Hour))
	f.node.run("sb1")
	c := control.New(f.config)

	wantKind := func(err error, kind control.Kind, what string) {
		t.Helper()
		var ce *control.Error
		if !errors.As(err, &ce) || ce.Kind != kind {
			t.Errorf("%s: err = %v, want kind %d", what, err, kind)
		}
	}
	wantKind(c.Kill(ctx, f.teamB, "sb1"), control.NotFound, "kill by another team")
	_, err := c.Get(ctx, f.teamB, "sb1")
	wantKind(err, control.NotFound, "get by another team")
	wantKind(c.SetTimeout(ctx, f.teamB, "sb1", time.Minute), control.NotFound, "timeout by another team")
	if !f.node.isRunning("sb1") {
		t.Fatal("another team's kill reached the node")
	}
	must(t, c.Kill(ctx, f.teamA, "sb1"))
	wantKind(c.Kill(ctx, f.teamA, "sb1"), control.NotFound, "second kill")
	if got := fmt.Sprint(f.node.killed()); got != "[sb1]" {
		t.Errorf("node kills = %s, want one", got)
	}
}

func TestResolveTemplate(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	now := time.Now().UTC().Add(-time.Hour)
	addTemplate := func(id, team string, public bool, aliases []store.Alias, statuses ...store.BuildStatus) {
		must(t, f.store.CreateTemplate(ctx, &store.Template{ID: id, TeamID: team, Public: public, CreatedAt: now, UpdatedAt: now}))
		for i, st := range statuses {
			at := now.Add(time.Duration(i) * time.Minute)
			must(t, f.store.CreateBuild(ctx, &store.Build{
				ID: fmt.Sprintf("%s-b%d", id, i+1), TemplateID: id, Status: st, CPUCount: 1, MemoryMB: 256,
				CreatedAt: at, UpdatedAt: at,
			}))
		}
		for _, a := range aliases {
			a.TemplateID = id
			must(t, f.store.SetAlias(ctx, &a))
		}
	}
	// base: public, global alias, owned by team B; builds b1 ready, b2
	// ready, b3 failed (newest). Tag v1 → b1.
	addTemplate("basetmpl", f.teamB.ID, true, []store.Alias{{Alias: "base"}}, store.BuildReady, store.BuildReady, store.BuildError)
	must(t, f.store.SetTag(ctx, &store.Tag{TemplateID: "basetmpl", Tag: "v1", BuildID: "basetmpl-b1", CreatedAt: now}))
	must(t, f.store.SetTag(ctx, &store.Tag{TemplateID: "basetmpl", Tag: "broken", BuildID: "basetmpl-b3", CreatedAt: now}))
	addTemplate("minetmpl", f.teamA.ID, false, []store.Alias{{Namespace: "team-a", Alias: "mine"}}, store.BuildReady)
	// Team A's own "base" shadows the global one for team A only.
	addTemplate("ownbase", f.teamA.ID, false, []store.Alias{{Namespace: "team-a", Alias: "base"}}, store.BuildReady)
	addTemplate("secrettmpl", f.teamB.ID, false, []store.Alias{{Namespace: "team-b", Alias: "secret"}}, store.BuildReady)
	addTemplate("failedtmpl", f.teamA.ID, false, []store.Alias{{Namespace: "team-a", Alias: "failed"}}, store.BuildError)

	tests := []struct {
		name, ref string
		team      *store.Team
		// want: template/build/alias, or an error kind and message
		template, build, alias string
		kind                   control.Kind
		msg                    string
	}{
		{"global alias", "base", f.teamB, "basetmpl", "basetmpl-b2", "base", 0, ""},
		{"latest successful build, not the newest", "base:default", f.teamB, "basetmpl", "basetmpl-b2", "base", 0, ""},
		{"tag", "base:v1", f.teamB, "basetmpl", "basetmpl-b1", "base", 0, ""},
		{"tag of a failed build", "base:broken", f.teamB, "", "", "", control.NotFound, "template 'base:broken' has no successful build"},
		{"case and space are forgiven", "  Base:V1 ", f.teamB, "basetmpl", "basetmpl-b1", "base", 0, ""},
		{"own namespace first", "base", f.teamA, "ownbase", "ownbase-b1", "base", 0, ""},
		{"global alias by namespace-less name of another team", "base", f.teamB, "basetmpl", "basetmpl-b2", "base", 0, ""},
		{"namespaced alias", "team-a/mine", f.teamA, "minetmpl", "minetmpl-b1", "mine", 0, ""},
		{"bare alias in own namespace", "mine", f.teamA, "minetmpl", "minetmpl-b1", "mine", 0, ""},
		{"template ID", "minetmpl", f.teamA, "minetmpl", "minetmpl-b1", "", 0, ""},
		{"public template ID of another team", "basetmpl:v1", f.teamA, "basetmpl", "basetmpl-b1", "", 0, ""},
		{"unknown tag", "base:nope", f.teamB, "", "", "", control.NotFound, "tag 'nope' does not exist for template 'base'"},
		{"unknown name", "nosuch", f.teamA, "", "", "", control.NotFound, "template 'nosuch' not found"},
		{"namespaced alias does not fall back to an ID", "team-a/minetmpl", f.teamA, "", "", "", control.NotFound, "template 'team-a/minetmpl' not found"},
		{"another team's private alias", "team-b/secret", f.teamA, "", "", "", control.NotFound, "template 'team-b/secret' not found"},
		{"another team's private ID", "secrettmpl", f.teamA, "", "", "", control.NotFound, "template 'secrettmpl' not found"},
		{"another team's namespace is not searched for bare names", "secret", f.teamA, "", "", "", control.NotFound, "template 'secret' not found"},
		{"only failed builds", "failed", f.teamA, "", "", "", control.NotFound, "has no successful build"},
		{"empty", "", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"space inside", "my template", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"two slashes", "a/b/c", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"empty namespace", "/base", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"empty alias", "team-a/", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"bad tag", "base:v 1", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
		{"bad characters", "base!", f.teamA, "", "", "", control.Invalid, "Invalid template reference"},
	}
	c := control.New(f.config)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := c.ResolveTemplate(ctx, tt.team, tt.ref)
			if tt.kind != 0 {
				var ce *control.Error
				if !errors.As(err, &ce) || ce.Kind != tt.kind || !strings.Contains(ce.Message, tt.msg) {
					t.Fatalf("ResolveTemplate(%q) = %v, %v; want kind %d with %q", tt.ref, r, err, tt.kind, tt.msg)
				}
				return
			}
			if err != nil {
				t.Fatalf("ResolveTemplate(%q): %v", tt.ref, err)
			}
			if r.Template.ID != tt.template || r.Build.ID != tt.build || r.Alias != tt.alias {
				t.Errorf("ResolveTemplate(%q) = %s/%s alias %q; want %s/%s alias %q", tt.ref, r.Template.ID, r.Build.ID, r.Alias, tt.template, tt.build, tt.alias)
			}
		})
	}
}

// flakyStore fails the first UpdateSandbox calls, as a busy or briefly
// unreachable database would.
type flakyStore struct {
	store.Store
	mu       sync.Mutex
	failures int
}

func (s *flakyStore) UpdateSandbox(ctx context.Context, id string, fn func(*store.Sandbox) error) (*store.Sandbox, error) {
	s.mu.Lock()
	fail := s.failures > 0
	if fail {
		s.failures--
	}
	s.mu.Unlock()
	if fail {
		return nil, errors.New("database is locked")
	}
	return s.Store.UpdateSandbox(ctx, id, fn)
}

func TestEvictorSurvivesStoreErrors(t *testing.T) {
	f := newFixture(t)
	f.config.EvictInterval = 10 * time.Millisecond
	f.config.Store = &flakyStore{Store: f.store, failures: 2}
	f.sandbox(t, "expired1", "node-1", store.StateRunning, time.Now().Add(-time.Second))
	f.node.run("expired1")

	c := control.New(f.config)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(2 * time.Second)
	for f.exists("expired1") {
		if time.Now().After(deadline) {
			t.Fatal("expired sandbox not evicted after the store recovered")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A running sandbox past its deadline is gone for clients at once, before the
// evictor (not running here) kills it: no Get, no timeout change, no route.
func TestExpiredSandboxIsGoneBeforeEviction(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.sandbox(t, "sb1", "node-1", store.StateRunning, time.Now().Add(-time.Millisecond))
	f.node.run("sb1")
	c := control.New(f.config)
	must(t, c.Reconcile(ctx)) // routes sb1
	var ce *control.Error
	if _, err := c.Get(ctx, f.teamA, "sb1"); !errors.As(err, &ce) || ce.Kind != control.NotFound {
		t.Errorf("Get after the deadline: %v, want NotFound", err)
	}
	if err := c.SetTimeout(ctx, f.teamA, "sb1", time.Minute); !errors.As(err, &ce) || ce.Kind != control.NotFound {
		t.Errorf("SetTimeout after the deadline: %v, want NotFound", err)
	}
	if _, err := c.Lookup(ctx, "sb1"); err != control.ErrNoRoute {
		t.Errorf("Lookup after the deadline: %v, want ErrNoRoute", err)
	}
	if !f.node.isRunning("sb1") {
		t.Error("nothing but the evictor (or a kill) may kill it")
	}
	// A kill answers as Get does (the client's kill() is false), and kills it.
	if err := c.Kill(ctx, f.teamA, "sb1"); !errors.As(err, &ce) || ce.Kind != control.NotFound {
		t.Errorf("Kill after the deadline: %v, want NotFound", err)
	}
	if f.node.isRunning("sb1") || f.exists("sb1") {
		t.Errorf("Kill after the deadline left the sandbox: running %v, stored %v", f.node.isRunning("sb1"), f.exists("sb1"))
	}
}

func TestBootstrap(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	const fixed = "e2b_0123456789abcdef0123456789abcdef01234567"
	team, key, err := control.Bootstrap(ctx, f.store, control.TeamLimits{MaxSandboxes: 3, MaxLifetime: time.Hour}, fixed)
	must(t, err)
	if key != fixed || team.ID != control.DefaultTeamID || team.MaxSandboxes != 3 {
		t.Fatalf("first bootstrap: team %+v key %q", team, key)
	}
	if k, err := f.store.APIKeyByHash(ctx, apikey.Hash(fixed)); err != nil || k.TeamID != team.ID {
		t.Fatalf("the fixed key is not stored for the team: %v, %v", k, err)
	}
	// A restart with other flags: no new key, the limits follow the flags.
	team, key, err = control.Bootstrap(ctx, f.store, control.TeamLimits{MaxSandboxes: 9, MaxLifetime: 2 * time.Hour}, "")
	must(t, err)
	stored, err := f.store.GetTeam(ctx, control.DefaultTeamID)
	must(t, err)
	if key != "" || stored.MaxSandboxes != 9 || stored.MaxLifetime != 2*time.Hour || team.MaxSandboxes != 9 {
		t.Fatalf("second bootstrap: key %q, stored team %+v", key, stored)
	}
	if _, _, err := control.Bootstrap(ctx, f.store, control.TeamLimits{}, "not-a-key"); err == nil {
		t.Fatal("a malformed fixed key was accepted")
	}
}

// Pause saves a running sandbox under a key and stops it; Create with
// Resume = key brings it back and consumes the key.
func (n *fakeNode) Pause(ctx context.Context, id string, memory bool) (*node.PausedSandbox, error) {
	if n.pauseHook != nil {
		if err := n.pauseHook(ctx, id); err != nil {
			return nil, err
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.running[id]; !ok {
		return nil, node.ErrNotFound
	}
	delete(n.running, id)
	key := "paused/" + id
	n.saved[key] = memory
	n.pauses = append(n.pauses, fmt.Sprintf("%s memory=%v", id, memory))
	return &node.PausedSandbox{Key: key, Memory: memory, Bytes: 1 << 20}, nil
}

func (n *fakeNode) DeletePaused(ctx context.Context, key string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.saved, key)
	return nil
}

func (n *fakeNode) Paused(ctx context.Context, id string) (*node.PausedSandbox, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	key := "paused/" + id
	memory, ok := n.saved[key]
	if !ok {
		return nil, node.ErrNotFound
	}
	return &node.PausedSandbox{Key: key, Memory: memory, Bytes: 1 << 20}, nil
}

func (n *fakeNode) Snapshot(ctx context.Context, id, key string) (string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.running[id]; !ok {
		return "", node.ErrNotFound
	}
	return "artifact:" + key, nil
}

func (n *fakeNode) DeleteSnapshot(ctx context.Context, key string) error { return nil }

func (n *fakeNode) paused() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.pauses...)
}

func (n *fakeNode) savedKeys() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Sorted(maps.Keys(n.saved))
}
