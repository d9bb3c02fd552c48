package files

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/reply"
	"github.com/warren-sh/warren/internal/formdata"
	"github.com/warren-sh/warren/internal/transfer"
)

// entry is one written file in the answer to POST /files. The SDK deep-equals
// the three-key form, so metadata appears only when there is some.
type entry struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Path     string            `json:"path"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// upload answers POST /files: a multipart body (one part to ?path=, or parts
// whose filenames are their targets) or a raw application/octet-stream body to
// ?path=. Files are staged as temporary files beside their targets and renamed
// into place only once the whole body has been read, so a failed request
// leaves no partial file behind.
func (h *Handler) upload(w http.ResponseWriter, r *http.Request, user *identity.User) {
	// Validated first: a bad header must not cost a written file.
	md, err := parseMetadata(r.Header)
	if err != nil {
		writeError(w, err)
		return
	}
	body, err := decodedBody(r)
	if err != nil {
		writeError(w, err)
		return
	}
	path := r.URL.Query().Get("path")
	b := &batch{user: user, workdir: h.state.DefaultWorkdir(), metadata: md}
	defer b.abort()

	contentType := r.Header.Get("Content-Type")
	mediaType, params, _ := mime.ParseMediaType(contentType)
	switch {
	case mediaType == "application/octet-stream":
		if path == "" {
			err = errorf(http.StatusBadRequest, "the path query parameter is required for an application/octet-stream upload")
			break
		}
		err = b.add(path, body)
	case strings.HasPrefix(mediaType, "multipart/"):
		if params["boundary"] == "" {
			err = errorf(http.StatusBadRequest, "Content-Type %q has no boundary", contentType)
			break
		}
		err = b.addParts(formdata.NewReader(body, params["boundary"]), path)
	case mediaType == transfer.ContentType:
		err = h.addTransfer(b, body, path)
	default:
		err = errorf(http.StatusBadRequest, "unsupported Content-Type %q, expected multipart/form-data or application/octet-stream", contentType)
	}
	if err == nil {
		err = b.commit()
	}
	if err != nil {
		h.log.Debug("files: write failed", "path", path, "user", user.Name, "err", err)
		writeError(w, err)
		return
	}
	entries := make([]entry, 0, len(b.files))
	for _, f := range b.files {
		entries = append(entries, entry{Name: filepath.Base(f.target), Type: "file", Path: f.target, Metadata: f.metadata})
		h.log.Debug("files: wrote", "path", f.target, "user", user.Name, "metadata", len(f.metadata))
	}
	reply.JSON(w, http.StatusOK, entries)
}

// decodedBody is the request body with its Content-Encoding (gzip) undone.
func decodedBody(r *http.Request) (io.Reader, error) {
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
		return r.Body, nil
	case "gzip", "x-gzip":
		gz, err := gzip.NewReader(r.Body)
		if err != nil {
			return nil, errorf(http.StatusBadRequest, "body is not valid gzip (Content-Encoding: gzip): %v", err)
		}
		return gz, nil
	default:
		return nil, errorf(http.StatusBadRequest, "unsupported Content-Encoding %q, supported: identity, gzip", enc)
	}
}

// batch is the files of one upload, staged until commit.
type batch struct {
	user     *identity.User
	workdir  string
	metadata map[string]string
	files    []*staged
	dirs     []string // directories this upload created, parents first
	done     bool
}

// staged is one file written to a temporary name beside its destination.
type staged struct {
	target   string // the resolved path, as the client is told
	dest     string // target with symlinks resolved: writing through a link, as open(2) would
	temp     string // "" once renamed into place
	metadata map[string]string
}

// addParts stages every part named "file". Without a path, a part's filename
// (directories included) is its target.
func (b *batch) addParts(mr *formdata.Reader, path string) error {
	for n := 1; ; n++ {
		part, err := mr.NextPart()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return errorf(http.StatusBadRequest, "malformed multipart body at part %d: %v", n, err)
		}
		if part.FormName() != "file" {
			continue // NextPart skips what is left of it
		}
		name := ""
		if path == "" {
			if name, err = part.FileName(); err != nil {
				return errorf(http.StatusBadRequest, "part %d: %v", n, err)
			}
		}
		target, err := partTarget(path, name, n)
		if err != nil {
			return err
		}
		if err := b.add(target, part); err != nil {
			return err
		}
	}
}

// addTransfer stages the files of a framed body (package transfer: what
// warren's proxy makes of a multipart or octet-stream upload, the bytes on the
// transfer disk). Each file goes where a multipart part would: to path when
// given, else to its name.
func (h *Handler) addTransfer(b *batch, body io.Reader, path string) error {
	dev, err := h.transfer()
	if errors.Is(err, transfer.ErrNoDevice) {
		return errorf(http.StatusBadRequest, "Content-Type %s needs a transfer disk, and this sandbox has none", transfer.ContentType)
	}
	if err != nil {
		return fmt.Errorf("open the transfer disk: %w", err)
	}
	r := transfer.NewReader(body, dev)
	for n := 1; ; n++ {
		name, err := r.NextFile()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return bodyError("", err)
		}
		target, err := partTarget(path, name, n)
		if err != nil {
			return err
		}
		if err := b.add(target, r); err != nil {
			return err
		}
	}
}

// partTarget is where part n of a multipart (or framed) body goes: to path
// when the request gave one, else to the part's filename, its name.
func partTarget(path, name string, n int) (string, error) {
	switch {
	case path != "":
		return path, nil
	case name != "":
		return name, nil
	}
	return "", errorf(http.StatusBadRequest, "part %d has no filename and the request no path query parameter: nowhere to write it", n)
}

// bodyError is the answer to a request body that could not be read while
// writing target ("" between files): 400, but 500 when the transfer disk
// failed, and the sender's own message when the proxy stopped the body.
func bodyError(target string, err error) error {
	var sender *transfer.SenderError
	switch {
	case errors.As(err, &sender):
		return errorf(http.StatusBadRequest, "%s", sender.Message)
	case errors.Is(err, transfer.ErrDisk):
		return err
	case target == "":
		return errorf(http.StatusBadRequest, "read upload body: %v", err)
	}
	return errorf(http.StatusBadRequest, "read upload body for '%s': %v", target, err)
}

// add stages src as the file raw (a path as the client gave it).
func (b *batch) add(raw string, src io.Reader) error {
	target, err := b.user.Resolve(raw, b.workdir)
	if err != nil {
		return errorf(http.StatusBadRequest, "error resolving path '%s': %v", raw, err)
	}
	for _, f := range b.files {
		if f.target == target {
			return errorf(http.StatusBadRequest, "you cannot upload multiple files to the same path '%s' in one upload request", target)
		}
	}
	var f *staged
	err = b.user.Do(func() error {
		var err error
		f, err = b.stage(target, src)
		return err
	})
	if err != nil {
		return err
	}
	b.files = append(b.files, f)
	return nil
}

// stage writes src to a new temporary file in the destination's directory,
// creating missing parents. Run inside user.Do. On failure it removes the
// temporary file itself.
func (b *batch) stage(target string, src io.Reader) (*staged, error) {
	f := &staged{target: target, dest: target}
	mode := fs.FileMode(0o644)
	info, err := os.Stat(target)
	switch {
	case err == nil && info.IsDir():
		return nil, errorf(http.StatusBadRequest, "path '%s' is a directory", target)
	case err == nil && !info.Mode().IsRegular():
		return nil, errorf(http.StatusBadRequest, "path '%s' is not a regular file", target)
	case err == nil:
		// Replacing a file keeps its permission bits, as truncating it would.
		mode = info.Mode().Perm()
		if f.dest, err = filepath.EvalSymlinks(target); err != nil {
			return nil, writeFailure("resolve", target, b.user, err)
		}
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		// New file; mkdirAll reports a parent that is not a directory.
	default:
		return nil, writeFailure("stat", target, b.user, err)
	}
	dir := filepath.Dir(f.dest)
	if err := b.mkdirAll(dir); err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(dir, ".warren-upload-*")
	if err != nil {
		return nil, writeFailure("create", target, b.user, err)
	}
	f.temp = tmp.Name()
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(f.temp)
		}
	}()
	// Explicit mode: CreateTemp makes 0600 and envd's umask is not the user's concern.
	if err := tmp.Chmod(mode); err != nil {
		return nil, writeFailure("chmod", target, b.user, err)
	}
	body := &readTracker{r: src}
	if err := writeUpload(tmp, body); err != nil {
		if body.err != nil {
			return nil, bodyError(target, body.err)
		}
		return nil, writeFailure("write", target, b.user, err)
	}
	for k, v := range b.metadata {
		if err := unix.Fsetxattr(int(tmp.Fd()), xattrPrefix+k, []byte(v), 0); err != nil {
			return nil, metadataFailure(target, err)
		}
	}
	// Close reports delayed write errors (quota, network file systems).
	if err := tmp.Close(); err != nil {
		return nil, writeFailure("write", target, b.user, err)
	}
	if len(b.metadata) > 0 {
		f.metadata = b.metadata
	}
	ok = true
	return f, nil
}

// mkdirAll creates dir and its missing parents as the user, mode 0755, and
// records them so abort can take them away again. Run inside user.Do.
func (b *batch) mkdirAll(dir string) error {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		info, err := os.Stat(d)
		if err == nil {
			if !info.IsDir() {
				return errorf(http.StatusBadRequest, "cannot create '%s': '%s' is not a directory", dir, d)
			}
			break
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return writeFailure("stat", d, b.user, err)
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		d := missing[i]
		if err := os.Mkdir(d, 0o755); err != nil {
			if errors.Is(err, fs.ErrExist) {
				continue // made meanwhile by someone else; not ours to remove
			}
			return writeFailure("mkdir", d, b.user, err)
		}
		b.dirs = append(b.dirs, d)
		// Exactly 0755 whatever envd's umask is (ENVD.md §4).
		if err := os.Chmod(d, 0o755); err != nil {
			return writeFailure("chmod", d, b.user, err)
		}
	}
	return nil
}

// commit renames every staged file into place.
func (b *batch) commit() error {
	return b.user.Do(func() error {
		for _, f := range b.files {
			if err := os.Rename(f.temp, f.dest); err != nil {
				if errors.Is(err, syscall.EISDIR) || errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.ENOTEMPTY) {
					return errorf(http.StatusBadRequest, "path '%s' is a directory", f.target)
				}
				return writeFailure("rename into", f.target, b.user, err)
			}
			f.temp = ""
		}
		b.done = true
		return nil
	})
}

// abort removes what a failed upload left: staged files and the directories
// it created (only while empty). A committed upload has nothing to remove.
func (b *batch) abort() {
	if b.done || (len(b.files) == 0 && len(b.dirs) == 0) {
		return
	}
	b.user.Do(func() error {
		for _, f := range b.files {
			if f.temp != "" {
				os.Remove(f.temp)
			}
		}
		for i := len(b.dirs) - 1; i >= 0; i-- {
			os.Remove(b.dirs[i])
		}
		return nil
	})
}

// writeFailure maps a filesystem error while writing target to the client's
// answer: 507 when the disk is full (the SDK raises NotEnoughSpaceError), 403
// when the user lacks permission, 400 for unusable paths, else 500.
func writeFailure(op, target string, user *identity.User, err error) error {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return errorf(http.StatusInsufficientStorage, "not enough disk space available")
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS):
		return errorf(http.StatusForbidden, "permission denied: user '%s' cannot write '%s': %v", user.Name, target, err)
	case errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.ELOOP):
		return errorf(http.StatusBadRequest, "invalid path '%s': %v", target, err)
	}
	return fmt.Errorf("%s '%s': %w", op, target, err)
}

// metadataFailure maps a failed setxattr. ENOSPC/E2BIG here mean the file
// system's xattr space (one block on ext4) is too small for the metadata, not
// a full disk.
func metadataFailure(target string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOTSUP):
		return errorf(http.StatusBadRequest, "cannot store metadata on '%s': its file system does not support user extended attributes", target)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.E2BIG):
		return errorf(http.StatusBadRequest, "metadata does not fit in the extended attributes of '%s': %v", target, err)
	}
	return fmt.Errorf("set metadata of '%s': %w", target, err)
}

// readTracker remembers a read error, so a failed copy can tell a bad request
// body (400) from a failed write (507, 500).
type readTracker struct {
	r   io.Reader
	err error
}

func (t *readTracker) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF {
		t.err = err
	}
	return n, err
}
