package files

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/reply"
)

// download answers GET /files: the file's bytes, identity-coded with an exact
// Content-Length (Range and conditional requests work), or gzip-coded when the
// client prefers it.
func (h *Handler) download(w http.ResponseWriter, r *http.Request, user *identity.User) {
	raw := r.URL.Query().Get("path")
	path, err := user.Resolve(raw, h.state.DefaultWorkdir())
	if err != nil {
		reply.Error(w, http.StatusBadRequest, "error resolving path '%s': %v", raw, err)
		return
	}
	accept := parseAcceptEncoding(r.Header.Get("Accept-Encoding"))
	if accept.none() {
		reply.Error(w, http.StatusNotAcceptable, "no acceptable encoding found, supported: [identity, gzip]")
		return
	}

	var f *os.File
	var info fs.FileInfo
	err = user.Do(func() error {
		var err error
		f, info, err = openForRead(path, user)
		return err
	})
	if err != nil {
		h.log.Debug("files: read failed", "path", path, "user", user.Name, "err", err)
		writeError(w, err)
		return
	}
	defer f.Close()

	useGzip := accept.preferGzip()
	// Identity keeps what only it can do: an empty body with Content-Length 0
	// (the SDK's empty-file read breaks on a chunked one), and 206/304 answers
	// from http.ServeContent. Accept-Encoding is advisory, so this is allowed
	// unless identity was refused outright.
	if useGzip && accept.identity > 0 && (info.Size() == 0 || rangeOrConditional(r)) {
		useGzip = false
	}

	hd := w.Header()
	hd.Set("Content-Type", "application/octet-stream")
	hd.Set("Content-Disposition", contentDisposition(filepath.Base(path)))
	hd.Add("Vary", "Accept-Encoding")
	h.log.Debug("files: read", "path", path, "user", user.Name, "size", info.Size(), "gzip", useGzip)
	if !useGzip {
		http.ServeContent(w, r, "", info.ModTime(), f)
		return
	}
	hd.Set("Content-Encoding", "gzip")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	// BestSpeed: the link, not the ratio, is what a download waits on, and
	// default compression costs several times the CPU on large files.
	gz, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if _, err := io.Copy(gz, f); err != nil {
		// Headers are sent; the client sees a truncated gzip stream and fails.
		h.log.Debug("files: gzip download cut short", "path", path, "err", err)
		return
	}
	if err := gz.Close(); err != nil {
		h.log.Debug("files: gzip download cut short", "path", path, "err", err)
	}
}

// openForRead opens path as a regular file; run it inside user.Do so the
// user's permissions apply. It stats before opening: opening a FIFO would block.
func openForRead(path string, user *identity.User) (*os.File, fs.FileInfo, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, nil, readError(path, user, err)
	}
	if info.IsDir() {
		return nil, nil, errorf(http.StatusBadRequest, "path '%s' is a directory", path)
	}
	if !info.Mode().IsRegular() {
		return nil, nil, errorf(http.StatusBadRequest, "path '%s' is not a regular file", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, readError(path, user, err)
	}
	// The file's own stat: the size and time of what is actually sent.
	if info, err = f.Stat(); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("stat '%s': %w", path, err)
	}
	return f, info, nil
}

// readError maps a failed stat or open to the client's answer.
func readError(path string, user *identity.User, err error) error {
	switch {
	// ENOTDIR: a parent is a file, so the path cannot exist.
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		return errorf(http.StatusNotFound, "path '%s' does not exist", path)
	case errors.Is(err, fs.ErrPermission):
		return errorf(http.StatusForbidden, "permission denied: user '%s' cannot read '%s'", user.Name, path)
	case errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.ELOOP):
		return errorf(http.StatusBadRequest, "invalid path '%s': %v", path, err)
	}
	return fmt.Errorf("open '%s': %w", path, err)
}

// rangeOrConditional reports whether http.ServeContent may answer 206 or 304.
func rangeOrConditional(r *http.Request) bool {
	for _, k := range []string{"Range", "If-Range", "If-Modified-Since", "If-None-Match", "If-Match", "If-Unmodified-Since"} {
		if r.Header.Get(k) != "" {
			return true
		}
	}
	return false
}

// contentDisposition is `inline; filename="<name>"` with the quoted-string
// escapes of RFC 9110 §5.6.4.
func contentDisposition(name string) string {
	return `inline; filename="` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(name) + `"`
}
