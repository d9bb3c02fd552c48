package proxy

import (
	"context"
	"crypto/subtle"
	"errors"
	"net/http"
)

// Resumer is a Router that can resume paused sandboxes for the traffic that
// reaches them (PROXY.md §5, auto-resume). When Lookup finds no running
// sandbox, the proxy asks Paused whether traffic may resume it, checks the
// request's credentials against the target, and calls Resume; the request is
// forwarded once the sandbox runs. Routers without it answer 502 for every
// sandbox that is not running.
type Resumer interface {
	// Paused returns the target of a paused sandbox that traffic may
	// resume (auto-resume on, memory saved), with Host empty; a sandbox
	// being paused or resumed counts. ErrSandboxNotFound for any other.
	Paused(ctx context.Context, sandboxID string) (*Target, error)
	// Resume resumes a paused sandbox (concurrent calls share one resume,
	// and a pause or resume in progress is waited for) and returns its
	// running target. ErrSandboxNotFound when it may not be resumed after
	// all; a *ResumeError is answered to the client as it says.
	Resume(ctx context.Context, sandboxID string) (*Target, error)
}

// ResumeError is an auto-resume the client is told was refused, with the
// status and message of PROXY.md §3.
type ResumeError struct {
	Status  int
	Message string
}

func (e *ResumeError) Error() string { return e.Message }

// ErrTransitioning is a Resume that gave up waiting for a pause or resume in
// progress.
var ErrTransitioning = &ResumeError{Status: http.StatusConflict, Message: "The sandbox is still transitioning. Try again in a moment."}

// resumeRefusedMessage answers requests whose credentials may not resume a
// sandbox (PROXY.md §3).
const resumeRefusedMessage = "This sandbox can't be resumed with the credentials provided. Check your access token and try again."

// headerAccessToken is the agent's access token header.
const headerAccessToken = "X-Access-Token"

// autoResume resumes the paused sandbox a request is for, when the router can
// and the sandbox allows it, and returns its target; otherwise it answers the
// request itself (502 not found, 403, 409, 429) and returns nil.
func (p *Proxy) autoResume(w http.ResponseWriter, r *http.Request, d *destination) *Target {
	res, ok := p.cfg.Router.(Resumer)
	if !ok {
		writeSandboxNotFound(w, r, d.sandboxID)
		return nil
	}
	t, err := res.Paused(r.Context(), d.sandboxID)
	if err != nil {
		p.lookupFailed(w, r, d.sandboxID, err)
		return nil
	}
	// Only a request that could use the sandbox may wake it: on the agent
	// port the agent's token, elsewhere the traffic token of a private one.
	want, header := t.TrafficToken, headerTrafficToken
	if d.port == EnvdPort {
		want, header = t.EnvdToken, headerAccessToken
	}
	if want != "" && subtle.ConstantTimeCompare([]byte(r.Header.Get(header)), []byte(want)) != 1 {
		writeError(w, r, http.StatusForbidden, errorBody{SandboxID: d.sandboxID, Message: resumeRefusedMessage})
		return nil
	}
	p.cfg.Log.Info("resuming a paused sandbox for its traffic", "sandbox", d.sandboxID, "port", d.port)
	t, err = res.Resume(r.Context(), d.sandboxID)
	var re *ResumeError
	if errors.As(err, &re) {
		writeError(w, r, re.Status, errorBody{SandboxID: d.sandboxID, Message: re.Message})
		return nil
	}
	if err != nil {
		p.lookupFailed(w, r, d.sandboxID, err)
		return nil
	}
	return t
}

// lookupFailed answers a failed lookup or resume: 502 for a sandbox that is
// not there, 500 (never 502, which the SDK reads as "sandbox gone" on the
// agent port) for anything else.
func (p *Proxy) lookupFailed(w http.ResponseWriter, r *http.Request, sandboxID string, err error) {
	if errors.Is(err, ErrSandboxNotFound) {
		writeSandboxNotFound(w, r, sandboxID)
		return
	}
	p.cfg.Log.Error("look up sandbox", "sandbox", sandboxID, "err", err)
	writeError(w, r, http.StatusInternalServerError, errorBody{SandboxID: sandboxID, Message: lookupFailedMessage})
}
