// Package filesystem implements E2B's filesystem.Filesystem Connect service:
// stat, list, make, move, remove and watch, as the calling user.
//
// Every syscall that reads or changes files runs inside identity.User.Do, so
// the kernel checks the caller's permissions and new directories belong to the
// caller (ENVD.md §4, §7).
package filesystem

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"syscall"

	"connectrpc.com/connect"

	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/state"
)

// Service implements filesystemconnect.FilesystemHandler.
type Service struct {
	filesystemconnect.UnimplementedFilesystemHandler
	state *state.Sandbox
	log   *slog.Logger

	mu       sync.Mutex
	watchers map[string]*pollWatcher // CreateWatcher's watchers by id
	closed   bool
}

// NewService returns the filesystem service of a sandbox.
func NewService(st *state.Sandbox, log *slog.Logger) *Service {
	return &Service{state: st, log: log, watchers: map[string]*pollWatcher{}}
}

// Close stops every watcher made by CreateWatcher; later CreateWatcher calls fail.
func (s *Service) Close() {
	s.mu.Lock()
	watchers := s.watchers
	s.watchers = map[string]*pollWatcher{}
	s.closed = true
	s.mu.Unlock()
	for _, w := range watchers {
		w.Close()
	}
}

// caller is the user a request acts as: its Basic-auth user name, or the
// sandbox's default user.
func (s *Service) caller(h http.Header) (*identity.User, error) {
	return identity.ForRPC(h, s.state.DefaultUser())
}

// resolve turns a request path into an absolute one for u (ENVD.md §4).
func (s *Service) resolve(u *identity.User, path string) (string, error) {
	p, err := u.Resolve(path, s.state.DefaultWorkdir())
	if err != nil {
		return "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	return p, nil
}

// pathError turns a failed filesystem call into a Connect error whose code the
// SDK maps to the right exception (ENVD.md §11): not_found makes exists() false,
// permission_denied and invalid_argument name the path.
func pathError(op, path string, err error) error {
	var connectErr *connect.Error
	if errors.As(err, &connectErr) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err // connect maps context errors to canceled / deadline_exceeded
	}
	// The path is in our message already; keep only the errno text.
	var pathErr *fs.PathError
	var linkErr *os.LinkError
	if errors.As(err, &pathErr) {
		err = pathErr.Err
	} else if errors.As(err, &linkErr) {
		err = linkErr.Err
	}
	code := connect.CodeInternal
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ENOTDIR):
		code = connect.CodeNotFound
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		code = connect.CodePermissionDenied
	case errors.Is(err, syscall.ELOOP):
		code = connect.CodeFailedPrecondition
	case errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.ENOTEMPTY):
		code = connect.CodeAlreadyExists
	case errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENAMETOOLONG):
		code = connect.CodeInvalidArgument
	case errors.Is(err, syscall.EXDEV), errors.Is(err, syscall.EROFS):
		code = connect.CodeFailedPrecondition
	}
	return connect.NewError(code, fmt.Errorf("%s '%s': %w", op, path, err))
}
