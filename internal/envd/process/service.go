// Package process implements E2B's process.Process Connect service: starting,
// streaming, signalling and feeding processes inside the sandbox.
package process

import (
	"log/slog"

	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/state"
)

// Service implements processconnect.ProcessHandler.
type Service struct {
	processconnect.UnimplementedProcessHandler
	state *state.Sandbox
	log   *slog.Logger
}

// NewService returns the process service of a sandbox.
func NewService(st *state.Sandbox, log *slog.Logger) *Service {
	return &Service{state: st, log: log}
}

// Close stops background work; running processes are left alone.
func (s *Service) Close() {}
