package api_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
)

// detail is the part of SandboxDetail the pause tests read.
type detail struct {
	listedSandbox
	Lifecycle struct {
		AutoResume bool   `json:"autoResume"`
		OnTimeout  string `json:"onTimeout"`
	} `json:"lifecycle"`
}

func (e *env) detail(key, id string) detail {
	e.t.Helper()
	var d detail
	e.do("GET", "/sandboxes/"+id, key, "").wantStatus(e.t, http.StatusOK).decode(e.t, &d)
	return d
}

// pause pauses a sandbox through the API.
func (e *env) pause(id, body string) {
	e.t.Helper()
	res := e.do("POST", "/sandboxes/"+id+"/pause", keyA, body).wantStatus(e.t, http.StatusNoContent)
	if len(res.body) != 0 {
		e.t.Errorf("pause 204 has a body: %q", res.body)
	}
}

func TestPauseThenConnectResumes(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"base","metadata":{"k":"v"},"envVars":{"A":"1"},"timeout":60}`)
	id := sb.SandboxID
	e.pause(id, `{}`)

	if e.node.isRunning(id) {
		t.Error("the node still runs the paused sandbox")
	}
	if got := fmt.Sprint(e.node.pauses); got != fmt.Sprintf("[{%s true}]", id) {
		t.Errorf("node pauses = %s, want one with memory", got)
	}
	d := e.detail(keyA, id)
	if d.State != "paused" || d.Metadata["k"] != "v" || d.TemplateID != baseID {
		t.Errorf("paused detail = %+v", d)
	}
	var list []listedSandbox
	e.do("GET", "/v2/sandboxes?state=paused", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 1 || list[0].SandboxID != id || list[0].State != "paused" {
		t.Errorf("state=paused list = %+v", list)
	}
	e.do("GET", "/v2/sandboxes?state=running", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 0 {
		t.Errorf("state=running lists the paused sandbox: %+v", list)
	}
	e.do("GET", "/sandboxes", keyA, "").wantStatus(t, 200).decode(t, &list)
	if len(list) != 0 {
		t.Errorf("the v1 list (running only) shows the paused sandbox: %+v", list)
	}

	// The SDK's pause() reads 409 as "already paused" → false.
	res := e.do("POST", "/sandboxes/"+id+"/pause", keyA, `{"memory":true}`)
	want := fmt.Sprintf(`{"code":409,"message":"Sandbox \"%s\" is already paused"}`, id)
	if res.status != 409 || string(res.body) != want {
		t.Errorf("second pause = %d %s, want 409 %s", res.status, res.body, want)
	}
	e.do("POST", "/sandboxes/"+id+"/pause", keyB, ``).wantError(t, 404, "doesn't exist or you don't have access")
	e.do("POST", "/sandboxes/nosuch/pause", keyA, ``).wantError(t, 404, `Sandbox "nosuch" doesn't exist`)
	e.do("POST", "/sandboxes/"+id+"/timeout", keyA, `{"timeout":30}`).wantError(t, 409, "is paused")
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyB, `{}`).wantError(t, 404, "doesn't exist")

	// Connect resumes it: 201, same ID, token, template and env.
	var got sandbox
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{"timeout":120}`).wantStatus(t, http.StatusCreated).decode(t, &got)
	if got.SandboxID != id || got.EnvdAccessToken != sb.EnvdAccessToken || got.TemplateID != baseID {
		t.Errorf("resumed = %+v, want the paused sandbox %+v", got, sb)
	}
	spec := e.node.lastSpec()
	if spec.ID != id || spec.Resume == "" || spec.AccessToken != sb.EnvdAccessToken || spec.EnvVars["A"] != "1" ||
		spec.EnvVars["E2B_SANDBOX_ID"] != id || spec.TemplateID != baseID || spec.BuildID != baseBuild {
		t.Errorf("resume spec = %+v", spec)
	}
	if keys := e.node.savedKeys(); len(keys) != 0 {
		t.Errorf("saved state left after the resume: %v", keys)
	}
	d = e.detail(keyA, id)
	if d.State != "running" || !e.node.isRunning(id) {
		t.Errorf("after resume: state %q, node running %v", d.State, e.node.isRunning(id))
	}
	approx(t, "endAt after resume", d.EndAt, time.Now().Add(120*time.Second))
	approx(t, "startedAt after resume", d.StartedAt, time.Now())

	// Running again: connect only extends (200).
	e.do("POST", "/sandboxes/"+id+"/connect", keyA, `{"timeout":10}`).wantStatus(t, http.StatusOK)
	if n := e.node.resumeCount(id); n != 1 {
		t.Errorf("node resumes = %d, want 1", n)
	}

	// A second cycle, disk only: the node is asked for no memory, and the
	// v1 connect resumes it all the same (the node cold boots).
	e.pause(id, `{"memory":false}`)
	if p := e.node.pauses[1]; p.memory {
		t.Errorf("second pause = %+v, want memory false", p)
	}
	e.do("POST", "/sandboxes/"+id+"/connect", keyA, `{"timeout":60}`).wantStatus(t, http.StatusCreated)
	if n := e.node.resumeCount(id); n != 2 {
		t.Errorf("node resumes = %d, want 2", n)
	}

	// A saved state the node cannot vouch for (the host restarted before it
	// was synced): 500 saying so, and the sandbox stays paused.
	e.pause(id, `{"memory":true}`)
	e.node.set(func(n *fakeNode) { n.createErr = fmt.Errorf("node: create %s: %w", id, node.ErrUnsynced) })
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, `{}`).wantError(t, 500, "cannot be resumed: the paused state did not reach the disk")
	if d := e.detail(keyA, id); d.State != "paused" {
		t.Errorf("after a refused resume: state %q, want paused", d.State)
	}
}

// N clients connect to one paused sandbox at once: the node resumes it once,
// and no answer comes before the resumed sandbox is ready.
func TestConcurrentConnectsShareOneResume(t *testing.T) {
	e := newEnv(t, envOptions{})
	id := e.create(keyA, `{"templateID":"base"}`).SandboxID
	e.pause(id, ``)

	gate, started := make(chan struct{}), make(chan struct{}, 10)
	e.node.set(func(n *fakeNode) { n.createGate, n.createStarted = gate, started })
	const clients = 8
	answers := make(chan *response, clients)
	for i := range clients {
		go func() {
			path := "/v2/sandboxes/" + id + "/connect"
			if i%2 == 1 {
				path = "/sandboxes/" + id + "/connect"
			}
			answers <- doRequest(t, "POST", e.url+path, keyA, `{"timeout":100}`)
		}()
	}
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("no resume reached the node")
	}
	select {
	case res := <-answers:
		t.Fatalf("a connect answered %d %s before the resume finished", res.status, res.body)
	case <-time.After(300 * time.Millisecond):
	}
	close(gate)
	created := 0
	for range clients {
		// 201 for the connects that waited for the resume; one that a slow
		// goroutine sent after it finds the sandbox running: 200.
		switch res := <-answers; res.status {
		case http.StatusCreated:
			created++
		case http.StatusOK:
		default:
			t.Errorf("connect = %d %s, want 201 (or 200)", res.status, res.body)
		}
	}
	if created == 0 {
		t.Error("no connect answered 201")
	}
	if n := e.node.resumeCount(id); n != 1 {
		t.Errorf("node resumes = %d, want exactly 1", n)
	}
	if len(started) != 0 {
		t.Errorf("%d more resumes reached the node", len(started))
	}
}

// A connect during a pause waits for it, then resumes.
func TestConnectWaitsForPauseInProgress(t *testing.T) {
	e := newEnv(t, envOptions{})
	id := e.create(keyA, `{"templateID":"base"}`).SandboxID
	gate, started := make(chan struct{}), make(chan struct{}, 1)
	e.node.set(func(n *fakeNode) { n.pauseGate, n.pauseStarted = gate, started })
	paused := make(chan *response, 1)
	go func() { paused <- doRequest(t, "POST", e.url+"/sandboxes/"+id+"/pause", keyA, ``) }()
	<-started

	if d := e.detail(keyA, id); d.State != "paused" {
		t.Errorf("state while pausing = %q, want paused", d.State)
	}
	e.do("POST", "/sandboxes/"+id+"/pause", keyA, ``).wantError(t, 409, "is already being paused")
	e.do("POST", "/sandboxes/"+id+"/timeout", keyA, `{"timeout":30}`).wantError(t, 409, "is being paused")
	connected := make(chan *response, 1)
	go func() { connected <- doRequest(t, "POST", e.url+"/v2/sandboxes/"+id+"/connect", keyA, ``) }()
	select {
	case res := <-connected:
		t.Fatalf("connect answered %d %s during the pause", res.status, res.body)
	case <-time.After(200 * time.Millisecond):
	}
	close(gate)
	(<-paused).wantStatus(t, http.StatusNoContent)
	(<-connected).wantStatus(t, http.StatusCreated)
	if n := e.node.resumeCount(id); n != 1 || !e.node.isRunning(id) {
		t.Errorf("resumes = %d, running = %v; want 1, true", n, e.node.isRunning(id))
	}
}

func TestDeprecatedResume(t *testing.T) {
	e := newEnv(t, envOptions{})
	id := e.create(keyA, `{"templateID":"base"}`).SandboxID
	e.do("POST", "/sandboxes/"+id+"/resume", keyA, `{"timeout":15}`).wantError(t, 409, fmt.Sprintf("Sandbox %q is already running", id))
	e.pause(id, ``)
	var got sandbox
	e.do("POST", "/sandboxes/"+id+"/resume", keyA, `{"timeout":60,"autoPause":true}`).wantStatus(t, http.StatusCreated).decode(t, &got)
	if got.SandboxID != id || !e.node.isRunning(id) {
		t.Errorf("resume = %+v, running %v", got, e.node.isRunning(id))
	}
	approx(t, "endAt after resume", e.get(keyA, id).EndAt, time.Now().Add(60*time.Second))
	e.do("POST", "/sandboxes/nosuch/resume", keyA, `{}`).wantError(t, 404, "doesn't exist")
}

func TestKillPausedSandboxRemovesSavedState(t *testing.T) {
	e := newEnv(t, envOptions{})
	id := e.create(keyA, `{"templateID":"base"}`).SandboxID
	e.pause(id, ``)
	saved := e.node.savedKeys()
	if len(saved) != 1 {
		t.Fatalf("saved = %v, want one key", saved)
	}
	e.do("DELETE", "/sandboxes/"+id, keyB, "").wantError(t, 404, "doesn't exist")
	e.do("DELETE", "/sandboxes/"+id, keyA, "").wantStatus(t, http.StatusNoContent)
	if keys := e.node.savedKeys(); len(keys) != 0 || fmt.Sprint(e.node.deletedPaused) != fmt.Sprint(saved) {
		t.Errorf("after kill: saved %v, deleted %v; want %v deleted", keys, e.node.deletedPaused, saved)
	}
	e.do("GET", "/sandboxes/"+id, keyA, "").wantError(t, 404, "doesn't exist")
	e.do("DELETE", "/sandboxes/"+id, keyA, "").wantError(t, 404, "doesn't exist")
	e.do("POST", "/v2/sandboxes/"+id+"/connect", keyA, ``).wantError(t, 404, "doesn't exist")
}

// At its deadline an autoPause sandbox is paused, with memory unless
// autoPauseMemory is false, and shows lifecycle.onTimeout "pause".
func TestAutoPauseAtDeadline(t *testing.T) {
	e := newEnv(t, envOptions{evictEvery: 10 * time.Millisecond})
	// Each is looked at right after its create: on a loaded host a second
	// can pass before the next create, and the one before is then gone.
	killed := e.create(keyA, `{"templateID":"base","timeout":1}`).SandboxID
	if d := e.detail(keyA, killed); d.Lifecycle.OnTimeout != "kill" || d.Lifecycle.AutoResume {
		t.Errorf("lifecycle = %+v, want onTimeout kill", d.Lifecycle)
	}
	withMemory := e.create(keyA, `{"templateID":"base","timeout":1,"autoPause":true,"autoResume":{"enabled":true}}`).SandboxID
	if d := e.detail(keyA, withMemory); d.Lifecycle.OnTimeout != "pause" || !d.Lifecycle.AutoResume {
		t.Errorf("lifecycle = %+v, want onTimeout pause, autoResume", d.Lifecycle)
	}
	diskOnly := e.create(keyA, `{"templateID":"base","timeout":1,"autoPause":true,"autoPauseMemory":false}`).SandboxID
	deadline := time.Now().Add(5 * time.Second)
	for {
		if e.node.killCount(killed) == 1 && len(e.node.savedKeys()) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the deadline: kills %d, saved %v", e.node.killCount(killed), e.node.savedKeys())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for id, memory := range map[string]bool{withMemory: true, diskOnly: false} {
		if d := e.detail(keyA, id); d.State != "paused" {
			t.Errorf("%s state = %q, want paused", id, d.State)
		}
		if e.node.killCount(id) != 0 {
			t.Errorf("%s was killed, not paused", id)
		}
		found := false
		for _, p := range e.node.pauses {
			if p.id == id {
				found = p.memory == memory
			}
		}
		if !found {
			t.Errorf("%s: pauses %v, want one with memory %v", id, e.node.pauses, memory)
		}
	}
	// A paused sandbox has no deadline: it stays paused.
	time.Sleep(50 * time.Millisecond)
	if d := e.detail(keyA, withMemory); d.State != "paused" {
		t.Errorf("state later = %q", d.State)
	}
	// connect brings it back with a new deadline.
	e.do("POST", "/v2/sandboxes/"+withMemory+"/connect", keyA, `{"timeout":60}`).wantStatus(t, http.StatusCreated)
	approx(t, "endAt after resume", e.get(keyA, withMemory).EndAt, time.Now().Add(60*time.Second))
}

// snapshotInfo is SnapshotInfo as the SDK reads it.
type snapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

func (e *env) listSnapshots(query string) []snapshotInfo {
	e.t.Helper()
	var out []snapshotInfo
	e.do("GET", "/snapshots"+query, keyA, "").wantStatus(e.t, http.StatusOK).decode(e.t, &out)
	return out
}

func TestSnapshots(t *testing.T) {
	e := newEnv(t, envOptions{})
	src := e.create(keyA, `{"templateID":"base"}`).SandboxID
	other := e.create(keyA, `{"templateID":"base"}`).SandboxID

	// Unnamed: the ID is "<templateID>:default", no names.
	var plain snapshotInfo
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyA, `{}`).wantStatus(t, http.StatusCreated).decode(t, &plain)
	tid, tag, _ := strings.Cut(plain.SnapshotID, ":")
	if len(tid) != 20 || tag != "default" || len(plain.Names) != 0 {
		t.Fatalf("snapshot = %+v, want <20-char ID>:default and no names", plain)
	}
	keys := e.node.snapshotKeys()
	if len(keys) != 1 || !strings.HasPrefix(keys[0], "snapshots/"+tid+"/") {
		t.Fatalf("node snapshot keys = %v, want snapshots/%s/<build>", keys, tid)
	}
	if !e.node.isRunning(src) || e.detail(keyA, src).State != "running" {
		t.Error("the source sandbox stopped running")
	}

	// Named: in the team's namespace.
	var named snapshotInfo
	e.do("POST", "/sandboxes/"+other+"/snapshots", keyA, `{"name":"My-Snap"}`).wantStatus(t, http.StatusCreated).decode(t, &named)
	if named.SnapshotID != "team-a/my-snap:default" || fmt.Sprint(named.Names) != "[team-a/my-snap:default]" {
		t.Errorf("named snapshot = %+v", named)
	}

	// Each works as templateID in create and starts from the copy.
	for _, ref := range []string{plain.SnapshotID, named.SnapshotID, "my-snap", "team-a/my-snap"} {
		var sb sandbox
		e.do("POST", "/v2/sandboxes", keyA, fmt.Sprintf(`{"templateID":%q}`, ref)).wantStatus(t, http.StatusCreated).decode(t, &sb)
		if spec := e.node.lastSpec(); !strings.HasPrefix(spec.Artifact, "artifact:snapshots/") || spec.TemplateID != sb.TemplateID {
			t.Errorf("create from %q: spec %+v", ref, spec)
		}
		e.do("DELETE", "/sandboxes/"+sb.SandboxID, keyA, "").wantStatus(t, http.StatusNoContent)
	}
	e.do("POST", "/v2/sandboxes", keyB, fmt.Sprintf(`{"templateID":%q}`, plain.SnapshotID)).wantError(t, 404, "not found")

	// Listing: all, by source sandbox, by name, paged; never in template lists.
	if got := e.listSnapshots(""); len(got) != 2 || got[0].SnapshotID != plain.SnapshotID || got[1].SnapshotID != named.SnapshotID {
		t.Errorf("snapshots = %+v", got)
	}
	if got := e.listSnapshots("?sandboxID=" + src); len(got) != 1 || got[0].SnapshotID != plain.SnapshotID {
		t.Errorf("snapshots of %s = %+v", src, got)
	}
	if got := e.listSnapshots("?sandboxID=nosuch"); len(got) != 0 {
		t.Errorf("snapshots of an unknown sandbox = %+v", got)
	}
	for _, name := range []string{"my-snap", "team-a/my-snap:default", named.SnapshotID} {
		if got := e.listSnapshots("?name=" + url.QueryEscape(name)); len(got) != 1 || got[0].SnapshotID != named.SnapshotID {
			t.Errorf("snapshots named %q = %+v", name, got)
		}
	}
	if got := e.listSnapshots("?name=my-snap-does-not-exist"); len(got) != 0 {
		t.Errorf("snapshots of an unknown name = %+v", got)
	}
	res := e.do("GET", "/snapshots?limit=1", keyA, "").wantStatus(t, http.StatusOK)
	next := res.header.Get("X-Next-Token")
	if next == "" {
		t.Fatal("first page of one has no X-Next-Token")
	}
	res = e.do("GET", "/snapshots?limit=1&nextToken="+next, keyA, "").wantStatus(t, http.StatusOK)
	var page []snapshotInfo
	res.decode(t, &page)
	if len(page) != 1 || page[0].SnapshotID != named.SnapshotID || res.header.Get("X-Next-Token") != "" {
		t.Errorf("second page = %+v (next %q)", page, res.header.Get("X-Next-Token"))
	}
	var bTeam []snapshotInfo
	e.do("GET", "/snapshots", keyB, "").wantStatus(t, 200).decode(t, &bTeam)
	if len(bTeam) != 0 {
		t.Errorf("team B sees team A's snapshots: %+v", bTeam)
	}
	var templates []struct {
		TemplateID string `json:"templateID"`
	}
	e.do("GET", "/v2/templates", keyA, "").wantStatus(t, 200).decode(t, &templates)
	if len(templates) != 1 || templates[0].TemplateID != mineID {
		t.Errorf("template list = %+v, want only the built template", templates)
	}

	// The same name again: a new build of the same snapshot.
	var again snapshotInfo
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyA, `{"name":"my-snap"}`).wantStatus(t, http.StatusCreated).decode(t, &again)
	if again.SnapshotID != named.SnapshotID || len(e.listSnapshots("")) != 2 || len(e.node.snapshotKeys()) != 3 {
		t.Errorf("snapshot under a taken name = %+v; snapshots %v", again, e.node.snapshotKeys())
	}

	// Errors.
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyA, `{"name":"mine"}`).wantError(t, 409, "not a snapshot")
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyA, `{"name":"bad name"}`).wantError(t, 400, "Invalid snapshot name")
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyA, `{"name":"team-b/x"}`).wantError(t, 400, "namespace")
	e.do("POST", "/sandboxes/nosuch/snapshots", keyA, `{}`).wantError(t, 404, "doesn't exist")
	e.do("POST", "/sandboxes/"+src+"/snapshots", keyB, `{}`).wantError(t, 404, "doesn't exist")
	e.pause(other, ``)
	e.do("POST", "/sandboxes/"+other+"/snapshots", keyA, `{}`).wantError(t, 409, "is paused")

	// Delete (the SDK's deleteSnapshot passes the snapshotID, path-encoded):
	// 409 while a sandbox runs from it, then 204 and the copies go, then 404.
	from := e.create(keyA, fmt.Sprintf(`{"templateID":%q}`, named.SnapshotID)).SandboxID
	path := "/templates/" + url.PathEscape(named.SnapshotID)
	e.do("DELETE", path, keyB, "").wantError(t, 404, "not found")
	e.do("DELETE", path, keyA, "").wantError(t, 409, "is used by 1 running or paused sandbox")
	e.pause(from, ``)
	e.do("DELETE", path, keyA, "").wantError(t, 409, "is used by 1 running or paused sandbox")
	e.do("DELETE", "/sandboxes/"+from, keyA, "").wantStatus(t, http.StatusNoContent)
	e.do("DELETE", path, keyA, "").wantStatus(t, http.StatusNoContent)
	if len(e.node.deletedSnapshots) != 2 {
		t.Errorf("deleted snapshot copies = %v, want both builds'", e.node.deletedSnapshots)
	}
	e.do("DELETE", path, keyA, "").wantError(t, 404, "not found")
	e.do("DELETE", "/templates/"+url.PathEscape(plain.SnapshotID), keyA, "").wantStatus(t, http.StatusNoContent)
	if got := e.listSnapshots(""); len(got) != 0 {
		t.Errorf("snapshots after delete = %+v", got)
	}
	if keys := e.node.snapshotKeys(); len(keys) != 0 {
		t.Errorf("snapshot copies left: %v", keys)
	}
}

func TestDeleteTemplateInUse(t *testing.T) {
	e := newEnv(t, envOptions{})
	sb := e.create(keyA, `{"templateID":"mine"}`).SandboxID
	e.do("DELETE", "/templates/mine", keyA, "").wantError(t, 409, fmt.Sprintf("Template %q is used by 1 running or paused sandbox", mineID))
	e.do("DELETE", "/templates/"+baseID, keyA, "").wantError(t, 404, "not found") // team B's, public
	e.do("DELETE", "/sandboxes/"+sb, keyA, "").wantStatus(t, http.StatusNoContent)
	e.do("DELETE", "/templates/team-a%2Fmine", keyA, "").wantStatus(t, http.StatusNoContent)
	e.do("GET", "/templates/"+mineID, keyA, "").wantError(t, 404, "not found")
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"mine"}`).wantError(t, 404, "not found")
}

