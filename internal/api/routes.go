package api

import (
	"net/http"

	"github.com/warren-sh/warren/internal/store"
)

// route is one operation of the API. path is written as in openapi.yaml
// ({name} wildcards), which is also Go's ServeMux syntax.
type route struct {
	method string
	path   string
	// public routes are served without an API key.
	public bool
	handle handlerFunc
	// pattern, when set, is the ServeMux pattern used instead of path (see
	// templateTagsPattern).
	pattern string
	// ownBody routes read their body themselves, with their own size limit
	// (uploads), instead of Config.MaxBodyBytes.
	ownBody bool
}

// handlerFunc serves one authenticated request; team is nil on public routes.
// A returned error is written as E2B's error body.
type handlerFunc func(s *server, w http.ResponseWriter, r *http.Request, team *store.Team) error

func (rt route) muxPattern() string {
	if rt.pattern != "" {
		return rt.method + " " + rt.pattern
	}
	return rt.method + " " + rt.path
}

// templateTagsPattern registers GET /templates/{templateID}/tags. ServeMux
// refuses that path next to /templates/aliases/{alias}: both match
// /templates/aliases/tags and neither is more specific. Registered as
// /templates/{templateID}/{sub}, which the aliases route is more specific
// than, and the handler answers 404 for any sub but "tags".
const templateTagsPattern = "/templates/{templateID}/{sub}"

// routes is every route the API serves, in the order of REST.md §3.
func routes() []route {
	return []route{
		{method: "GET", path: "/health", public: true, handle: (*server).health},
		{method: "GET", path: "/openapi.yaml", public: true, handle: (*server).openAPI},

		{method: "POST", path: "/sandboxes", handle: (*server).createSandboxV1},
		{method: "POST", path: "/v2/sandboxes", handle: (*server).createSandboxV2},
		{method: "GET", path: "/sandboxes", handle: (*server).listSandboxesV1},
		{method: "GET", path: "/v2/sandboxes", handle: (*server).listSandboxesV2},
		{method: "GET", path: "/sandboxes/{sandboxID}", handle: (*server).getSandbox},
		{method: "DELETE", path: "/sandboxes/{sandboxID}", handle: (*server).killSandbox},
		{method: "POST", path: "/sandboxes/{sandboxID}/timeout", handle: (*server).setTimeout},
		{method: "POST", path: "/sandboxes/{sandboxID}/refreshes", handle: (*server).refresh},
		{method: "POST", path: "/sandboxes/{sandboxID}/connect", handle: (*server).connectV1},
		{method: "POST", path: "/v2/sandboxes/{sandboxID}/connect", handle: (*server).connectV2},
		{method: "POST", path: "/sandboxes/{sandboxID}/pause", handle: (*server).pauseSandbox},
		{method: "POST", path: "/sandboxes/{sandboxID}/resume", handle: (*server).resumeSandbox},
		{method: "POST", path: "/sandboxes/{sandboxID}/fork", handle: (*server).forkSandbox},
		{method: "POST", path: "/sandboxes/{sandboxID}/snapshots", handle: (*server).createSnapshot},
		{method: "GET", path: "/snapshots", handle: (*server).listSnapshots},
		{method: "GET", path: "/sandboxes/{sandboxID}/metrics", handle: (*server).sandboxMetrics},
		{method: "GET", path: "/sandboxes/metrics", handle: (*server).batchMetrics},
		{method: "GET", path: "/sandboxes/{sandboxID}/logs", handle: (*server).logsV1},
		{method: "GET", path: "/v2/sandboxes/{sandboxID}/logs", handle: (*server).logsV2},

		{method: "GET", path: "/templates", handle: (*server).listTemplatesV1},
		{method: "GET", path: "/v2/templates", handle: (*server).listTemplatesV2},
		{method: "GET", path: "/templates/{templateID}", handle: (*server).getTemplate},
		{method: "DELETE", path: "/templates/{templateID}", handle: (*server).deleteTemplate},
		{method: "GET", path: "/templates/aliases/{alias}", handle: (*server).templateByAlias},
		{method: "GET", path: "/templates/{templateID}/tags", pattern: templateTagsPattern, handle: (*server).templateTags},

		// Template builds and tags (builds.go).
		{method: "POST", path: "/v3/templates", handle: (*server).createTemplateV3},
		{method: "GET", path: "/templates/{templateID}/files/{hash}", handle: (*server).templateFiles},
		{method: "PUT", path: uploadPath, public: true, ownBody: true, handle: (*server).uploadBuildFiles},
		{method: "POST", path: "/v2/templates/{templateID}/builds/{buildID}", handle: (*server).startBuildV2},
		{method: "GET", path: "/templates/{templateID}/builds/{buildID}/status", handle: (*server).buildStatus},
		{method: "GET", path: "/templates/{templateID}/builds/{buildID}/logs", handle: (*server).buildLogs},
		{method: "POST", path: "/templates/tags", handle: (*server).assignTags},
		{method: "DELETE", path: "/templates/tags", handle: (*server).removeTags},
		{method: "PATCH", path: "/v2/templates/{templateID}", handle: (*server).updateTemplateV2},

		{method: "GET", path: "/teams", handle: (*server).listTeams},
		{method: "GET", path: "/api-keys", handle: (*server).listAPIKeys},
		{method: "POST", path: "/api-keys", handle: (*server).createAPIKey},
		{method: "DELETE", path: "/api-keys/{apiKeyID}", handle: (*server).deleteAPIKey},
	}
}

// wrap authenticates a route's requests (unless public) and writes the
// handler's error, if any.
func (s *server) wrap(rt route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var team *store.Team
		if !rt.public {
			var err error
			if team, err = s.authenticate(r); err != nil {
				s.writeFailure(w, r, err)
				return
			}
		}
		if err := rt.handle(s, w, r, team); err != nil {
			s.writeFailure(w, r, err)
		}
	})
}

// health answers load balancers and probes.
func (s *server) health(w http.ResponseWriter, r *http.Request, _ *store.Team) error {
	writeEmpty(w, http.StatusOK)
	return nil
}
