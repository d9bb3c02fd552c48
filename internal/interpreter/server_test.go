package interpreter

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// These tests run server.py with the host's python3, as the template runs it
// in a sandbox, and talk to it as @e2b/code-interpreter does
// (shared/compat/TEMPLATES.md §5).

type server struct {
	url    string
	client *http.Client
}

func startServer(t *testing.T) *server {
	t.Helper()
	py := python3(t)
	dir := t.TempDir()
	script := filepath.Join(dir, "server.py")
	if err := os.WriteFile(script, Server(), 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(py, script, "--listen", addr)
	cmd.Dir = dir
	logs := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("server output:\n%s", logs)
		}
	})
	// No execution here takes long: a stuck one fails the test.
	s := &server{url: "http://" + addr, client: &http.Client{Timeout: 30 * time.Second}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err := http.Get(s.url + "/health")
		if err == nil {
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != 200 || string(b) != `OK` {
				t.Fatalf("GET /health = %d %q, want 200 OK", res.StatusCode, b)
			}
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server did not answer /health: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// python3 is Debian's python3, as in the template, where there is one; else
// the first python3 on PATH.
func python3(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatal("python3 is needed (scripts/setup.sh --test installs it)")
	}
	return py
}

// msg is one line of an /execute stream.
type msg map[string]any

func (m msg) str(k string) string { s, _ := m[k].(string); return s }

// execution is what /execute streamed, by type.
type execution struct {
	lines   []msg
	stdout  string
	stderr  string
	results []msg
	errors  []msg
	count   float64
}

func (e *execution) main() msg {
	for _, r := range e.results {
		if r["is_main_result"] == true {
			return r
		}
	}
	return nil
}

func (s *server) execute(t *testing.T, body map[string]any) *execution {
	t.Helper()
	res := s.post(t, "/execute", body)
	defer res.Body.Close()
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("POST /execute %v = %d %s", body, res.StatusCode, b)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Errorf("Content-Type %q", ct)
	}
	e := &execution{}
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var m msg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		e.lines = append(e.lines, m)
		switch m.str("type") {
		case "stdout":
			e.stdout += m.str("text")
			if m.str("timestamp") == "" {
				t.Errorf("stdout line without a timestamp: %v", m)
			}
		case "stderr":
			e.stderr += m.str("text")
		case "result":
			e.results = append(e.results, m)
		case "error":
			e.errors = append(e.errors, m)
		case "number_of_executions":
			e.count, _ = m["execution_count"].(float64)
		}
	}
	if len(e.lines) == 0 || e.lines[len(e.lines)-1].str("type") != "end_of_execution" {
		t.Fatalf("the stream did not end with end_of_execution (%v): %v", sc.Err(), e.lines)
	}
	return e
}

