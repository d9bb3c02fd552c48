package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"time"
)

// Dialing a sandbox port: a few quick retries cover a guest server (or the
// guest's loopback forwarder, ~1 s upstream) that is about to listen, as
// upstream's 5 attempts do. A closed port so costs about a second before its 502.
const (
	dialAttempts = 5
	dialBackoff  = 100 * time.Millisecond // grows linearly: 100, 200, 300, 400 ms
	dialTimeout  = 3 * time.Second        // per attempt; only reached when the guest does not answer at all
)

// upstream holds the connections to sandboxes.
//
// Agent (49983) connections are pooled: the agent is ours, idles out after
// 640 s, and the SDK sends many short calls. Connections to user ports are not
// (as upstream): their servers' idle timeouts are unknown (Node's is 5 s), and
// a pooled connection the server is closing turns into a spurious error.
type upstream struct {
	agent, user *http.Transport
}

func newUpstream() *upstream {
	base := func() *http.Transport {
		return &http.Transport{
			Proxy:       nil, // never HTTP_PROXY: sandboxes are reached directly
			DialContext: dialSandbox,
			// Bodies pass through as the guest sent them: no Accept-Encoding
			// added, nothing decompressed.
			DisableCompression: true,
			ReadBufferSize:     32 << 10,
			WriteBufferSize:    32 << 10,
			// No response header timeout: a Connect call may legitimately
			// wait, and commands run for hours.
		}
	}
	agent, user := base(), base()
	agent.MaxIdleConns = 1024
	agent.MaxIdleConnsPerHost = 16
	agent.IdleConnTimeout = 60 * time.Second
	user.DisableKeepAlives = true
	return &upstream{agent: agent, user: user}
}

// RoundTrip sends the request over the agent's or the user ports' transport:
// for the agent, the target's own (Target.Agent) when it has one.
func (u *upstream) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Port() == strconv.Itoa(EnvdPort) {
		if f, _ := r.Context().Value(forwardKey{}).(*forwardInfo); f != nil && f.target.Agent != nil {
			return f.target.Agent.RoundTrip(r)
		}
		return u.agent.RoundTrip(r)
	}
	return u.user.RoundTrip(r)
}

func (u *upstream) closeIdle() { u.agent.CloseIdleConnections() }

// portClosedError is a sandbox port that refused or ignored every dial attempt.
type portClosedError struct{ err error }

func (e *portClosedError) Error() string { return fmt.Sprintf("sandbox port not open: %v", e.err) }
func (e *portClosedError) Unwrap() error { return e.err }

// dialSandbox dials addr, retrying a few times (see dialAttempts).
func dialSandbox(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	var err error
	for attempt := range dialAttempts {
		if attempt > 0 {
			select {
			case <-time.After(time.Duration(attempt) * dialBackoff):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		var conn net.Conn
		if conn, err = d.DialContext(ctx, network, addr); err == nil {
			return conn, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return nil, &portClosedError{err}
}

// forwardKey carries a request's forwarding details to the ReverseProxy hooks.
type forwardKey struct{}

type forwardInfo struct {
	target *Target
	port   int
}

func (p *Proxy) newForwarder() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			f := pr.In.Context().Value(forwardKey{}).(*forwardInfo)
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = net.JoinHostPort(f.target.Host, strconv.Itoa(f.port))
			// Out.Host stays the client's Host: dev servers and the agent see
			// the public name (PROXY.md §6).
			pr.SetXForwarded()
		},
		Transport: p.upstream,
		// Every write reaches the client at once: Connect stream envelopes,
		// server-sent events, long-poll answers.
		FlushInterval: -1,
		ErrorHandler:  p.forwardError,
		ErrorLog:      slog.NewLogLogger(p.cfg.Log.Handler(), slog.LevelDebug),
	}
}

// forward sends r to port of target and streams the answer back.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request, target *Target, port int) {
	// HTTP/1.1 clients may keep sending a request body (Connect client
	// streams) while the answer streams back; h2 always allows it.
	_ = http.NewResponseController(w).EnableFullDuplex()
	ctx := context.WithValue(r.Context(), forwardKey{}, &forwardInfo{target: target, port: port})
	p.forwarder.ServeHTTP(w, r.WithContext(ctx))
}

// forwardError answers a request the sandbox did not answer. Errors after the
// response started never get here: ReverseProxy then aborts the response
// itself (panic http.ErrAbortHandler), which is what a killed sandbox needs.
func (p *Proxy) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	f := r.Context().Value(forwardKey{}).(*forwardInfo)
	if errors.Is(context.Cause(r.Context()), errAborted) {
		// Killed while waiting for the answer: cut, as for a started stream.
		panic(http.ErrAbortHandler)
	}
	if r.Context().Err() != nil {
		return // the client left; nobody reads an answer
	}
	var closed *portClosedError
	if errors.As(err, &closed) {
		writePortClosed(w, r, f.target.SandboxID, f.port)
		return
	}
	// The guest accepted the connection but broke it, or answered garbage: the
	// client sees the same, a cut connection; a 502 on the agent port would
	// read as "sandbox gone" to the SDK.
	p.cfg.Log.Debug("forward to sandbox", "sandbox", f.target.SandboxID, "port", f.port, "err", err)
	panic(http.ErrAbortHandler)
}
