package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/interpreter"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
	"github.com/warren-sh/warren/internal/version"
)

// ensureCodeInterpreter makes sure the code-interpreter-v1 template exists
// for the base build base: it builds it (template.Builder, from base plus
// internal/interpreter's server) unless that build is on disk already, then
// registers it as a public template under its global name.
func ensureCodeInterpreter(ctx context.Context, dataDir string, builder template.Builder, base *template.Artifact, st store.Store, log *slog.Logger) error {
	key := interpreter.Key(base.BuildID)
	buildID := control.BuiltinBuildID(key)
	a, err := template.LoadArtifact(template.ArtifactDir(dataDir, control.CodeInterpreterTemplateID, buildID))
	if err != nil {
		log.Info("building the template " + interpreter.Name + " (for @e2b/code-interpreter) from base")
		began := time.Now()
		a, err = builder.Build(ctx, interpreter.Request(base, control.CodeInterpreterTemplateID, buildID))
		if err != nil {
			return fmt.Errorf("build the template %s: %w", interpreter.Name, err)
		}
		log.Info("built the template "+interpreter.Name, "build", buildID, "took", time.Since(began).Round(time.Millisecond))
	}
	var diskMB int
	if fi, err := os.Stat(a.RootDisk); err == nil {
		diskMB = int(fi.Size() >> 20)
	}
	return control.EnsureBuiltinTemplate(ctx, st, control.CodeInterpreterTemplateID, interpreter.Name, control.BaseBuild{
		Key: key, Artifact: control.StoredArtifact(dataDir, a.Dir), CPUCount: a.CPUs, MemoryMB: a.MemoryMiB, DiskSizeMB: diskMB, EnvdVersion: version.EnvdVersion,
	})
}
