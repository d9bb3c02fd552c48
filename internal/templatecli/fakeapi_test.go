package templatecli

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

const testKey = "e2b_0000000000000000000000000000000000000000"

var timeZero = time.Unix(0, 0)

// fakeAPI serves the four build endpoints of TEMPLATES.md §1 the way the
// contract says, and checks what clients (ours, and the npm SDK in the
// oracle tests) send: the API key on every API call and never on an upload,
// an exact Content-Length on uploads with the headers the link named.
type fakeAPI struct {
	t   *testing.T
	srv *httptest.Server

	mu       sync.Mutex
	present  map[string]bool   // hashes the server has
	creates  []map[string]any  // POST /v3/templates bodies
	links    []string          // hashes asked for
	uploads  map[string][]byte // hash → archive
	starts   []json.RawMessage // POST /v2/templates/.../builds/... bodies
	logs     []LogEntry        // the build's log
	failStep string            // fail the build at this step ("" = succeed)
	polls    int
}

func newFakeAPI(t *testing.T) *fakeAPI {
	f := &fakeAPI{t: t, present: map[string]bool{}, uploads: map[string][]byte{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v3/templates", f.api(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]any
		f.decode(r, &body)
		f.mu.Lock()
		f.creates = append(f.creates, body)
		f.mu.Unlock()
		writeJSON(w, 202, map[string]any{"templateID": "tpl0123456789abcdefgh", "buildID": "b-1", "public": false,
			"names": []string{body["name"].(string)}, "tags": []string{}, "aliases": []string{}})
	}))
	mux.HandleFunc("GET /templates/{id}/files/{hash}", f.api(func(w http.ResponseWriter, r *http.Request) {
		hash := r.PathValue("hash")
		f.mu.Lock()
		f.links = append(f.links, hash)
		present := f.present[hash]
		f.mu.Unlock()
		if present {
			writeJSON(w, 201, map[string]any{"present": true})
			return
		}
		writeJSON(w, 201, map[string]any{"present": false, "url": f.srv.URL + "/upload/" + hash + "?token=t0k",
			"headers": map[string]string{"X-Upload-Check": "yes"}})
	}))
	mux.HandleFunc("PUT /upload/{hash}", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-API-Key") != "" {
			t.Errorf("upload carries the API key")
		}
		if r.URL.Query().Get("token") != "t0k" || r.Header.Get("X-Upload-Check") != "yes" {
			t.Errorf("upload without the link's token or headers: %s %v", r.URL, r.Header)
		}
		if len(r.TransferEncoding) > 0 || r.Header.Get("Content-Length") == "" {
			t.Errorf("upload is not sent with a Content-Length (Transfer-Encoding %v)", r.TransferEncoding)
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("read upload: %v", err)
		}
		if n, _ := strconv.Atoi(r.Header.Get("Content-Length")); n != len(b) {
			t.Errorf("Content-Length %d, body %d bytes", n, len(b))
		}
		f.mu.Lock()
		f.uploads[r.PathValue("hash")] = b
		f.present[r.PathValue("hash")] = true
		f.mu.Unlock()
	})
	mux.HandleFunc("POST /v2/templates/{id}/builds/{build}", f.api(func(w http.ResponseWriter, r *http.Request) {
		var body json.RawMessage
		f.decode(r, &body)
		f.mu.Lock()
		f.starts = append(f.starts, body)
		f.polls = 0
		f.mu.Unlock()
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(202)
	}))
	mux.HandleFunc("GET /templates/{id}/builds/{build}/status", f.api(func(w http.ResponseWriter, r *http.Request) {
		offset, err := strconv.Atoi(r.URL.Query().Get("logsOffset"))
		if err != nil {
			t.Errorf("status poll without logsOffset: %s", r.URL)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		f.polls++
		// Two entries per page, and the end only after a few polls: the
		// client must page with logsOffset and drain after the end.
		end := min(offset+2, len(f.logs))
		page := append([]LogEntry{}, f.logs[min(offset, end):end]...)
		status := "building"
		if f.polls > 2 {
			status = "ready"
			if f.failStep != "" {
				status = "error"
			}
		}
		info := map[string]any{"templateID": r.PathValue("id"), "buildID": r.PathValue("build"), "status": status,
			"logs": []string{}, "logEntries": page}
		if status == "error" {
			info["reason"] = map[string]any{"message": "command exited with 1", "step": f.failStep}
		}
		writeJSON(w, 200, info)
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("unexpected request %s %s", r.Method, r.URL)
		http.NotFound(w, r)
	})
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.srv.Close)
	return f
}

// api wraps an API handler with the key check.
func (f *fakeAPI) api(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-API-Key") != testKey {
			f.t.Errorf("%s %s without the API key", r.Method, r.URL.Path)
			writeJSON(w, 401, map[string]any{"code": 401, "message": "bad key"})
			return
		}
		h(w, r)
	}
}

func (f *fakeAPI) decode(r *http.Request, v any) {
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		f.t.Errorf("%s %s: Content-Type %q", r.Method, r.URL.Path, ct)
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		f.t.Errorf("%s %s: body: %v", r.Method, r.URL.Path, err)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// tarEntry is what a tar member says, for comparisons.
type tarEntry struct {
	Name     string
	Type     byte
	Mode     int64
	Link     string
	Size     int64
	SHA256   string
	UID, GID int
	ModTime  int64
}

func readTarGz(t *testing.T, b []byte) []tarEntry {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("not gzip: %v", err)
	}
	tr := tar.NewReader(zr)
	var out []tarEntry
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("bad tar: %v", err)
		}
		sum := sha256.New()
		io.Copy(sum, tr)
		typ := h.Typeflag
		if typ == tar.TypeRegA { //nolint:staticcheck // old writers
			typ = tar.TypeReg
		}
		out = append(out, tarEntry{Name: h.Name, Type: typ, Mode: h.Mode & 0o7777, Link: h.Linkname, Size: h.Size,
			SHA256: hex.EncodeToString(sum.Sum(nil)), UID: h.Uid, GID: h.Gid, ModTime: h.ModTime.Unix()})
	}
}

// makeContext writes a build context: files with set modes, a hidden file,
// an ignored log, a file and a directory symlink.
func makeContext(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	files := []struct {
		path, content string
		mode          os.FileMode
	}{
		{"app/main.py", "print('hi')\n", 0o644},
		{"app/data.txt", "data\n", 0o600},
		{"app/.hidden", "h\n", 0o644},
		{"app/debug.log", "ignored\n", 0o644},
		{"app/sub/run.sh", "#!/bin/sh\necho run\n", 0o755},
		{"conf/a.conf", "a=1\n", 0o644},
		{"conf/deep/b.conf", "b=2\n", 0o644},
		{"one.txt", "1\n", 0o644},
		{"two.txt", "2\n", 0o644},
		{"node_modules/m/index.js", "x\n", 0o644},
		{".dockerignore", "# logs\n*.log\napp/*.log\n\nnode_modules/**\n", 0o644},
	}
	for _, f := range files {
		p := filepath.Join(dir, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f.content), f.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	for link, target := range map[string]string{"app/link.py": "main.py", "app/confdir": "../conf"} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	// Fixed times: archives of the same files are byte-comparable.
	stamp := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && info.Mode()&os.ModeSymlink == 0 {
			os.Chtimes(p, stamp, stamp)
		}
		return nil
	})
	return dir
}
