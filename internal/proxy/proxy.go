// Package proxy carries sandbox traffic: requests for a port inside a sandbox,
// named by the E2b-Sandbox-Id/E2b-Sandbox-Port headers or by a
// <port>-<sandboxID>.<domain> host, go to that sandbox's address; everything
// else on warren's single listener goes to the API (PROXY.md).
//
// The life of a proxied request:
//
//	route      headers, host or URL signature → sandbox ID + port (400 text/plain when malformed)
//	guard      agent-internal paths on 49983 → 404; Router.Lookup → 502 when not running,
//	           unless the Router is a Resumer and the sandbox may be auto-resumed
//	           (resume.go); traffic token on other ports → 403
//	forward    HTTP/1.1 to Target.Host:port, streamed both ways, no timeouts
//	abort      Abort(sandboxID) cuts every in-flight request of a killed sandbox
//
// The http.Server in front must leave ReadTimeout and WriteTimeout unset
// (commands stream for hours) and may set IdleTimeout to upstream's 620 s;
// with a certs TLS configuration it serves h2 and HTTP/1.1.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"

	"github.com/warren-sh/warren/internal/transfer"
)

// EnvdPort is the port of the in-sandbox agent (envd).
const EnvdPort = 49983

// ErrSandboxNotFound is what a Router returns for unknown, killed or paused sandboxes.
var ErrSandboxNotFound = errors.New("sandbox not found")

// Target is where a running sandbox's ports are reachable.
type Target struct {
	SandboxID string
	// Host is the address the proxy reaches the sandbox at (its slot
	// address); it dials Host:port.
	Host string
	// EnvdToken is the agent's access token; signed /files URLs without
	// routing headers are routed by the token that validates their signature.
	EnvdToken string
	// TrafficToken is non-empty when the sandbox was created with
	// allowPublicTraffic:false; ports other than 49983 then require it.
	TrafficToken string
	// Agent, when set, carries the requests for port 49983: the node's own
	// pool of connections into this sandbox's agent, which already holds an
	// open one when the sandbox was just created (under TCG a new connection
	// costs a fresh guest ~10 ms). Nil: the proxy's shared pool.
	Agent http.RoundTripper
	// Transfer, when set, is the sandbox's transfer disk: the proxy sends
	// upload bodies through it instead of the guest's network.
	Transfer *transfer.Disk
}

// Router tells the proxy where running sandboxes are. The control plane
// implements it; it must stop returning a sandbox before it calls Abort for it,
// so that no request slips in after the abort.
type Router interface {
	// Lookup returns the target of a running sandbox; ErrSandboxNotFound for
	// unknown, killed or paused ones.
	Lookup(ctx context.Context, sandboxID string) (*Target, error)
	// Running lists the running sandboxes' targets (signed-URL routing checks
	// each one's token).
	Running(ctx context.Context) ([]*Target, error)
}

// Config is how a Proxy routes.
type Config struct {
	Router Router
	// Domain is E2B_DOMAIN (README mode B): <port>-<id>.<Domain> hosts are
	// sandbox traffic, api.<Domain> is the API. Empty: header routing only
	// (mode A), plus hosts whose first label has the <port>-<id> form.
	Domain string
	Log    *slog.Logger
}

// Proxy routes and forwards sandbox traffic.
type Proxy struct {
	cfg       Config
	forwarder *httputil.ReverseProxy
	upstream  *upstream

	mu       sync.Mutex
	inflight map[string]map[*inflightRequest]struct{} // by sandbox ID
}

// inflightRequest is one proxied request that Abort can cut; stream marks a
// Connect streaming call (AbortStreams).
type inflightRequest struct {
	cancel context.CancelCauseFunc
	stream bool
}

// errAborted is the cancel cause of requests cut by Abort.
var errAborted = errors.New("sandbox stopped")

// New returns a Proxy. Its upstream connections are released by Close.
func New(cfg Config) *Proxy {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	p := &Proxy{cfg: cfg, upstream: newUpstream(), inflight: map[string]map[*inflightRequest]struct{}{}}
	p.forwarder = p.newForwarder()
	return p
}

// Close releases idle upstream connections.
func (p *Proxy) Close() { p.upstream.closeIdle() }

// Wrap returns the handler of warren's single listener: requests that target a
// sandbox go to the proxy, everything else to api.
func (p *Proxy) Wrap(api http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.answerPreflight(w, r) {
			return
		}
		d, err := p.route(r)
		switch {
		case err != nil:
			// Malformed routing is plain text, as upstream answers it (§1).
			http.Error(w, err.Error(), http.StatusBadRequest)
		case d == nil:
			api.ServeHTTP(w, r)
		default:
			p.serve(w, r, d)
		}
	})
}

