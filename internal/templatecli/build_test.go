package templatecli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

const testDockerfile = `FROM e2bdev/base
ENV GREETING=hello
COPY app /home/user/app
COPY *.txt /tmp/
RUN false
WORKDIR /home/user/app
CMD ["python3", "-m", "http.server", "8000"]
`

func parse(t *testing.T, text string) *Spec {
	t.Helper()
	spec, _, err := ParseDockerfile(text)
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

func TestBuildFlow(t *testing.T) {
	api := newFakeAPI(t)
	api.logs = []LogEntry{
		{Timestamp: time.Now(), Level: "info", Message: "pulling base", Step: "base"},
		{Timestamp: time.Now(), Level: "info", Message: "ENV GREETING=hello", Step: "3"},
		{Timestamp: time.Now(), Level: "debug", Message: "cache miss", Step: "4"},
		{Timestamp: time.Now(), Level: "warn", Message: "almost done"},
		{Timestamp: time.Now(), Level: "info", Message: "snapshot taken", Step: "finalize"},
	}
	dir := makeContext(t)
	c := &Client{URL: api.srv.URL, APIKey: testKey}
	var out bytes.Buffer
	res, err := c.Build(context.Background(), BuildOptions{
		Name: "my-tpl:v1", Tags: []string{"extra"}, CPUCount: 1, MemoryMB: 512,
		Spec: parse(t, testDockerfile), ContextDir: dir, Progress: &out, PollInterval: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("build: %v\n%s", err, out.String())
	}
	if res.TemplateID != "tpl0123456789abcdefgh" || res.BuildID != "b-1" {
		t.Errorf("result %+v", res)
	}

	want := map[string]any{"name": "my-tpl:v1", "tags": []any{"extra"}, "cpuCount": 1.0, "memoryMB": 512.0}
	if len(api.creates) != 1 || !reflect.DeepEqual(api.creates[0], want) {
		t.Errorf("POST /v3/templates bodies %v, want [%v]", api.creates, want)
	}

	// The start body: steps with hashes, start and ready commands.
	if len(api.starts) != 1 {
		t.Fatalf("%d build starts", len(api.starts))
	}
	var start Spec
	if err := json.Unmarshal(api.starts[0], &start); err != nil {
		t.Fatal(err)
	}
	if start.FromImage != "e2bdev/base" || start.StartCmd != "python3 -m http.server 8000" || start.ReadyCmd != "sleep 20" || start.Force {
		t.Errorf("start body %s", api.starts[0])
	}
	var hashes []string
	for _, s := range start.Steps {
		if (s.Type == "COPY") != (s.FilesHash != "") {
			t.Errorf("step %+v: filesHash only and always on COPY", s)
		}
		if s.FilesHash != "" {
			hashes = append(hashes, s.FilesHash)
		}
	}
	if len(hashes) != 2 || hashes[0] == hashes[1] || len(hashes[0]) != 64 {
		t.Errorf("COPY hashes %q", hashes)
	}
	if !slices.Equal(api.links, hashes) {
		t.Errorf("upload links asked for %q, want %q", api.links, hashes)
	}

	// The archive of COPY app: relative names, directory entries, symlinks
	// as links, .dockerignore applied.
	var names []string
	for _, e := range readTarGz(t, api.uploads[hashes[0]]) {
		names = append(names, e.Name)
	}
	wantNames := []string{"app/", "app/.hidden", "app/confdir", "app/confdir/a.conf", "app/confdir/deep/",
		"app/data.txt", "app/link.py", "app/main.py", "app/sub/", "app/sub/run.sh"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("archive of app: %q, want %q", names, wantNames)
	}

	// Progress: every log entry once, in order, with its step; debug too.
	text := out.String()
	for _, line := range []string{
		"Template created with ID: tpl0123456789abcdefgh, Build ID: b-1",
		"Uploaded 'app'", "Uploaded '*.txt'",
		"step 6/8: RUN false",
		"[base]     INFO  pulling base",
		"[3/8]      INFO  ENV GREETING=hello",
		"[4/8]      DEBUG cache miss",
		"           WARN  almost done",
		"[finalize] INFO  snapshot taken",
	} {
		if strings.Count(text, line) != 1 {
			t.Errorf("progress has %q %d times, want once:\n%s", line, strings.Count(text, line), text)
		}
	}
	if strings.Index(text, "pulling base") > strings.Index(text, "snapshot taken") {
		t.Errorf("log entries out of order:\n%s", text)
	}

	// A second build of the same files uploads nothing.
	out.Reset()
	api.uploads = map[string][]byte{}
	if _, err := c.Build(context.Background(), BuildOptions{Name: "my-tpl", Spec: parse(t, testDockerfile), ContextDir: dir,
		Progress: &out, PollInterval: 10 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if len(api.uploads) != 0 || strings.Count(out.String(), "already cached") != 2 {
		t.Errorf("rebuild uploaded %d archives:\n%s", len(api.uploads), out.String())
	}
	if api.creates[1]["cpuCount"] != nil || api.creates[1]["tags"] != nil {
		t.Errorf("unset sizes and tags are sent: %v", api.creates[1])
	}
}

func TestBuildFailure(t *testing.T) {
	api := newFakeAPI(t)
	api.failStep = "6"
	api.logs = []LogEntry{{Timestamp: time.Now(), Level: "error", Message: "exit status 1", Step: "6"}}
	c := &Client{URL: api.srv.URL, APIKey: testKey}
	var out bytes.Buffer
	_, err := c.Build(context.Background(), BuildOptions{Name: "t", Spec: parse(t, testDockerfile), ContextDir: makeContext(t),
		Progress: &out, PollInterval: 10 * time.Millisecond})
	var fe *BuildFailedError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v, want a BuildFailedError", err)
	}
	want := "build b-1 of template tpl0123456789abcdefgh failed at step 6 (RUN false): command exited with 1"
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if !strings.Contains(out.String(), "[6/8]      ERROR exit status 1") {
		t.Errorf("the failing step's log is not shown:\n%s", out.String())
	}
}

func TestBuildRefusals(t *testing.T) {
	api := newFakeAPI(t)
	c := &Client{URL: api.srv.URL, APIKey: testKey}
	_, err := c.Build(context.Background(), BuildOptions{Name: "t", Spec: parse(t, "FROM x\nCOPY missing /y\n"), ContextDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "step 3 (COPY missing /y): COPY missing: no files found") {
		t.Errorf("error %v", err)
	}
	if len(api.creates) != 0 {
		t.Errorf("a build was requested before the COPY sources were checked")
	}
	bad := &Client{URL: api.srv.URL, APIKey: "wrong"}
	api.t = &testing.T{} // the 401 is the point here
	_, err = bad.Build(context.Background(), BuildOptions{Name: "t", Spec: parse(t, "FROM x\n"), ContextDir: t.TempDir()})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 401 || ae.Message != "bad key" {
		t.Errorf("error %v, want the API's 401 with its message", err)
	}
}
