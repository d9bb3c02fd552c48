// Package files serves envd's GET and POST /files: raw file download and
// upload, authorised by the access token or a signed URL (ENVD.md §8, §9).
//
// Every filesystem syscall that depends on who asks (open, mkdir, create,
// rename, xattrs) runs inside identity.User.Do, so permission checks and the
// owner of created files are the requesting user's. Bodies stream: a 100 MiB
// upload or download never sits in memory.
package files

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/reply"
	"github.com/warren-sh/warren/internal/envd/state"
	"github.com/warren-sh/warren/internal/transfer"
)

// Handler serves /files.
type Handler struct {
	state *state.Sandbox
	log   *slog.Logger
	// transfer opens the transfer disk once, at the first framed upload.
	transfer func() (io.ReaderAt, error)
}

// NewHandler returns the /files handler of a sandbox; transfer opens its
// transfer disk (TransferDisk).
func NewHandler(st *state.Sandbox, transfer func() (io.ReaderAt, error), log *slog.Logger) *Handler {
	return &Handler{state: st, log: log, transfer: transfer}
}

// TransferDisk opens the transfer disk at path once, when first asked: with
// O_DIRECT where the file system takes it. An empty path means the guest's
// disk with the transfer serial when inVM, else no disk.
func TransferDisk(path string, inVM bool) func() (io.ReaderAt, error) {
	return sync.OnceValues(func() (io.ReaderAt, error) {
		switch {
		case path != "":
			f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
			if errors.Is(err, syscall.EINVAL) {
				f, err = os.Open(path) // tmpfs and others refuse O_DIRECT
			}
			if err != nil {
				return nil, err
			}
			return f, nil
		case inVM:
			f, err := transfer.OpenDevice("/sys/block")
			if err != nil {
				return nil, err
			}
			return f, nil
		}
		return nil, transfer.ErrNoDevice
	})
}

// ServeHTTP answers GET (and HEAD) with a file's bytes and POST by writing files.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var op string
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		op = opRead
	case http.MethodPost:
		op = opWrite
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		reply.Error(w, http.StatusMethodNotAllowed, "method %s is not allowed on /files, use GET or POST", r.Method)
		return
	}
	if err := h.authorize(r, op); err != nil {
		h.log.Debug("files: unauthorized", "method", r.Method, "path", r.URL.Query().Get("path"), "err", err)
		reply.Error(w, http.StatusUnauthorized, "%s", err.Error())
		return
	}
	user, err := h.user(r)
	if err != nil {
		h.log.Debug("files: unknown user", "method", r.Method, "err", err)
		reply.Error(w, http.StatusUnauthorized, "%s", err.Error())
		return
	}
	if op == opRead {
		h.download(w, r, user)
		return
	}
	h.upload(w, r, user)
}

// user picks the account a request acts as: ?username=, else the Basic auth
// header (as the SDK sends it), else the sandbox default (ENVD.md §4).
func (h *Handler) user(r *http.Request) (*identity.User, error) {
	if name := r.URL.Query().Get("username"); name != "" {
		u, err := identity.Lookup(name)
		if err != nil {
			return nil, fmt.Errorf("error looking up user '%s': %w", name, err)
		}
		return u, nil
	}
	u, err := identity.FromBasicAuth(r.Header.Get("Authorization"), h.state.DefaultUser())
	if err != nil {
		var unknown *identity.UnknownUserError
		if errors.As(err, &unknown) {
			return nil, fmt.Errorf("error looking up user '%s': %w", unknown.Name, err)
		}
		return nil, fmt.Errorf("error looking up user: %w", err)
	}
	return u, nil
}

// httpError is a failure with the status the client should see; its message
// is the body's "message".
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...)}
}

// writeError answers err: its own status for an httpError, 500 otherwise.
func writeError(w http.ResponseWriter, err error) {
	var he *httpError
	if errors.As(err, &he) {
		reply.Error(w, he.status, "%s", he.msg)
		return
	}
	reply.Error(w, http.StatusInternalServerError, "%s", err.Error())
}
