// Package templatecli is the client side of warren's template build API
// (the E2B API, TEMPLATES.md §1): the Dockerfile translation, COPY file
// hashing and archives, and the REST calls that `warren template` makes. It
// behaves like `e2b template create` and the npm SDK's Template.build, so a
// template built either way hits the same server-side caches.
package templatecli

// Spec is what a template is built from: the body of
// POST /v2/templates/{templateID}/builds/{buildID} (TemplateBuildStartV2).
type Spec struct {
	// FromImage is an OCI image reference; FromTemplate a built template's
	// name or ID. Exactly one is set.
	FromImage    string `json:"fromImage,omitempty"`
	FromTemplate string `json:"fromTemplate,omitempty"`
	Steps        []Step `json:"steps"`
	// StartCmd keeps running in every sandbox of the template; ReadyCmd is
	// polled until it exits 0 before the template is snapshotted.
	StartCmd string `json:"startCmd,omitempty"`
	ReadyCmd string `json:"readyCmd,omitempty"`
	// Force ignores every cache.
	Force bool `json:"force"`
}

// Step is one build step: RUN [cmd, user?], COPY [src, dest, owner, mode]
// (with FilesHash), ENV [k1, v1, ...], WORKDIR [path], USER [name].
type Step struct {
	Type      string   `json:"type"`
	Args      []string `json:"args"`
	Force     bool     `json:"force"`
	FilesHash string   `json:"filesHash,omitempty"`
}

// String is the step as a Dockerfile-like line, for progress output.
func (s Step) String() string {
	switch s.Type {
	case "COPY":
		if len(s.Args) >= 2 {
			return "COPY " + s.Args[0] + " " + s.Args[1]
		}
	case "ENV":
		out := "ENV"
		for i := 0; i+1 < len(s.Args); i += 2 {
			out += " " + s.Args[i] + "=" + s.Args[i+1]
		}
		return out
	case "RUN":
		if len(s.Args) > 0 {
			return "RUN " + s.Args[0]
		}
	}
	out := s.Type
	for _, a := range s.Args {
		out += " " + a
	}
	return out
}