func (s *server) post(t *testing.T, path string, body any) *http.Response {
	t.Helper()
	b, _ := json.Marshal(body)
	res, err := s.client.Post(s.url+path, "application/json", strings.NewReader(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// call does a request and returns its status and body.
func (s *server) call(t *testing.T, method, path string, body any) (int, string) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = strings.NewReader(string(b))
	}
	req, _ := http.NewRequest(method, s.url+path, r)
	req.Header.Set("Content-Type", "application/json")
	res, err := s.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func TestExecute(t *testing.T) {
	s := startServer(t)

	e := s.execute(t, map[string]any{"code": "import os\nx = 6\nprint('hello')\nos.system('echo from a child')\n!echo bang\nx * 7"})
	if e.count != 1 {
		t.Errorf("execution_count %v, want 1", e.count)
	}
	if e.stdout != "hello\nfrom a child\nbang\n" {
		t.Errorf("stdout %q, want Python's, the child's and the !command's output in order", e.stdout)
	}
	if m := e.main(); m == nil || m.str("text") != "42" {
		t.Errorf("main result %v, want text 42 (results %v)", m, e.results)
	}
	if e.lines[0].str("type") != "number_of_executions" {
		t.Errorf("first line %v, want number_of_executions", e.lines[0])
	}

	// The context keeps its variables; a statement has no main result.
	e = s.execute(t, map[string]any{"code": "y = x + 1"})
	if e.count != 2 || len(e.results) != 0 {
		t.Errorf("second execution: count %v, results %v", e.count, e.results)
	}
	if m := s.execute(t, map[string]any{"code": "y", "language": "python"}).main(); m == nil || m.str("text") != "7" {
		t.Errorf("y = %v, want 7 (kept in the default context)", m)
	}

	// Errors: name, value, a traceback that points at the user's code only.
	e = s.execute(t, map[string]any{"code": "def f():\n    return 1/0\nf()"})
	if len(e.errors) != 1 {
		t.Fatalf("errors %v, want one", e.errors)
	}
	err := e.errors[0]
	if err.str("name") != "ZeroDivisionError" || err.str("value") != "division by zero" {
		t.Errorf("error %v", err)
	}
	if tb := err.str("traceback"); !strings.Contains(tb, "return 1/0") || !strings.Contains(tb, "<cell 4>") || strings.Contains(tb, "server.py") {
		t.Errorf("traceback %q: want the cell's lines, none of the server's", tb)
	}
	if e := s.execute(t, map[string]any{"code": "def"}); len(e.errors) != 1 || e.errors[0].str("name") != "SyntaxError" {
		t.Errorf("a syntax error: %v", e.errors)
	}

	// Rich results: display() and the main result carry the forms the
	// object offers (IPython's _repr_*_ methods), binary ones in base64.
	e = s.execute(t, map[string]any{"code": `
class Rich:
    def __repr__(self): return "Rich()"
    def _repr_html_(self): return "<b>rich</b>"
    def _repr_png_(self): return b"\x89PNG fake"
    def _repr_json_(self): return {"a": 1}
display(Rich())
Rich()`})
	if len(e.results) != 2 || e.results[0]["is_main_result"] != false || e.results[1]["is_main_result"] != true {
		t.Fatalf("results %v, want display's then the main one", e.results)
	}
	for _, r := range e.results {
		png, _ := base64.StdEncoding.DecodeString(r.str("png"))
		if r.str("text") != "Rich()" || r.str("html") != "<b>rich</b>" || string(png) != "\x89PNG fake" || fmt.Sprint(r["json"]) != "map[a:1]" {
			t.Errorf("result %v", r)
		}
	}

	// env_vars hold for the one execution.
	e = s.execute(t, map[string]any{"code": "import os\nos.environ.get('WARREN_X')", "env_vars": map[string]string{"WARREN_X": "set"}})
	if m := e.main(); m == nil || m.str("text") != "'set'" {
		t.Errorf("with env_vars: %v", m)
	}
	if m := s.execute(t, map[string]any{"code": "os.environ.get('WARREN_X')"}).main(); m != nil {
		t.Errorf("after the execution WARREN_X is still %v", m)
	}

	// stderr, from Python and from a child.
	e = s.execute(t, map[string]any{"code": "import sys\nsys.stderr.write('py err\\n')\nos.system('echo child err >&2')"})
	if e.stderr != "py err\nchild err\n" {
		t.Errorf("stderr %q", e.stderr)
	}

	// A child's output split inside a character still comes out whole.
	e = s.execute(t, map[string]any{"code": `import os, time
os.write(1, "é".encode()[:1])
time.sleep(0.2)
os.write(1, "é".encode()[1:] + b" ok\n")`})
	if e.stdout != "é ok\n" {
		t.Errorf("stdout %q, want %q", e.stdout, "é ok\n")
	}

	// Bad requests.
	for _, c := range []struct {
		body   map[string]any
		status int
		want   string
	}{
		{map[string]any{"code": "1", "language": "python", "context_id": "x"}, 400, "Only one of context_id or language"},
		{map[string]any{"code": "1", "language": "cobol"}, 400, "not supported"},
		{map[string]any{"code": "1", "context_id": "nosuch"}, 404, "Context nosuch not found"},
		{map[string]any{"language": "python"}, 400, "code must be a string"},
	} {
		if status, body := s.call(t, "POST", "/execute", c.body); status != c.status || !strings.Contains(body, c.want) {
			t.Errorf("POST /execute %v = %d %s, want %d with %q", c.body, status, body, c.status, c.want)
		}
	}
}

func TestContexts(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	status, body := s.call(t, "POST", "/contexts", map[string]any{"language": "python", "cwd": dir})
	if status != 200 {
		t.Fatalf("POST /contexts = %d %s", status, body)
	}
	var ctx struct{ ID, Language, Cwd string }
	json.Unmarshal([]byte(body), &ctx)
	if ctx.ID == "" || ctx.Language != "python" || ctx.Cwd != dir {
		t.Fatalf("context %s", body)
	}
	if status, body := s.call(t, "GET", "/contexts", nil); status != 200 || !strings.Contains(body, ctx.ID) || strings.Count(body, `"id"`) != 1 {
		t.Errorf("GET /contexts = %d %s, want just the created one (not the default)", status, body)
	}
	// Its own working directory and variables.
	if m := s.execute(t, map[string]any{"code": "import os\nz = 1\nos.getcwd()", "context_id": ctx.ID}).main(); m == nil || m.str("text") != "'"+dir+"'" {
		t.Errorf("cwd in the context: %v, want %q", m, dir)
	}
	if e := s.execute(t, map[string]any{"code": "z"}); len(e.errors) != 1 || e.errors[0].str("name") != "NameError" {
		t.Errorf("the default context sees the other's variable: %v", e.lines)
	}
	// A restart forgets the variables.
	if status, body := s.call(t, "POST", "/contexts/"+ctx.ID+"/restart", nil); status/100 != 2 {
		t.Errorf("restart = %d %s", status, body)
	}
	if e := s.execute(t, map[string]any{"code": "z", "context_id": ctx.ID}); len(e.errors) != 1 || e.count != 1 {
		t.Errorf("after a restart: %v", e.lines)
	}
	// A deleted context is gone.
	if status, body := s.call(t, "DELETE", "/contexts/"+ctx.ID, nil); status/100 != 2 {
		t.Errorf("DELETE = %d %s", status, body)
	}
	for _, c := range []struct{ method, path string }{{"DELETE", "/contexts/" + ctx.ID}, {"POST", "/contexts/" + ctx.ID + "/restart"}} {
		if status, body := s.call(t, c.method, c.path, nil); status != 404 || !strings.Contains(body, "Context "+ctx.ID+" not found") {
			t.Errorf("%s %s of a deleted context = %d %s", c.method, c.path, status, body)
		}
	}
	if status, body := s.call(t, "POST", "/contexts", map[string]any{"language": "r"}); status != 400 {
		t.Errorf("a context of an unknown language = %d %s, want 400", status, body)
	}
}

// TestLongExecution: silence is filled with keepalive lines, and a client
// that leaves interrupts its code.
func TestLongExecution(t *testing.T) {
	s := startServer(t)
	e := s.execute(t, map[string]any{"code": "import time\ntime.sleep(6)\n'done'"})
	keepalive := false
	for _, l := range e.lines {
		keepalive = keepalive || l.str("type") == "keepalive"
	}
	if !keepalive || e.main().str("text") != "'done'" {
		t.Errorf("a 6 s execution streamed %v, want a keepalive and the result", e.lines)
	}

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", s.url+"/execute", strings.NewReader(`{"code":"import time\nfor i in range(60): time.sleep(0.5)"}`))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	bufio.NewReader(res.Body).ReadString('\n') // number_of_executions
	cancel()
	res.Body.Close()
	// The interrupted execution frees the context well before its 30 s.
	began := time.Now()
	e = s.execute(t, map[string]any{"code": "'next'"})
	if took := time.Since(began); e.main().str("text") != "'next'" || took > 15*time.Second {
		t.Errorf("the next execution took %s (%v): the abandoned one was not interrupted", took, e.lines)
	}
}

// TestMatplotlib: figures come back as PNG results, as from Jupyter's inline
// backend.
func TestMatplotlib(t *testing.T) {
	if err := exec.Command(python3(t), "-c", "import matplotlib").Run(); err != nil {
		t.Skip("SKIP: the host's python3 has no matplotlib (scripts/setup.sh --test installs python3-matplotlib)")
	}
	s := startServer(t)
	e := s.execute(t, map[string]any{"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()\nprint('after')"})
	if len(e.errors) != 0 || e.stderr != "" {
		t.Fatalf("errors %v, stderr %q", e.errors, e.stderr)
	}
	if len(e.results) != 1 {
		t.Fatalf("results %v, want the figure", e.results)
	}
	png, err := base64.StdEncoding.DecodeString(e.results[0].str("png"))
	if err != nil || !strings.HasPrefix(string(png), "\x89PNG") || !strings.HasPrefix(e.results[0].str("text"), "<Figure size") {
		t.Errorf("figure result: text %q, %d bytes of PNG (%v)", e.results[0].str("text"), len(png), err)
	}
	// A figure left open shows at the end of the cell.
	if e := s.execute(t, map[string]any{"code": "plt.figure()\nplt.bar([1], [2])"}); len(e.results) != 2 || e.results[1].str("png") == "" {
		t.Errorf("an open figure at the end of a cell: %v", e.results)
	}
}