// Abort cuts every in-flight request of sandboxID: the client sees the
// connection (HTTP/1.1) or stream (h2) reset mid-body, which the SDK reads as
// "sandbox was killed". Call it after the Router stops returning the sandbox.
func (p *Proxy) Abort(sandboxID string) {
	p.mu.Lock()
	reqs := p.inflight[sandboxID]
	delete(p.inflight, sandboxID)
	p.mu.Unlock()
	for req := range reqs {
		req.cancel(errAborted)
	}
	// Connections of the shared pool would otherwise outlive the sandbox,
	// and its slot address may soon belong to another one. (The transport
	// can only drop all idle connections; others simply reconnect.) A
	// Target.Agent pool is its node's to close.
	p.upstream.closeIdle()
}

// AbortStreams cuts every Connect streaming call in flight (a command's
// output, a directory watch), of every sandbox, as Abort does. A server
// shutting down calls it: such streams end only when their command does, so
// waiting for requests in flight would otherwise wait for them to time out,
// while unary calls and file transfers end by themselves and may finish.
func (p *Proxy) AbortStreams() {
	p.mu.Lock()
	var cut []*inflightRequest
	for _, reqs := range p.inflight {
		for req := range reqs {
			if req.stream {
				cut = append(cut, req)
			}
		}
	}
	p.mu.Unlock()
	for _, req := range cut {
		req.cancel(errAborted)
	}
}

// isStream reports whether r is a Connect streaming call: the Connect
// protocol's streaming content types (application/connect+json, +proto);
// its unary calls are application/json or application/proto. gRPC uses one
// content type for both kinds, so its calls count as unary.
func isStream(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/connect+")
}

// track registers a request of sandboxID for Abort; done unregisters it.
func (p *Proxy) track(ctx context.Context, sandboxID string, stream bool) (_ context.Context, done func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	req := &inflightRequest{cancel: cancel, stream: stream}
	p.mu.Lock()
	if p.inflight[sandboxID] == nil {
		p.inflight[sandboxID] = map[*inflightRequest]struct{}{}
	}
	p.inflight[sandboxID][req] = struct{}{}
	p.mu.Unlock()
	return ctx, func() {
		p.mu.Lock()
		if reqs := p.inflight[sandboxID]; reqs != nil {
			delete(reqs, req)
			if len(reqs) == 0 {
				delete(p.inflight, sandboxID)
			}
		}
		p.mu.Unlock()
		cancel(nil)
	}
}

// serve checks a routed request against the sandbox's state and forwards it.
func (p *Proxy) serve(w http.ResponseWriter, r *http.Request, d *destination) {
	if d.port == EnvdPort && isAgentInternal(r.URL.Path) {
		writeAgentInternal(w, r)
		return
	}
	if d.port == EnvdPort && isFramed(r) {
		writeError(w, r, http.StatusBadRequest, errorBody{Message: fmt.Sprintf("unsupported Content-Type %q, expected multipart/form-data or application/octet-stream", r.Header.Get("Content-Type"))})
		return
	}
	var target *Target
	if d.signed {
		var ok bool
		if target, ok = p.signedTarget(w, r); !ok {
			return
		}
		d.sandboxID = target.SandboxID
	}
	// Tracked before the lookup: an Abort between lookup and forwarding still
	// reaches this request.
	ctx, done := p.track(r.Context(), d.sandboxID, isStream(r))
	defer done()
	r = r.WithContext(ctx)

	if target == nil {
		var err error
		target, err = p.cfg.Router.Lookup(ctx, d.sandboxID)
		if errors.Is(err, ErrSandboxNotFound) {
			// Perhaps paused with auto-resume: then it runs again first.
			if target = p.autoResume(w, r, d); target == nil {
				return
			}
		} else if err != nil {
			p.lookupFailed(w, r, d.sandboxID, err)
			return
		}
	}
	if target.Host == "" {
		// Dialing ":port" would reach this host's own services.
		p.cfg.Log.Error("router returned a sandbox without an address", "sandbox", d.sandboxID)
		writeError(w, r, http.StatusInternalServerError, errorBody{SandboxID: d.sandboxID, Message: lookupFailedMessage})
		return
	}
	if d.port != EnvdPort && !trafficTokenOK(w, r, target) {
		return
	}
	if d.port == EnvdPort {
		if boundary, ok := viaTransfer(r, target); ok {
			p.forwardUpload(w, r, target, boundary)
			return
		}
	}
	p.forward(w, r, target, d.port)
}
