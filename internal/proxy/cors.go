package proxy

import (
	"net/http"
	"strings"
)

// corsAllowedHeaders are the headers the browser SDK sends to the agent
// (PROXY.md §7). Preflights asking for more (X-Metadata-<key>) get what they ask.
var corsAllowedHeaders = []string{
	"E2b-Sandbox-Id", "E2b-Sandbox-Port", "X-Access-Token", "Authorization", "Connect-Protocol-Version",
	"Connect-Timeout-Ms", "Keepalive-Ping-Interval", "Content-Type", "E2B-Traffic-Access-Token", "User-Agent",
}

// answerPreflight answers CORS preflights for the agent: those of a sandbox
// host's port 49983, and, on the single origin of mode A, those asking to send
// a routing header (a preflight carries no routing headers of its own, so it
// could not be routed). User ports' preflights are the user's server's.
// It reports whether it answered.
func (p *Proxy) answerPreflight(w http.ResponseWriter, r *http.Request) bool {
	if r.Method != http.MethodOptions || r.Header.Get("Origin") == "" || r.Header.Get("Access-Control-Request-Method") == "" {
		return false
	}
	requested := strings.ToLower(strings.Join(r.Header.Values("Access-Control-Request-Headers"), ","))
	if host := hostname(r.Host); p.isSandboxHost(host) {
		d, err := parseSandboxHost(host)
		if err != nil || d.port != EnvdPort {
			return false
		}
	} else if !strings.Contains(requested, strings.ToLower(headerSandboxID)) &&
		!strings.Contains(requested, strings.ToLower(headerSandboxPort)) {
		return false
	}
	allowed := strings.Join(corsAllowedHeaders, ", ")
	if requested != "" {
		// "*" would not cover Authorization (Fetch standard), and X-Metadata-<key>
		// cannot be listed ahead: allow what is asked, as the agent does.
		allowed = strings.Join(r.Header.Values("Access-Control-Request-Headers"), ", ")
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", "HEAD, GET, POST, PUT, PATCH, DELETE")
	h.Set("Access-Control-Allow-Headers", allowed)
	h.Set("Access-Control-Max-Age", "7200")
	h.Add("Vary", "Access-Control-Request-Headers")
	w.WriteHeader(http.StatusNoContent)
	return true
}
