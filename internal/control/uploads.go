package control

import (
	"compress/gzip"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// COPY steps' files (TEMPLATES.md step 2). The SDK asks whether a hash is
// present and, if not, PUTs a tar.gz to the URL it gets, without its API key:
// the URL carries a token, HMAC-signed with a key kept in the data dir,
// naming the team, template and hash and when it expires. Files are kept per
// team: <data-dir>/build-files/<teamID>/<hash>.tar.gz.

// uploadTokenTTL is how long an upload URL works: the SDK spools the archive
// before it starts the PUT.
const uploadTokenTTL = time.Hour

// hashPattern is what a files hash may look like (the SDK sends hex SHA-256);
// it becomes a file name.
var hashPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// ErrBadUploadToken is returned for an upload URL that is forged, garbled or
// expired.
var ErrBadUploadToken = errors.New("invalid or expired upload URL: ask for a new one (GET /templates/{templateID}/files/{hash})")

// Upload is what a valid upload token allows: one hash of one team's template.
type Upload struct {
	TeamID, TemplateID, Hash string
}

// loadUploadKey reads the key that signs upload tokens, creating it once.
func loadUploadKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil && len(b) >= 32 {
		return b, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("upload key: %w", err)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("upload key: %w", err)
	}
	if err := writeFileAtomic(path, key); err != nil {
		return nil, fmt.Errorf("upload key: %w", err)
	}
	return key, nil
}

// writeFileAtomic writes a private file by rename, so readers never see half.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// teamDir is a team's directory name: its ID when that is a safe file name.
func teamDir(teamID string) string {
	if hashPattern.MatchString(teamID) {
		return teamID
	}
	sum := sha256.Sum256([]byte(teamID))
	return hex.EncodeToString(sum[:16])
}

// filePath is where a team's upload of hash is kept.
func (t *Templates) filePath(teamID, hash string) string {
	return filepath.Join(t.cfg.DataDir, filesDir, teamDir(teamID), hash+".tar.gz")
}

// FileUpload says whether the team has uploaded the files with hash; if not,
// it returns a token for the upload URL.
func (t *Templates) FileUpload(ctx context.Context, team *store.Team, templateRef, hash string) (present bool, token string, err error) {
	tmpl, err := t.ownTemplate(ctx, team, templateRef)
	if err != nil {
		return false, "", err
	}
	if !hashPattern.MatchString(hash) {
		return false, "", errorf(Invalid, "Invalid files hash %q: want up to 128 letters, digits, '-' and '_' (the SDK sends hex SHA-256)", hash)
	}
	if fi, err := os.Stat(t.filePath(team.ID, hash)); err == nil && fi.Mode().IsRegular() {
		return true, "", nil
	}
	return false, t.signUpload(Upload{TeamID: team.ID, TemplateID: tmpl.ID, Hash: hash}, time.Now().Add(uploadTokenTTL)), nil
}

// signUpload makes the token of an upload: base64url(claims).base64url(mac).
func (t *Templates) signUpload(u Upload, expires time.Time) string {
	claims := strings.Join([]string{u.TeamID, u.TemplateID, u.Hash, strconv.FormatInt(expires.Unix(), 10)}, "\n")
	return base64.RawURLEncoding.EncodeToString([]byte(claims)) + "." +
		base64.RawURLEncoding.EncodeToString(t.mac(claims))
}

func (t *Templates) mac(claims string) []byte {
	m := hmac.New(sha256.New, t.uploadKey)
	m.Write([]byte("warren-upload\n" + claims))
	return m.Sum(nil)
}

// VerifyUpload checks an upload token; ErrBadUploadToken if it is not good.
func (t *Templates) VerifyUpload(token string) (*Upload, error) {
	enc, sig, ok := strings.Cut(token, ".")
	if !ok {
		return nil, ErrBadUploadToken
	}
	claims, err1 := base64.RawURLEncoding.DecodeString(enc)
	mac, err2 := base64.RawURLEncoding.DecodeString(sig)
	if err1 != nil || err2 != nil || !hmac.Equal(mac, t.mac(string(claims))) {
		return nil, ErrBadUploadToken
	}
	parts := strings.Split(string(claims), "\n")
	if len(parts) != 4 {
		return nil, ErrBadUploadToken
	}
	exp, err := strconv.ParseInt(parts[3], 10, 64)
	if err != nil || time.Now().After(time.Unix(exp, 0)) || !hashPattern.MatchString(parts[2]) {
		return nil, ErrBadUploadToken
	}
	return &Upload{TeamID: parts[0], TemplateID: parts[1], Hash: parts[2]}, nil
}

// SaveUpload stores the body of an upload: exactly size bytes (the request's
// Content-Length) of gzip data, verified as it is written. It is kept only
// when whole, by rename; a concurrent upload of the same hash is harmless.
func (t *Templates) SaveUpload(ctx context.Context, u *Upload, body io.Reader, size int64) error {
	if size > t.cfg.MaxUploadBytes {
		return errorf(Invalid, "The upload is %d bytes, more than the limit of %d", size, t.cfg.MaxUploadBytes)
	}
	dst := t.filePath(u.TeamID, u.Hash)
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return fmt.Errorf("save upload: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(dst), ".upload-*")
	if err != nil {
		return fmt.Errorf("save upload: %w", err)
	}
	defer os.Remove(f.Name()) // after the rename: a no-op
	defer f.Close()

	src := &bodyReader{r: io.LimitReader(body, size)}
	tee := io.TeeReader(src, f)
	gzErr := checkGzip(tee)
	// Whatever gzip left unread (it stops at a broken stream) is read so the
	// length check below sees the whole body.
	if _, err := io.Copy(io.Discard, tee); err != nil && src.err == nil {
		return fmt.Errorf("save upload: %w", err)
	}
	switch {
	case src.err != nil || src.n != size:
		return errorf(Invalid, "The upload ended after %d of the %d bytes its Content-Length announced", src.n, size)
	case gzErr != nil:
		return errorf(Invalid, "The upload is not a gzip archive (a tar.gz of the COPY step's files): %v", gzErr)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save upload: %w", err)
	}
	if err := os.Rename(f.Name(), dst); err != nil {
		return fmt.Errorf("save upload: %w", err)
	}
	t.log.Debug("build files uploaded", "team", u.TeamID, "template", u.TemplateID, "hash", u.Hash, "bytes", size)
	return nil
}

// checkGzip reads a whole gzip stream (every member), checking its CRCs.
func checkGzip(r io.Reader) error {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, zr)
	return err
}

// bodyReader counts what it reads and keeps the first error but EOF: a
// client that sends less than it announced.
type bodyReader struct {
	r   io.Reader
	n   int64
	err error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.n += int64(n)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}