// forkResult is SandboxForkResult as the SDK reads it.
type forkResult struct {
	Sandbox *sandbox `json:"sandbox"`
	Error   *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func TestFork(t *testing.T) {
	e := newEnv(t, envOptions{})
	src := e.create(keyA, `{"templateID":"base","metadata":{"k":"v"},"envVars":{"A":"1"},"timeout":600}`)
	before := e.detail(keyA, src.SandboxID)

	var results []forkResult
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, `{"count":3,"timeout":60}`).wantStatus(t, http.StatusCreated).decode(t, &results)
	if len(results) != 3 {
		t.Fatalf("fork results = %+v, want 3", results)
	}
	ids := map[string]bool{src.SandboxID: true}
	for _, r := range results {
		if r.Sandbox == nil || r.Error != nil {
			t.Fatalf("fork result = %+v", r)
		}
		if ids[r.Sandbox.SandboxID] || r.Sandbox.TemplateID != baseID || r.Sandbox.EnvdAccessToken == src.EnvdAccessToken {
			t.Errorf("fork = %+v: want a new ID and token of the same template", r.Sandbox)
		}
		ids[r.Sandbox.SandboxID] = true
		d := e.detail(keyA, r.Sandbox.SandboxID)
		if d.State != "running" || d.Metadata["k"] != "v" {
			t.Errorf("fork detail = %+v", d)
		}
		approx(t, "fork endAt", d.EndAt, time.Now().Add(60*time.Second))
	}
	after := e.detail(keyA, src.SandboxID)
	if after.State != "running" || !after.EndAt.Equal(before.EndAt) || !e.node.isRunning(src.SandboxID) {
		t.Errorf("source after fork = %+v, want running with endAt %s", after, before.EndAt)
	}
	spec := e.node.lastSpec()
	if !strings.HasPrefix(spec.Artifact, "artifact:forks/"+src.SandboxID+"/") || spec.EnvVars["A"] != "1" || spec.EnvVars["E2B_SANDBOX_ID"] != spec.ID {
		t.Errorf("fork spec = %+v", spec)
	}
	if keys := e.node.snapshotKeys(); len(keys) != 0 || len(e.node.deletedSnapshots) != 1 {
		t.Errorf("fork copy not deleted: left %v, deleted %v", keys, e.node.deletedSnapshots)
	}

	// Defaults: count 1.
	results = nil
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, ``).wantStatus(t, http.StatusCreated).decode(t, &results)
	if len(results) != 1 || results[0].Sandbox == nil {
		t.Errorf("default fork = %+v", results)
	}

	// Per-fork failures are results, not a failed request.
	e.node.set(func(n *fakeNode) { n.createErr = fmt.Errorf("boot failed") })
	results = nil
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, `{"count":2}`).wantStatus(t, http.StatusCreated).decode(t, &results)
	if len(results) != 2 || results[0].Error == nil || results[0].Error.Code != 500 || results[0].Sandbox != nil {
		t.Errorf("failed forks = %+v, want two errors with code 500", results)
	}
	e.node.set(func(n *fakeNode) { n.createErr = nil })

	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, `{"count":0}`).wantError(t, 400, `"count" must be from 1 to 100`)
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, `{"count":101}`).wantError(t, 400, `"count" must be from 1 to 100`)
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, `{"timeout":7200}`).wantError(t, 400, "Timeout cannot be greater")
	e.do("POST", "/sandboxes/nosuch/fork", keyA, ``).wantError(t, 404, "doesn't exist")
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyB, ``).wantError(t, 404, "doesn't exist")
	e.pause(src.SandboxID, ``)
	e.do("POST", "/sandboxes/"+src.SandboxID+"/fork", keyA, ``).wantError(t, 409, "is paused")
}

