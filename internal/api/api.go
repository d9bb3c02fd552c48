// Package api serves E2B's REST control-plane API (REST.md) over the
// controller: authentication by X-API-Key, request validation, E2B's JSON
// shapes and error bodies, paging cursors, CORS and the served OpenAPI
// document.
//
// Every route is one row of the table in routes.go; New registers exactly
// those rows and openapi.yaml documents exactly those rows (a test holds the
// two equal).
package api

import (
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
)

// Config wires the API handler.
type Config struct {
	Control *control.Controller
	Store   store.Store
	Log     *slog.Logger
	// Domain is reported to clients as the sandboxes' base domain (E2B_DOMAIN
	// for host routing); empty reports null and clients keep their own.
	Domain string
	// MaxBodyBytes caps request bodies (default 1 MiB); larger ones get 413.
	// Uploads have their own limit (control.TemplatesConfig.MaxUploadBytes).
	MaxBodyBytes int64
	// Templates runs template builds; nil answers their routes 503.
	Templates *control.Templates
}

// defaultMaxBodyBytes is far above any create body (metadata and env vars of
// a few KiB) and far below what could hurt the process.
const defaultMaxBodyBytes = 1 << 20

// clientID is E2B's deprecated client identifier, still required in
// responses and accepted as a "<sandboxID>-<clientID>" suffix.
const clientID = "6532622b"

// server holds what every handler needs.
type server struct {
	cfg     Config
	control *control.Controller
	store   store.Store
	log     *slog.Logger
	mux     *http.ServeMux

	touchMu sync.Mutex
	touched map[string]time.Time // API key ID → last recorded use

	ownBody map[string]bool // mux patterns of routes that limit their own body
}

// New returns the E2B REST API handler.
func New(cfg Config) http.Handler {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = defaultMaxBodyBytes
	}
	s := &server{
		cfg: cfg, control: cfg.Control, store: cfg.Store, log: cfg.Log,
		mux: http.NewServeMux(), touched: map[string]time.Time{}, ownBody: map[string]bool{},
	}
	for _, rt := range routes() {
		s.mux.Handle(rt.muxPattern(), s.wrap(rt))
		if rt.ownBody {
			s.ownBody[rt.muxPattern()] = true
		}
	}
	return s
}

// ServeHTTP answers CORS preflights, limits the body and routes the request;
// requests no route matches get E2B's JSON error body rather than the mux's
// plain text.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	setCORS(w.Header(), r)
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	h, pattern := s.mux.Handler(r)
	if !s.ownBody[pattern] {
		if r.ContentLength > s.cfg.MaxBodyBytes {
			writeError(w, http.StatusRequestEntityTooLarge, tooLargeMessage(s.cfg.MaxBodyBytes))
			return
		}
		// Chunked bodies (the SDK's fetch streams them without Content-Length)
		// are cut off here when they grow too large.
		r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
	}
	if pattern == "" {
		// No route: h is the mux's 404, 405 (with Allow) or redirect.
		rec := &headerRecorder{header: http.Header{}}
		h.ServeHTTP(rec, r)
		switch rec.status {
		case http.StatusMethodNotAllowed:
			w.Header().Set("Allow", rec.header.Get("Allow"))
			writeError(w, rec.status, "Method "+r.Method+" is not allowed on "+r.URL.Path)
		case http.StatusNotFound:
			writeError(w, rec.status, "Not found: "+r.Method+" "+r.URL.Path)
		default:
			h.ServeHTTP(w, r)
		}
		return
	}
	s.mux.ServeHTTP(w, r)
}

// headerRecorder keeps the status and headers of the mux's own answers.
type headerRecorder struct {
	header http.Header
	status int
}

func (h *headerRecorder) Header() http.Header         { return h.header }
func (h *headerRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (h *headerRecorder) WriteHeader(status int)      { h.status = status }

// corsAllowHeaders are the headers the browser SDK sends (REST.md §1).
const corsAllowHeaders = "Content-Type, X-API-Key, Authorization, X-Team-ID, " +
	"browser, lang, lang_version, package_version, publisher, sdk_runtime, system"

// setCORS lets the browser SDK call the API from any origin: authentication
// is a header, never a cookie, so no origin gains anything it lacks.
func setCORS(h http.Header, r *http.Request) {
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Expose-Headers", "X-Next-Token, X-Total-Running, Retry-After")
	if r.Method != http.MethodOptions {
		return
	}
	h.Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
	// Echo what the browser asks for: the user may add headers of their own
	// (the SDK's apiHeaders option).
	if asked := r.Header.Get("Access-Control-Request-Headers"); asked != "" {
		h.Set("Access-Control-Allow-Headers", asked)
	} else {
		h.Set("Access-Control-Allow-Headers", corsAllowHeaders)
	}
	h.Set("Access-Control-Max-Age", "86400")
}

// sandboxIDParam is the {sandboxID} path value with a legacy
// "-<clientID>" suffix dropped (REST.md §2).
func sandboxIDParam(r *http.Request) string {
	id, _, _ := strings.Cut(r.PathValue("sandboxID"), "-")
	return id
}
