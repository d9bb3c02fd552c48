package proxy

import (
	"crypto/subtle"
	"errors"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"

	"github.com/warren-sh/warren/internal/envd/filesig"
)

// Routing headers the SDK sends on every data-plane request.
const (
	headerSandboxID   = "E2b-Sandbox-Id"
	headerSandboxPort = "E2b-Sandbox-Port"
)

// sandboxIDPattern is what a sandbox ID may look like: a DNS label (§1 step 3).
var sandboxIDPattern = regexp.MustCompile(`^[a-z0-9]+$`)

// The 400 answers of PROXY.md §1, text/plain.
var (
	errInvalidHost      = errors.New("Invalid host")
	errInvalidPort      = errors.New("Invalid sandbox port")
	errInvalidSandboxID = errors.New("Invalid sandbox ID")
)

// destination is a sandbox port a request is for.
type destination struct {
	sandboxID string
	port      int
	// signed: a signed /files URL, whose sandbox serve finds by its signature.
	signed bool
}

// route decides where r goes: a sandbox port, the API (nil, nil), or a 400
// (the error's text is the body).
//
// Order: a sandbox host (<port>-<id>.<Domain>, or any host whose first label
// has the <port>-<id> form) routes by host; otherwise routing headers route on
// any host (warren's single-origin mode A includes upstream's localhost,
// IP-literal and sandbox.* hosts); otherwise a signed /files URL routes by the
// sandbox whose token validates it; everything else is the API's.
func (p *Proxy) route(r *http.Request) (*destination, error) {
	host := hostname(r.Host)
	if p.isSandboxHost(host) {
		return parseSandboxHost(host)
	}
	id, port := r.Header.Get(headerSandboxID), r.Header.Get(headerSandboxPort)
	if id != "" || port != "" {
		return parseSandboxHeaders(id, port)
	}
	if isSignedFilesRequest(r) {
		return &destination{port: EnvdPort, signed: true}, nil
	}
	return nil, nil
}

// hostname is the Host header without port, brackets or trailing dot, in lower case.
func hostname(hostport string) string {
	h := hostport
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		h = host
	}
	h = strings.TrimSuffix(strings.Trim(h, "[]"), ".")
	return strings.ToLower(h)
}

// isSandboxHost reports whether host names a sandbox port: under Domain every
// host except api.<Domain> and sandbox.<Domain> (which carries headers), and
// on any domain a first label of the form <digits>-<something>.
func (p *Proxy) isSandboxHost(host string) bool {
	if d := strings.ToLower(p.cfg.Domain); d != "" && strings.HasSuffix(host, "."+d) {
		sub := strings.TrimSuffix(host, "."+d)
		return sub != "api" && sub != "sandbox"
	}
	label, _, ok := strings.Cut(host, ".")
	if !ok {
		return false
	}
	port, _, ok := strings.Cut(label, "-")
	return ok && port != "" && strings.Trim(port, "0123456789") == ""
}

// parseSandboxHost parses <port>-<sandboxID>[-ignored...].<anything> (§1 step 2).
func parseSandboxHost(host string) (*destination, error) {
	label, _, ok := strings.Cut(host, ".")
	if !ok {
		return nil, errInvalidHost
	}
	parts := strings.Split(label, "-")
	if len(parts) < 2 {
		return nil, errInvalidHost
	}
	return newDestination(parts[1], parts[0])
}

// parseSandboxHeaders routes by E2b-Sandbox-Id and E2b-Sandbox-Port (§1 step 1).
func parseSandboxHeaders(id, port string) (*destination, error) {
	switch {
	case id == "":
		return nil, errors.New("missing header: " + headerSandboxID)
	case port == "":
		return nil, errors.New("missing header: " + headerSandboxPort)
	}
	return newDestination(id, port)
}

func newDestination(id, port string) (*destination, error) {
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return nil, errInvalidPort
	}
	if !sandboxIDPattern.MatchString(id) {
		return nil, errInvalidSandboxID
	}
	return &destination{sandboxID: id, port: int(n)}, nil
}

// isSignedFilesRequest reports a downloadUrl/uploadUrl fetch: /files with a
// signature, which clients send without any routing header.
func isSignedFilesRequest(r *http.Request) bool {
	return r.URL.Path == "/files" && (r.Method == http.MethodGet || r.Method == http.MethodPost) &&
		r.URL.Query().Has("signature")
}

// signedTarget finds the running sandbox whose envd token validates the URL's
// signature, or answers the request itself. Expiry is the agent's to judge, so
// an expired URL still reaches it and gets its exact "signature is already
// expired" answer.
func (p *Proxy) signedTarget(w http.ResponseWriter, r *http.Request) (*Target, bool) {
	q := r.URL.Query()
	op := filesig.OpRead
	if r.Method == http.MethodPost {
		op = filesig.OpWrite
	}
	running, err := p.cfg.Router.Running(r.Context())
	if err != nil {
		p.cfg.Log.Error("list running sandboxes for a signed URL", "err", err)
		writeError(w, r, http.StatusInternalServerError, errorBody{Message: lookupFailedMessage})
		return nil, false
	}
	got := []byte(q.Get("signature"))
	for _, t := range running {
		if t.EnvdToken == "" {
			continue
		}
		want := filesig.Sign(q.Get("path"), op, q.Get("username"), t.EnvdToken, q.Get("signature_expiration"))
		if subtle.ConstantTimeCompare([]byte(want), got) == 1 {
			return t, true
		}
	}
	// The agent's status and words for a bad signature; the URL may also
	// belong to a sandbox that is no longer running, which we cannot tell.
	writeError(w, r, http.StatusUnauthorized, errorBody{Message: "invalid signature: no running sandbox accepts it"})
	return nil, false
}