// A fork limited by the team's concurrency limit reports 429 per fork.
func TestForkWithinTeamLimit(t *testing.T) {
	e := newEnv(t, envOptions{maxSandboxes: 2})
	src := e.create(keyA, `{"templateID":"base"}`).SandboxID
	var results []forkResult
	e.do("POST", "/sandboxes/"+src+"/fork", keyA, `{"count":3}`).wantStatus(t, http.StatusCreated).decode(t, &results)
	ok, limited := 0, 0
	for _, r := range results {
		switch {
		case r.Sandbox != nil:
			ok++
		case r.Error != nil && r.Error.Code == 429:
			limited++
		}
	}
	if ok != 1 || limited != 2 {
		t.Errorf("fork results = %+v, want 1 started and 2 at the limit", results)
	}
}

// Racing pauses, connects and kills on one sandbox: no 500s, the node sees
// a consistent sequence, nothing is left behind after the kill.
func TestConcurrentPauseConnectKill(t *testing.T) {
	e := newEnv(t, envOptions{})
	for round := range 3 {
		id := e.create(keyA, `{"templateID":"base"}`).SandboxID
		calls := []struct{ method, path, body string }{
			{"POST", "/sandboxes/" + id + "/pause", ``},
			{"POST", "/v2/sandboxes/" + id + "/connect", `{"timeout":60}`},
			{"POST", "/sandboxes/" + id + "/pause", `{"memory":false}`},
			{"POST", "/sandboxes/" + id + "/connect", `{"timeout":60}`},
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 16 {
			c := calls[i%len(calls)]
			wg.Go(func() {
				<-start
				res := doRequest(t, c.method, e.url+c.path, keyA, c.body)
				if res.status >= 500 {
					t.Errorf("round %d: %s %s = %d %s", round, c.method, c.path, res.status, res.body)
				}
			})
		}
		close(start)
		wg.Wait()
		e.do("DELETE", "/sandboxes/"+id, keyA, "").wantStatus(t, http.StatusNoContent)
		if e.node.isRunning(id) {
			t.Errorf("round %d: the node still runs %s", round, id)
		}
		if _, err := e.store.GetSandbox(context.Background(), id); err == nil {
			t.Errorf("round %d: row left", round)
		}
	}
	if keys := e.node.savedKeys(); len(keys) != 0 {
		t.Errorf("saved state left behind: %v", keys)
	}
}
