package api

import (
	_ "embed"
	"net/http"
	"strconv"

	"github.com/warren-sh/warren/internal/store"
)

// openAPIDocument describes exactly the routes in routes(), with E2B's
// schema names, so generated clients and humans see what warren serves.
//
//go:embed openapi.yaml
var openAPIDocument []byte

func (s *server) openAPI(w http.ResponseWriter, r *http.Request, _ *store.Team) error {
	w.Header().Set("Content-Type", "application/yaml")
	w.Header().Set("Content-Length", strconv.Itoa(len(openAPIDocument)))
	w.WriteHeader(http.StatusOK)
	w.Write(openAPIDocument)
	return nil
}
