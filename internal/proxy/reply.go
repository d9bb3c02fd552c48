package proxy

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Messages of the proxy's own answers (PROXY.md §2, §3). The SDK matches
// "The sandbox was not found" and reads code and sandboxId from the body.
const (
	sandboxNotFoundMessage = "The sandbox was not found"
	portClosedMessage      = "The sandbox is running but port is not open"
	agentInternalMessage   = "This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL"
	trafficTokenMissing    = "Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing"
	trafficTokenInvalid    = "Sandbox is secured with traffic access token. Provided token in header 'e2b-traffic-access-token' is invalid"
	lookupFailedMessage    = "The sandbox could not be looked up; try again in a moment"
)

// headerTrafficToken carries the traffic access token of private sandboxes.
const headerTrafficToken = "E2b-Traffic-Access-Token"

// agentInternalPaths are the agent's control-plane routes (x-internal in
// envd.yaml, plus upstream's /upgrade): the node calls them directly, never
// through the proxy (PROXY.md §4).
var agentInternalPaths = []string{"/init", "/upgrade", "/freeze", "/unfreeze", "/collapse", "/fsfreeze", "/fsthaw"}

// isAgentInternal reports whether p, cleaned as the agent's router would, is
// one of agentInternalPaths.
func isAgentInternal(p string) bool {
	return slices.Contains(agentInternalPaths, path.Clean("/"+p))
}

// errorBody is the JSON of the proxy's errors; field order is upstream's.
type errorBody struct {
	SandboxID string `json:"sandboxId,omitempty"`
	Message   string `json:"message"`
	Path      string `json:"path,omitempty"`
	Port      int    `json:"port,omitempty"`
	Code      int    `json:"code"`
}

func writeSandboxNotFound(w http.ResponseWriter, r *http.Request, sandboxID string) {
	writeError(w, r, http.StatusBadGateway, errorBody{SandboxID: sandboxID, Message: sandboxNotFoundMessage})
}

func writePortClosed(w http.ResponseWriter, r *http.Request, sandboxID string, port int) {
	writeError(w, r, http.StatusBadGateway, errorBody{SandboxID: sandboxID, Message: portClosedMessage, Port: port})
}

func writeAgentInternal(w http.ResponseWriter, r *http.Request) {
	writeError(w, r, http.StatusNotFound, errorBody{Message: agentInternalMessage, Path: path.Clean("/" + r.URL.Path)})
}

// trafficTokenOK checks a private sandbox's traffic token, answering 403 when
// it is missing or wrong. Public sandboxes (no token) pass.
func trafficTokenOK(w http.ResponseWriter, r *http.Request, t *Target) bool {
	if t.TrafficToken == "" {
		return true
	}
	got := r.Header.Get(headerTrafficToken)
	switch {
	case got == "":
		writeError(w, r, http.StatusForbidden, errorBody{SandboxID: t.SandboxID, Message: trafficTokenMissing})
	case subtle.ConstantTimeCompare([]byte(got), []byte(t.TrafficToken)) != 1:
		writeError(w, r, http.StatusForbidden, errorBody{SandboxID: t.SandboxID, Message: trafficTokenInvalid})
	default:
		return true
	}
	return false
}

// writeError answers with body as JSON, or as an HTML page with the same
// status for a browser navigation.
func writeError(w http.ResponseWriter, r *http.Request, status int, body errorBody) {
	body.Code = status
	h := w.Header()
	if r.Header.Get("Origin") != "" {
		// Lets the browser SDK read the error instead of a CORS failure.
		h.Set("Access-Control-Allow-Origin", "*")
	}
	var out []byte
	if wantsHTML(r) {
		var b strings.Builder
		if err := errorPage.Execute(&b, body); err != nil {
			panic(fmt.Sprintf("error page template: %v", err)) // a static template that cannot fail
		}
		out = []byte(b.String())
		h.Set("Content-Type", "text/html; charset=utf-8")
	} else {
		out, _ = json.Marshal(body) // strings and ints: cannot fail
		h.Set("Content-Type", "application/json; charset=utf-8")
	}
	h.Set("Content-Length", strconv.Itoa(len(out)))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(out)
}

// browserUserAgent matches the user agents upstream answers with HTML.
var browserUserAgent = regexp.MustCompile(`(?i)mozilla|chrome|safari|firefox|edge|opera|msie`)

// wantsHTML is upstream's choice between an HTML page and JSON (PROXY.md §3):
// explicit API clients get JSON, navigations HTML, the rest by user agent.
func wantsHTML(r *http.Request) bool {
	accept := strings.Join(r.Header.Values("Accept"), ",")
	if strings.Contains(accept, "application/json") && !strings.Contains(accept, "text/html") {
		return false
	}
	switch r.Header.Get("Sec-Fetch-Mode") {
	case "cors", "no-cors", "same-origin", "websocket":
		return false
	case "navigate":
		return true
	}
	if r.Header.Get("X-Requested-With") != "" {
		return false
	}
	return browserUserAgent.MatchString(r.Header.Get("User-Agent"))
}

var errorPage = template.Must(template.New("error").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Code}} · {{.Message}}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 15vh auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; color: #555; }
dd { margin: 0; font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<h1>{{.Message}}</h1>
<dl>
<dt>Status</dt><dd>{{.Code}}</dd>
{{- if .SandboxID}}
<dt>Sandbox</dt><dd>{{.SandboxID}}</dd>{{end}}
{{- if .Port}}
<dt>Port</dt><dd>{{.Port}}</dd>{{end}}
{{- if .Path}}
<dt>Path</dt><dd>{{.Path}}</dd>{{end}}
</dl>
</body>
</html>
`))
