package proxy

import (
	"bytes"
	"crypto/rand"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/envd/filesig"
)

// userDir is a temporary directory the agent's default user ("user") owns.
func userDir(t testing.TB) string {
	t.Helper()
	u := envdtest.EnsureUser(t)
	dir := t.TempDir()
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	// t.TempDir's parent is root's, 0700: let the user through to its directory.
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// signedURL is a downloadUrl/uploadUrl as the SDK builds it: the listener's
// origin, /files, and the query with the signature.
func signedURL(path, op, token, expiration string) string {
	q := url.Values{"path": {path}}
	if expiration != "" {
		q.Set("signature_expiration", expiration)
	}
	q.Set("signature", filesig.Sign(path, op, "", token, expiration))
	return "/files?" + q.Encode()
}

func TestSignedFilesURLs(t *testing.T) {
	e := newEnv(t)
	a, b := e.startSandbox(t, "filesa"), e.startSandbox(t, "filesb")
	for _, s := range []struct {
		sbx   *sandbox
		token string
	}{{a, "token-a"}, {b, "token-b"}} {
		if code := s.sbx.agent.Init(t, map[string]any{"accessToken": s.token}, nil); code != http.StatusNoContent {
			t.Fatalf("/init %s: %d", s.sbx.id, code)
		}
		e.router.add(&Target{SandboxID: s.sbx.id, Host: s.sbx.ip, EnvdToken: s.token})
	}
	// Both agents run on this host, so they share a filesystem: a request
	// routed to the wrong sandbox fails on the signature (401), not on content.
	dir := userDir(t)
	pathA, pathB := filepath.Join(dir, "a.txt"), filepath.Join(dir, "b.txt")
	if err := os.WriteFile(pathB, []byte("content of b"), 0o644); err != nil {
		t.Fatal(err)
	}
	future := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	past := strconv.FormatInt(time.Now().Add(-time.Hour).Unix(), 10)

	steps := []struct {
		name   string
		method string
		path   string
		body   string
		status int
		want   string // exact body when not empty
	}{
		{"signed upload to a", "POST", signedURL(pathA, filesig.OpWrite, "token-a", ""), "content of a", 200, ""},
		{"signed download from a", "GET", signedURL(pathA, filesig.OpRead, "token-a", future), "", 200, "content of a"},
		{"signed download from b", "GET", signedURL(pathB, filesig.OpRead, "token-b", ""), "", 200, "content of b"},
		{"expired URL reaches the agent, which refuses it", "GET", signedURL(pathB, filesig.OpRead, "token-b", past), "", 401,
			`{"code":401,"message":"signature is already expired"}`},
		{"a read signature does not route an upload", "POST", signedURL(pathA, filesig.OpRead, "token-a", ""), "x", 401,
			`{"message":"invalid signature: no running sandbox accepts it","code":401}`},
		{"signature of an unknown token", "GET", signedURL(pathA, filesig.OpRead, "token-c", ""), "", 401,
			`{"message":"invalid signature: no running sandbox accepts it","code":401}`},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			var body io.Reader
			headers := map[string]string{}
			if s.method == "POST" {
				body = bytes.NewBufferString(s.body)
				headers["Content-Type"] = "application/octet-stream"
			}
			r := e.do(t, request{method: s.method, path: s.path, body: body, headers: headers})
			if r.status != s.status || (s.want != "" && r.body != s.want) {
				t.Errorf("got %d %q, want %d %q", r.status, r.body, s.status, s.want)
			}
		})
	}
	t.Run("URL of a sandbox no longer running", func(t *testing.T) {
		e.router.remove(b.id)
		r := e.do(t, request{path: signedURL(pathB, filesig.OpRead, "token-b", "")})
		if r.status != 401 {
			t.Errorf("got %d %q, want 401", r.status, r.body)
		}
	})
}

func TestChunkedUploadToAgent(t *testing.T) {
	e := newEnv(t)
	sbx := e.startSandbox(t, "chunked")
	data := make([]byte, 3<<20)
	rand.Read(data)
	path := filepath.Join(userDir(t), "big.bin")

	// An io.Pipe has no length: the client sends Transfer-Encoding: chunked.
	pr, pw := io.Pipe()
	go func() {
		for off := 0; off < len(data); off += 64 << 10 {
			if _, err := pw.Write(data[off:min(off+64<<10, len(data))]); err != nil {
				return
			}
		}
		pw.Close()
	}()
	r := e.do(t, request{method: "POST", path: "/files?path=" + url.QueryEscape(path), body: pr,
		headers: merge(routed(sbx.id, EnvdPort), map[string]string{"Content-Type": "application/octet-stream"})})
	if r.status != 200 {
		t.Fatalf("upload: %d %s", r.status, r.body)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("uploaded %d bytes, file has %d (or different content)", len(data), len(got))
	}
	down := e.do(t, request{path: "/files?path=" + url.QueryEscape(path), headers: routed(sbx.id, EnvdPort)})
	if down.status != 200 || down.body != string(data) {
		t.Errorf("download: %d, %d bytes, want 200 and the uploaded bytes", down.status, len(down.body))
	}
}
