// Package interpreter is warren's code-interpreter-v1 template, the default
// template of the npm package @e2b/code-interpreter: the base template plus
// a code interpreter server (server.py, Python's standard library only) that
// the SDK's runCode and contexts talk to on port 49999, started with every
// sandbox of the template.
//
// E2B's own template runs a FastAPI bridge to Jupyter kernels; this server
// speaks the same wire contract (shared/compat/TEMPLATES.md §5) with a
// worker process per context in place of a Jupyter kernel, so the template
// needs no packages beyond the base template's python3. Python is the one
// language; a context keeps its variables between executions, a cell's last
// expression is its main result (with the _repr_html_ & co. forms objects
// offer), `!command` lines run in a shell, matplotlib figures come back as
// PNG results.
package interpreter

import (
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"path"

	"github.com/warren-sh/warren/internal/template"
)

//go:embed server.py
var serverSource []byte

const (
	// Name is the template's name, as the SDK asks for it.
	Name = "code-interpreter-v1"
	// Port is where the server listens in a sandbox.
	Port = 49999
	// ServerPath is where the server is in the template.
	ServerPath = "/opt/warren/code-interpreter/server.py"
	// recipe versions the steps below: bump it when they change in a way
	// the server's bytes do not show.
	recipe = 1
)

// Server is the code interpreter server's source.
func Server() []byte { return serverSource }

// Key identifies a build of the template from the base build baseBuildID:
// the same inputs give the same key.
func Key(baseBuildID string) string {
	h := sha256.New()
	fmt.Fprintf(h, "code-interpreter %d\n%s\n", recipe, baseBuildID)
	h.Write(serverSource)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// Request is the template's build from the base template's artifact base,
// as build buildID of template templateID.
func Request(base *template.Artifact, templateID, buildID string) template.BuildRequest {
	install := fmt.Sprintf("mkdir -p %s && echo %s | base64 -d > %s && chmod 0755 %s",
		path.Dir(ServerPath), base64.StdEncoding.EncodeToString(serverSource), ServerPath, ServerPath)
	return template.BuildRequest{
		TemplateID: templateID, BuildID: buildID,
		From:  template.Source{Template: base},
		Steps: []template.Step{{Type: "USER", Args: []string{"root"}}, {Type: "RUN", Args: []string{install}}, {Type: "USER", Args: []string{"user"}}},
		// As the sandbox's default user, in its home: what runCode does
		// there is the user's, as a command's would be.
		StartCmd:  "cd /home/user && exec python3 " + ServerPath,
		ReadyCmd:  fmt.Sprintf("curl -fsS http://127.0.0.1:%d/health", Port),
		CPUs:      base.CPUs,
		MemoryMiB: base.MemoryMiB,
	}
}
