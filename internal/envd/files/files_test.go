package files_test

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/envd/envdtest"
)

// userUID and userGID are the test user's ids (uid 1000 as in E2B templates, when
// that was free); testDir sets them.
var userUID, userGID uint32

// userDir makes dir, owned by the test user.
func userDir(t *testing.T, dir string) {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, int(userUID), int(userGID)); err != nil {
		t.Fatal(err)
	}
}

// testDir makes a fresh directory in the test user's home, owned by the user,
// and returns its absolute path and its path relative to the home.
func testDir(t *testing.T) (abs, rel string) {
	t.Helper()
	u := envdtest.EnsureUser(t)
	abs, err := os.MkdirTemp(u.HomeDir, "files-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(abs) })
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	userUID, userGID = uint32(uid), uint32(gid)
	if err := os.Chown(abs, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(abs, 0o755); err != nil {
		t.Fatal(err)
	}
	return abs, filepath.Base(abs)
}

// response is an answer with its body read.
type response struct {
	status int
	header http.Header
	body   []byte
	// chunked reports a chunked transfer-encoding (no Content-Length).
	chunked bool
}

func do(t *testing.T, req *http.Request) response {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	chunked := len(resp.TransferEncoding) > 0 && resp.TransferEncoding[0] == "chunked"
	return response{status: resp.StatusCode, header: resp.Header, body: body, chunked: chunked}
}

func filesURL(a *envdtest.Agent, q url.Values) string {
	return a.URL + "/files?" + q.Encode()
}

// get downloads with the given extra headers. Setting Accept-Encoding
// ourselves keeps Go's transport from decoding gzip behind our back.
func get(t *testing.T, a *envdtest.Agent, q url.Values, headers map[string]string) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, filesURL(a, q), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept-Encoding", "identity")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	return do(t, req)
}

// postRaw uploads body as application/octet-stream. A body that is not a
// *bytes.Reader is sent chunked, without Content-Length.
func postRaw(t *testing.T, a *envdtest.Agent, q url.Values, body io.Reader, headers map[string]string) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, filesURL(a, q), body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	return do(t, req)
}

// part is one multipart part named "file".
type part struct {
	filename string
	data     []byte
}

