// Package filesystem implements E2B's filesystem.Filesystem Connect service:
// stat, list, make, move, remove and watch, as the calling user.
package filesystem

import (
	"log/slog"

	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	"github.com/warren-sh/warren/internal/envd/state"
)

// Service implements filesystemconnect.FilesystemHandler.
type Service struct {
	filesystemconnect.UnimplementedFilesystemHandler
	state *state.Sandbox
	log   *slog.Logger
}

// NewService returns the filesystem service of a sandbox.
func NewService(st *state.Sandbox, log *slog.Logger) *Service {
	return &Service{state: st, log: log}
}

// Close stops every watcher.
func (s *Service) Close() {}
