package proxy

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"
)

// resumingRouter is a fakeRouter whose paused sandboxes resume: Resume
// registers the sandbox's running target (its agent already listens).
type resumingRouter struct {
	*fakeRouter
	mu      sync.Mutex
	paused  map[string]pausedSandbox
	resumes map[string]int
	// resumeErr, when set, is what every Resume returns.
	resumeErr error
}

type pausedSandbox struct {
	paused  *Target // what Paused returns
	running *Target // what Resume makes of it
}

func (r *resumingRouter) Paused(_ context.Context, id string) (*Target, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.paused[id]; ok {
		return p.paused, nil
	}
	return nil, ErrSandboxNotFound
}

func (r *resumingRouter) Resume(_ context.Context, id string) (*Target, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.resumeErr != nil {
		return nil, r.resumeErr
	}
	p, ok := r.paused[id]
	if !ok {
		return nil, ErrSandboxNotFound
	}
	r.resumes[id]++
	delete(r.paused, id)
	r.fakeRouter.add(p.running)
	return p.running, nil
}

func (r *resumingRouter) resumeCount(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.resumes[id]
}

// newResumingEnv is a proxy whose router can auto-resume, with one paused
// sandbox "paused1" whose agent (token "tok") and a user server on the
// returned port answer once it is resumed.
func newResumingEnv(t *testing.T) (*env, *resumingRouter, int) {
	t.Helper()
	e := newEnv(t)
	rr := &resumingRouter{fakeRouter: e.router, paused: map[string]pausedSandbox{}, resumes: map[string]int{}}
	e.proxy.cfg.Router = rr
	sbx := e.startSandbox(t, "paused1")
	e.router.remove(sbx.id) // paused: no route until resumed
	port := userServer(t, sbx.ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "user server")
	}))
	rr.paused[sbx.id] = pausedSandbox{
		paused:  &Target{SandboxID: sbx.id, EnvdToken: "tok"},
		running: &Target{SandboxID: sbx.id, Host: sbx.ip, EnvdToken: "tok"},
	}
	return e, rr, port
}

func TestAutoResumeOnTraffic(t *testing.T) {
	t.Run("host routing to a user port", func(t *testing.T) {
		e, rr, port := newResumingEnv(t)
		r := e.do(t, request{path: "/", host: strconv.Itoa(port) + "-paused1." + testDomain})
		if r.status != http.StatusOK || r.body != "user server" {
			t.Fatalf("status %d body %q, want the user server's answer after a resume", r.status, r.body)
		}
		// Running now: later requests go straight through.
		e.do(t, request{path: "/", host: strconv.Itoa(port) + "-paused1." + testDomain})
		if n := rr.resumeCount("paused1"); n != 1 {
			t.Errorf("resumes = %d, want 1", n)
		}
	})
	t.Run("header routing to the agent with its token", func(t *testing.T) {
		e, rr, _ := newResumingEnv(t)
		h := routed("paused1", EnvdPort)
		h["X-Access-Token"] = "tok"
		if r := e.do(t, request{path: "/health", headers: h}); r.status != http.StatusNoContent {
			t.Fatalf("status %d body %q, want the agent's 204", r.status, r.body)
		}
		if n := rr.resumeCount("paused1"); n != 1 {
			t.Errorf("resumes = %d, want 1", n)
		}
	})
}

func TestAutoResumeRefusals(t *testing.T) {
	const refused = `{"sandboxId":"paused1","message":"This sandbox can't be resumed with the credentials provided. Check your access token and try again.","code":403}`
	for _, tc := range []struct {
		name      string
		id        string
		headers   map[string]string
		resumeErr error
		status    int
		body      string
	}{
		{"agent port without the token", "paused1", routed("paused1", EnvdPort), nil, 403, refused},
		{"agent port with a wrong token", "paused1", map[string]string{"E2b-Sandbox-Id": "paused1", "E2b-Sandbox-Port": "49983", "X-Access-Token": "nope"}, nil, 403, refused},
		{"not resumable (no auto-resume, disk-only or unknown)", "other", routed("other", EnvdPort), nil, 502,
			`{"sandboxId":"other","message":"The sandbox was not found","code":502}`},
		{"still transitioning", "paused1", map[string]string{"E2b-Sandbox-Id": "paused1", "E2b-Sandbox-Port": "8080"}, ErrTransitioning, 409,
			`{"sandboxId":"paused1","message":"The sandbox is still transitioning. Try again in a moment.","code":409}`},
		{"team limit", "paused1", routed("paused1", 8080), &ResumeError{Status: 429, Message: "you have reached the maximum number of concurrent E2B sandboxes (1)"}, 429,
			`{"sandboxId":"paused1","message":"you have reached the maximum number of concurrent E2B sandboxes (1)","code":429}`},
		{"gone meanwhile", "paused1", routed("paused1", 8080), ErrSandboxNotFound, 502,
			`{"sandboxId":"paused1","message":"The sandbox was not found","code":502}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, rr, _ := newResumingEnv(t)
			rr.resumeErr = tc.resumeErr
			r := e.do(t, request{path: "/health", headers: tc.headers})
			if r.status != tc.status || r.body != tc.body {
				t.Errorf("status %d body %s, want %d %s", r.status, r.body, tc.status, tc.body)
			}
			if tc.resumeErr == nil && rr.resumeCount(tc.id) != 0 {
				t.Error("a refused request resumed the sandbox")
			}
		})
	}
}

// A router without Resume answers 502 for a paused sandbox, as before.
func TestNoAutoResumeWithoutResumer(t *testing.T) {
	e := newEnv(t)
	r := e.do(t, request{path: "/health", headers: routed("paused1", EnvdPort)})
	if r.status != http.StatusBadGateway {
		t.Errorf("status %d, want 502", r.status)
	}
}