// multipartBody encodes parts as the SDK does: field "file", filename as given
// (directories kept).
func multipartBody(t *testing.T, parts []part) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="file"; filename="%s"`, p.filename))
		h.Set("Content-Type", "application/octet-stream")
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(p.data)
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return mw.FormDataContentType(), buf.Bytes()
}

func postMultipart(t *testing.T, a *envdtest.Agent, q url.Values, parts []part, headers map[string]string) response {
	t.Helper()
	ct, body := multipartBody(t, parts)
	req, err := http.NewRequest(http.MethodPost, filesURL(a, q), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ct)
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	return do(t, req)
}

// entry is one element of POST /files' answer.
type entry struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Path     string            `json:"path"`
	Metadata map[string]string `json:"metadata"`
}

func entries(t *testing.T, r response) []entry {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", r.status, r.body)
	}
	var es []entry
	if err := json.Unmarshal(r.body, &es); err != nil {
		t.Fatalf("answer %s is not an entry list: %v", r.body, err)
	}
	return es
}

// wantError checks an E2B error answer: status, and a JSON body whose code is
// the status and whose message contains msg.
func wantError(t *testing.T, r response, status int, msg string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	var e struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(r.body, &e); err != nil {
		t.Fatalf("error body %q is not JSON: %v", r.body, err)
	}
	if e.Code != status || !strings.Contains(e.Message, msg) {
		t.Fatalf("error body %s, want code %d and a message containing %q", r.body, status, msg)
	}
}

// wantFile checks a file's content, owner and mode.
func wantFile(t *testing.T, path string, data []byte, uid uint32, mode os.FileMode) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("%s holds %d bytes (%.40q), want %d bytes (%.40q)", path, len(got), got, len(data), data)
	}
	wantOwner(t, path, uid, mode)
}

func wantOwner(t *testing.T, path string, uid uint32, mode os.FileMode) {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := info.Sys().(*syscall.Stat_t)
	if st.Uid != uid || info.Mode().Perm() != mode {
		t.Fatalf("%s: uid %d mode %v, want uid %d mode %v", path, st.Uid, info.Mode().Perm(), uid, mode)
	}
}

// wantEntries checks that dir holds exactly names: no temporary files left.
func wantEntries(t *testing.T, dir string, names ...string) {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, de := range des {
		got = append(got, de.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Fatalf("%s holds %q, want %q", dir, got, names)
	}
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func gzipped(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	gz.Write(data)
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// hideLength wraps r so net/http cannot know the length and sends it chunked.
func hideLength(r io.Reader) io.Reader { return io.MultiReader(r) }

func TestRoundTrip(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	dir, rel := testDir(t)
	cases := []struct {
		name string
		path string // as sent; relative paths are under the user's home
		data []byte
		// upload sends data to path and returns the answer.
		upload func(path string, data []byte) response
	}{
		{"text octet-stream", filepath.Join(dir, "a.txt"), []byte("hello, warren\n"), func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, bytes.NewReader(d), nil)
		}},
		{"10 MiB binary octet-stream chunked", filepath.Join(dir, "big.bin"), randomBytes(t, 10<<20), func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, hideLength(bytes.NewReader(d)), nil)
		}},
		{"10 MiB binary multipart", filepath.Join(dir, "big2.bin"), randomBytes(t, 10<<20), func(p string, d []byte) response {
			return postMultipart(t, a, url.Values{"path": {p}}, []part{{filename: p, data: d}}, nil)
		}},
		{"empty file", filepath.Join(dir, "empty"), []byte{}, func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, bytes.NewReader(d), nil)
		}},
		{"relative path", rel + "/rel.txt", []byte("relative"), func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, bytes.NewReader(d), nil)
		}},
		{"tilde path", "~/" + rel + "/tilde.txt", []byte("tilde"), func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, bytes.NewReader(d), nil)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			abs := tc.path
			if strings.HasPrefix(abs, "~/") {
				abs = filepath.Join(filepath.Dir(dir), abs[2:])
			} else if !filepath.IsAbs(abs) {
				abs = filepath.Join(filepath.Dir(dir), abs)
			}
			es := entries(t, tc.upload(tc.path, tc.data))
			want := entry{Name: filepath.Base(abs), Type: "file", Path: abs}
			if len(es) != 1 || es[0].Name != want.Name || es[0].Type != want.Type || es[0].Path != want.Path || es[0].Metadata != nil {
				t.Fatalf("answer %+v, want [%+v]", es, want)
			}
			wantFile(t, abs, tc.data, userUID, 0o644)

			r := get(t, a, url.Values{"path": {tc.path}}, nil)
			if r.status != http.StatusOK || !bytes.Equal(r.body, tc.data) {
				t.Fatalf("GET: status %d, %d bytes; want 200 and the %d uploaded bytes", r.status, len(r.body), len(tc.data))
			}
			if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(tc.data)) || r.chunked {
				t.Fatalf("GET: Content-Length %q (chunked %v), want %d", got, r.chunked, len(tc.data))
			}
			if got := r.header.Get("Content-Type"); got != "application/octet-stream" {
				t.Fatalf("GET: Content-Type %q", got)
			}
			if got, want := r.header.Get("Content-Disposition"), `inline; filename="`+filepath.Base(abs)+`"`; got != want {
				t.Fatalf("GET: Content-Disposition %q, want %q", got, want)
			}
		})
	}
}

func TestDownload(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	dir, _ := testDir(t)
	text := bytes.Repeat([]byte("compressible text "), 10000)
	textPath := filepath.Join(dir, "text.txt")
	emptyPath := filepath.Join(dir, "empty")
	quoted := filepath.Join(dir, `say "hi".txt`)
	for p, d := range map[string][]byte{textPath: text, emptyPath: nil, quoted: []byte("q")} {
		if err := os.WriteFile(p, d, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("identity for fetch's automatic gzip, deflate", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}}, map[string]string{"Accept-Encoding": "gzip, deflate"})
		if r.status != http.StatusOK || r.header.Get("Content-Encoding") != "" || !bytes.Equal(r.body, text) {
			t.Fatalf("status %d Content-Encoding %q, want 200 identity with the file", r.status, r.header.Get("Content-Encoding"))
		}
	})
	t.Run("gzip when asked for", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}}, map[string]string{"Accept-Encoding": "gzip"})
		if r.status != http.StatusOK || r.header.Get("Content-Encoding") != "gzip" {
			t.Fatalf("status %d Content-Encoding %q, want 200 gzip", r.status, r.header.Get("Content-Encoding"))
		}
		gz, err := gzip.NewReader(bytes.NewReader(r.body))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(gz)
		if err != nil || !bytes.Equal(got, text) {
			t.Fatalf("decoded %d bytes (err %v), want the %d bytes of the file", len(got), err, len(text))
		}
		if len(r.body) >= len(text) {
			t.Fatalf("gzip answer is %d bytes for %d compressible bytes", len(r.body), len(text))
		}
	})
	t.Run("empty file with gzip accepted is identity with Content-Length 0", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {emptyPath}}, map[string]string{"Accept-Encoding": "gzip"})
		if r.status != http.StatusOK || r.header.Get("Content-Length") != "0" || r.chunked ||
			r.header.Get("Content-Encoding") != "" || len(r.body) != 0 {
			t.Fatalf("status %d Content-Length %q chunked %v Content-Encoding %q body %d bytes; want 200, 0, identity",
				r.status, r.header.Get("Content-Length"), r.chunked, r.header.Get("Content-Encoding"), len(r.body))
		}
	})
	t.Run("range request is identity", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}}, map[string]string{"Accept-Encoding": "gzip", "Range": "bytes=5-9"})
		if r.status != http.StatusPartialContent || r.header.Get("Content-Encoding") != "" || string(r.body) != string(text[5:10]) {
			t.Fatalf("status %d Content-Encoding %q body %q, want 206 identity %q", r.status, r.header.Get("Content-Encoding"), r.body, text[5:10])
		}
	})
	t.Run("no acceptable encoding", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}}, map[string]string{"Accept-Encoding": "identity;q=0, br"})
		wantError(t, r, http.StatusNotAcceptable, "no acceptable encoding found, supported: [identity, gzip]")
	})
	t.Run("gzip only", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}}, map[string]string{"Accept-Encoding": "identity;q=0, gzip"})
		if r.status != http.StatusOK || r.header.Get("Content-Encoding") != "gzip" {
			t.Fatalf("status %d Content-Encoding %q, want 200 gzip", r.status, r.header.Get("Content-Encoding"))
		}
	})
	t.Run("quotes in the name are escaped", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {quoted}}, nil)
		if got, want := r.header.Get("Content-Disposition"), `inline; filename="say \"hi\".txt"`; got != want {
			t.Fatalf("Content-Disposition %q, want %q", got, want)
		}
	})
	t.Run("missing file", func(t *testing.T) {
		p := filepath.Join(dir, "nope.txt")
		r := get(t, a, url.Values{"path": {p}}, nil)
		want := fmt.Sprintf(`{"code":404,"message":"path '%s' does not exist"}`, p)
		if r.status != http.StatusNotFound || string(r.body) != want || r.header.Get("Content-Type") != "application/json" {
			t.Fatalf("status %d body %s, want 404 %s", r.status, r.body, want)
		}
	})
	t.Run("directory", func(t *testing.T) {
		wantError(t, get(t, a, url.Values{"path": {dir}}, nil), http.StatusBadRequest, fmt.Sprintf("path '%s' is a directory", dir))
	})
	t.Run("permission denied for the user", func(t *testing.T) {
		wantError(t, get(t, a, url.Values{"path": {secret}}, nil), http.StatusForbidden, "permission denied")
	})
	t.Run("root reads what the user cannot", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {secret}, "username": {"root"}}, nil)
		if r.status != http.StatusOK || string(r.body) != "root only" {
			t.Fatalf("status %d body %q, want 200 %q", r.status, r.body, "root only")
		}
	})
	t.Run("user from Basic auth", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {secret}}, map[string]string{"Authorization": envdtest.BasicAuth("root")})
		if r.status != http.StatusOK {
			t.Fatalf("status %d body %s, want 200", r.status, r.body)
		}
	})
	t.Run("unknown user", func(t *testing.T) {
		r := get(t, a, url.Values{"path": {textPath}, "username": {"no-such-user"}}, nil)
		wantError(t, r, http.StatusUnauthorized, "error looking up user 'no-such-user'")
	})
}

func TestUpload(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	dir, rel := testDir(t)

	t.Run("gzip octet-stream", func(t *testing.T) {
		p := filepath.Join(dir, "gz.txt")
		data := bytes.Repeat([]byte("zip me "), 5000)
		r := postRaw(t, a, url.Values{"path": {p}}, bytes.NewReader(gzipped(t, data)), map[string]string{"Content-Encoding": "gzip"})
		entries(t, r)
		wantFile(t, p, data, userUID, 0o644)
	})
	t.Run("octet-stream without path", func(t *testing.T) {
		r := postRaw(t, a, url.Values{}, strings.NewReader("x"), nil)
		wantError(t, r, http.StatusBadRequest, "path query parameter is required")
	})
	t.Run("multipart single part to path", func(t *testing.T) {
		p := filepath.Join(dir, "single.txt")
		r := postMultipart(t, a, url.Values{"path": {p}}, []part{{filename: "ignored/name.txt", data: []byte("single")}}, nil)
		es := entries(t, r)
		if len(es) != 1 || es[0].Path != p || es[0].Name != "single.txt" {
			t.Fatalf("answer %+v, want one entry for %s", es, p)
		}
		wantFile(t, p, []byte("single"), userUID, 0o644)
		if _, err := os.Stat(filepath.Join(dir, "ignored")); !os.IsNotExist(err) {
			t.Fatalf("the part's filename was used although ?path= was given")
		}
	})
	t.Run("multipart batch, filenames are targets", func(t *testing.T) {
		absTarget := filepath.Join(dir, "batch", "abs", "c.txt")
		r := postMultipart(t, a, url.Values{}, []part{
			{filename: rel + "/batch/data/b.txt", data: []byte("bee")},
			{filename: absTarget, data: []byte("sea")},
		}, nil)
		es := entries(t, r)
		relTarget := filepath.Join(dir, "batch", "data", "b.txt")
		if len(es) != 2 || es[0].Path != relTarget || es[0].Name != "b.txt" || es[1].Path != absTarget || es[1].Name != "c.txt" {
			t.Fatalf("answer %+v, want %s then %s", es, relTarget, absTarget)
		}
		wantFile(t, relTarget, []byte("bee"), userUID, 0o644)
		wantFile(t, absTarget, []byte("sea"), userUID, 0o644)
		// Parents are created as the user, 0755.
		for _, d := range []string{filepath.Join(dir, "batch"), filepath.Join(dir, "batch", "data"), filepath.Join(dir, "batch", "abs")} {
			wantOwner(t, d, userUID, 0o755)
		}
	})
	t.Run("multipart duplicate targets write nothing", func(t *testing.T) {
		r := postMultipart(t, a, url.Values{}, []part{
			{filename: filepath.Join(dir, "dup", "x.txt"), data: []byte("one")},
			{filename: rel + "/dup/x.txt", data: []byte("two")},
		}, nil)
		wantError(t, r, http.StatusBadRequest, "same path")
		if _, err := os.Stat(filepath.Join(dir, "dup")); !os.IsNotExist(err) {
			t.Fatalf("dup/ is left behind after a refused upload (stat: %v)", err)
		}
	})
	t.Run("malformed multipart leaves nothing behind", func(t *testing.T) {
		target := filepath.Join(dir, "malformed", "m.txt")
		ct, body := multipartBody(t, []part{{filename: target, data: bytes.Repeat([]byte("m"), 100000)}})
		// Cut the body in the middle of the part: no closing boundary.
		req, _ := http.NewRequest(http.MethodPost, filesURL(a, url.Values{}), bytes.NewReader(body[:len(body)/2]))
		req.Header.Set("Content-Type", ct)
		wantError(t, do(t, req), http.StatusBadRequest, "read upload body")
		if _, err := os.Stat(filepath.Dir(target)); !os.IsNotExist(err) {
			t.Fatalf("malformed/ is left behind (stat: %v)", err)
		}
	})
	t.Run("malformed multipart into existing dir leaves no temp file", func(t *testing.T) {
		sub := filepath.Join(dir, "keep")
		userDir(t, sub)
		ct, body := multipartBody(t, []part{{filename: filepath.Join(sub, "m.txt"), data: bytes.Repeat([]byte("m"), 100000)}})
		req, _ := http.NewRequest(http.MethodPost, filesURL(a, url.Values{}), bytes.NewReader(body[:len(body)-20]))
		req.Header.Set("Content-Type", ct)
		wantError(t, do(t, req), http.StatusBadRequest, "read upload body")
		wantEntries(t, sub)
	})
	t.Run("second part failing removes the first", func(t *testing.T) {
		sub := filepath.Join(dir, "second")
		userDir(t, sub)
		r := postMultipart(t, a, url.Values{}, []part{
			{filename: filepath.Join(sub, "first.txt"), data: []byte("1")},
			{filename: sub, data: []byte("2")}, // a directory
		}, nil)
		wantError(t, r, http.StatusBadRequest, "is a directory")
		wantEntries(t, sub)
	})
	t.Run("multipart part without filename or path", func(t *testing.T) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		fw, _ := mw.CreateFormField("file")
		fw.Write([]byte("nameless"))
		mw.Close()
		req, _ := http.NewRequest(http.MethodPost, filesURL(a, url.Values{}), &buf)
		req.Header.Set("Content-Type", mw.FormDataContentType())
		wantError(t, do(t, req), http.StatusBadRequest, "has no filename")
	})
	t.Run("other user's home is not a path", func(t *testing.T) {
		wantError(t, postRaw(t, a, url.Values{"path": {"~root/x"}}, strings.NewReader("x"), nil), http.StatusBadRequest, "~root/x")
	})
	t.Run("target is a directory", func(t *testing.T) {
		wantError(t, postRaw(t, a, url.Values{"path": {dir}}, strings.NewReader("x"), nil), http.StatusBadRequest, "is a directory")
		r := postMultipart(t, a, url.Values{"path": {dir}}, []part{{filename: "x", data: []byte("x")}}, nil)
		wantError(t, r, http.StatusBadRequest, "is a directory")
	})
	t.Run("parent is a file", func(t *testing.T) {
		f := filepath.Join(dir, "plain")
		os.WriteFile(f, []byte("p"), 0o644)
		wantError(t, postRaw(t, a, url.Values{"path": {f + "/x"}}, strings.NewReader("x"), nil), http.StatusBadRequest, "not a directory")
	})
	t.Run("replace an existing file", func(t *testing.T) {
		p := filepath.Join(dir, "replace.txt")
		entries(t, postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("a longer first version"), nil))
		entries(t, postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v2"), nil))
		wantFile(t, p, []byte("v2"), userUID, 0o644)
	})
	t.Run("as root", func(t *testing.T) {
		p := filepath.Join(dir, "rootdir", "root.txt")
		entries(t, postRaw(t, a, url.Values{"path": {p}, "username": {"root"}}, strings.NewReader("r"), nil))
		wantFile(t, p, []byte("r"), 0, 0o644)
		wantOwner(t, filepath.Dir(p), 0, 0o755)
	})
	t.Run("user cannot write into root's directory", func(t *testing.T) {
		p := filepath.Join(dir, "rootdir", "user.txt")
		wantError(t, postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("u"), nil), http.StatusForbidden, "permission denied")
		wantEntries(t, filepath.Dir(p), "root.txt")
	})
	t.Run("unknown user", func(t *testing.T) {
		p := filepath.Join(dir, "unknown.txt")
		r := postRaw(t, a, url.Values{"path": {p}, "username": {"no-such-user"}}, strings.NewReader("x"), nil)
		wantError(t, r, http.StatusUnauthorized, "error looking up user 'no-such-user'")
	})
	t.Run("unsupported content type", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, filesURL(a, url.Values{"path": {filepath.Join(dir, "ct")}}), strings.NewReader("x"))
		req.Header.Set("Content-Type", "text/plain")
		wantError(t, do(t, req), http.StatusBadRequest, "unsupported Content-Type")
	})
}

func getxattr(t *testing.T, path, name string) (string, bool) {
	t.Helper()
	buf := make([]byte, 8192)
	n, err := unix.Getxattr(path, name, buf)
	if err == unix.ENODATA {
		return "", false
	}
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", path, name, err)
	}
	return string(buf[:n]), true
}

func TestMetadata(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	dir, _ := testDir(t)
	p := filepath.Join(dir, "meta.txt")

	r := postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v1"), map[string]string{
		"X-Metadata-Author": "mish", "X-Metadata-Purpose": "a test, with spaces",
	})
	es := entries(t, r)
	if len(es) != 1 || len(es[0].Metadata) != 2 || es[0].Metadata["author"] != "mish" || es[0].Metadata["purpose"] != "a test, with spaces" {
		t.Fatalf("answer %+v, want metadata author and purpose", es)
	}
	if v, ok := getxattr(t, p, "user.e2b.author"); !ok || v != "mish" {
		t.Fatalf("user.e2b.author = %q (%v), want mish", v, ok)
	}
	if v, _ := getxattr(t, p, "user.e2b.purpose"); v != "a test, with spaces" {
		t.Fatalf("user.e2b.purpose = %q", v)
	}

	t.Run("answer without metadata has no metadata key", func(t *testing.T) {
		q := filepath.Join(dir, "plain.txt")
		r := postRaw(t, a, url.Values{"path": {q}}, strings.NewReader("x"), nil)
		if want := fmt.Sprintf(`[{"name":"plain.txt","type":"file","path":"%s"}]`, q); string(r.body) != want {
			t.Fatalf("answer %s, want %s", r.body, want)
		}
	})
	t.Run("invalid value is refused and the file untouched", func(t *testing.T) {
		r := postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v-bad"), map[string]string{"X-Metadata-Author": "mïsh"})
		wantError(t, r, http.StatusBadRequest, "printable ASCII")
		wantFile(t, p, []byte("v1"), userUID, 0o644)
		if v, _ := getxattr(t, p, "user.e2b.author"); v != "mish" {
			t.Fatalf("user.e2b.author = %q after a refused upload, want mish", v)
		}
	})
	t.Run("key too long", func(t *testing.T) {
		r := postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v-bad"), map[string]string{"X-Metadata-" + strings.Repeat("k", 247): "v"})
		wantError(t, r, http.StatusBadRequest, "at most 246")
		wantFile(t, p, []byte("v1"), userUID, 0o644)
	})
	t.Run("too much metadata", func(t *testing.T) {
		h := map[string]string{}
		for i := range 5 {
			h[fmt.Sprintf("X-Metadata-K%d", i)] = strings.Repeat("v", 1000)
		}
		wantError(t, postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v-bad"), h), http.StatusBadRequest, "at most 4096")
	})
	t.Run("re-upload replaces", func(t *testing.T) {
		r := postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v2"), map[string]string{"X-Metadata-Owner": "ops"})
		if es := entries(t, r); es[0].Metadata["owner"] != "ops" || len(es[0].Metadata) != 1 {
			t.Fatalf("answer %+v, want only owner=ops", es)
		}
		if v, _ := getxattr(t, p, "user.e2b.owner"); v != "ops" {
			t.Fatalf("user.e2b.owner = %q, want ops", v)
		}
		if _, ok := getxattr(t, p, "user.e2b.author"); ok {
			t.Fatalf("user.e2b.author survived a re-upload without it")
		}
	})
	t.Run("re-upload without metadata clears", func(t *testing.T) {
		entries(t, postRaw(t, a, url.Values{"path": {p}}, strings.NewReader("v3"), nil))
		if _, ok := getxattr(t, p, "user.e2b.owner"); ok {
			t.Fatalf("user.e2b.owner survived a re-upload without metadata")
		}
	})
	t.Run("repeated header takes the first value", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, filesURL(a, url.Values{"path": {p}}), strings.NewReader("v4"))
		req.Header.Set("Content-Type", "application/octet-stream")
		req.Header.Add("X-Metadata-Tag", "first")
		req.Header.Add("X-Metadata-Tag", "second")
		entries(t, do(t, req))
		if v, _ := getxattr(t, p, "user.e2b.tag"); v != "first" {
			t.Fatalf("user.e2b.tag = %q, want first", v)
		}
	})
	t.Run("every file of a multipart upload gets it", func(t *testing.T) {
		r := postMultipart(t, a, url.Values{}, []part{
			{filename: filepath.Join(dir, "m1"), data: []byte("1")},
			{filename: filepath.Join(dir, "m2"), data: []byte("2")},
		}, map[string]string{"X-Metadata-Batch": "yes"})
		entries(t, r)
		for _, f := range []string{"m1", "m2"} {
			if v, _ := getxattr(t, filepath.Join(dir, f), "user.e2b.batch"); v != "yes" {
				t.Fatalf("%s: user.e2b.batch = %q, want yes", f, v)
			}
		}
	})
}

// sign computes a URL signature as the SDK does (ENVD.md §9).
func sign(path, op, username, token, expiration string) string {
	raw := strings.Join([]string{path, op, username, token}, ":")
	if expiration != "" {
		raw += ":" + expiration
	}
	sum := sha256.Sum256([]byte(raw))
	return "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
}

func TestAccess(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	const token = "tok"
	if status := a.Init(t, map[string]any{"accessToken": token}, nil); status != http.StatusNoContent {
		t.Fatalf("/init: status %d", status)
	}
	dir, _ := testDir(t)
	p := filepath.Join(dir, "signed.txt")
	if err := os.WriteFile(p, []byte("signed"), 0o644); err != nil {
		t.Fatal(err)
	}
	const unauthorized = "unauthorized access, please provide a valid access token or method signing if supported"
	future := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	past := strconv.FormatInt(time.Now().Add(-time.Minute).Unix(), 10)

	read := func(q url.Values, h map[string]string) response { return get(t, a, q, h) }
	write := func(q url.Values, h map[string]string) response {
		return postRaw(t, a, q, strings.NewReader("written"), h)
	}
	target := filepath.Join(dir, "w.txt")
	cases := []struct {
		name    string
		send    func(url.Values, map[string]string) response
		query   url.Values
		headers map[string]string
		status  int
		message string // contained in the error message
	}{
		{"read without token or signature", read, url.Values{"path": {p}}, nil, 401, "missing signature query parameter"},
		{"write without token or signature", write, url.Values{"path": {target}}, nil, 401, "missing signature query parameter"},
		{"read with wrong token", read, url.Values{"path": {p}}, map[string]string{"X-Access-Token": "nope"}, 401, unauthorized},
		{"read with token", read, url.Values{"path": {p}}, map[string]string{"X-Access-Token": token}, 200, ""},
		{"write with token", write, url.Values{"path": {target}}, map[string]string{"X-Access-Token": token}, 200, ""},
		{"signed read", read, url.Values{"path": {p}, "signature": {sign(p, "read", "", token, "")}}, nil, 200, ""},
		{"signed write", write, url.Values{"path": {target}, "signature": {sign(target, "write", "", token, "")}}, nil, 200, ""},
		{"signed read with username", read, url.Values{"path": {p}, "username": {"user"}, "signature": {sign(p, "read", "user", token, "")}}, nil, 200, ""},
		{"signed read expiring later", read, url.Values{"path": {p}, "signature_expiration": {future}, "signature": {sign(p, "read", "", token, future)}}, nil, 200, ""},
		{"signed write expiring later", write, url.Values{"path": {target}, "signature_expiration": {future}, "signature": {sign(target, "write", "", token, future)}}, nil, 200, ""},
		{"read signature used to write", write, url.Values{"path": {target}, "signature": {sign(target, "read", "", token, "")}}, nil, 401, "invalid signature"},
		{"tampered signature", read, url.Values{"path": {p}, "signature": {sign(p, "read", "", token, "") + "x"}}, nil, 401, "invalid signature"},
		{"signature for another path", read, url.Values{"path": {p}, "signature": {sign(target, "read", "", token, "")}}, nil, 401, "invalid signature"},
		{"signature for another user", read, url.Values{"path": {p}, "username": {"root"}, "signature": {sign(p, "read", "user", token, "")}}, nil, 401, "invalid signature"},
		{"expiration changed after signing", read, url.Values{"path": {p}, "signature_expiration": {future + "0"}, "signature": {sign(p, "read", "", token, future)}}, nil, 401, "invalid signature"},
		{"wrong token header beats a valid signature", read, url.Values{"path": {p}, "signature": {sign(p, "read", "", token, "")}}, map[string]string{"X-Access-Token": "nope"}, 401, unauthorized},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.send(tc.query, tc.headers)
			if tc.status == http.StatusOK {
				if r.status != http.StatusOK {
					t.Fatalf("status %d body %s, want 200", r.status, r.body)
				}
				return
			}
			wantError(t, r, tc.status, tc.message)
		})
	}
	t.Run("expired signature has the exact body", func(t *testing.T) {
		r := read(url.Values{"path": {p}, "signature_expiration": {past}, "signature": {sign(p, "read", "", token, past)}}, nil)
		if want := `{"code":401,"message":"signature is already expired"}`; r.status != 401 || string(r.body) != want {
			t.Fatalf("status %d body %s, want 401 %s", r.status, r.body, want)
		}
	})
}

func TestDiskFull(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	dir, _ := testDir(t)
	mnt := filepath.Join(dir, "tiny")
	userDir(t, mnt)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=1m,mode=0755,uid=%d,gid=%d", userUID, userGID), "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v\n%s", err, out)
	}
	// Registered after testDir's cleanup, so it runs first: unmount, then remove.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})

	cases := []struct {
		name   string
		upload func(p string, data []byte) response
	}{
		{"octet-stream", func(p string, d []byte) response {
			return postRaw(t, a, url.Values{"path": {p}}, hideLength(bytes.NewReader(d)), nil)
		}},
		{"multipart", func(p string, d []byte) response {
			return postMultipart(t, a, url.Values{}, []part{{filename: p, data: d}}, nil)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.upload(filepath.Join(mnt, "big.bin"), randomBytes(t, 2<<20))
			wantError(t, r, http.StatusInsufficientStorage, "not enough disk space available")
			wantEntries(t, mnt)
		})
	}
}
