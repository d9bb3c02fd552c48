// Package files serves envd's GET and POST /files: raw file download and
// upload, authorised by the access token or a signed URL.
package files

import (
	"log/slog"
	"net/http"

	"github.com/warren-sh/warren/internal/envd/state"
)

// Handler serves /files.
type Handler struct {
	state *state.Sandbox
	log   *slog.Logger
}

// NewHandler returns the /files handler of a sandbox.
func NewHandler(st *state.Sandbox, log *slog.Logger) *Handler {
	return &Handler{state: st, log: log}
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	http.Error(w, "not implemented", http.StatusNotImplemented)
}
