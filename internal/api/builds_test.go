package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/api"
	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
)

// buildEnv is env with template builds: a data dir holding a loadable
// artifact of the base template, control.Templates over a fake builder and a
// fake image resolver, its runner running.
type buildEnv struct {
	*env
	dataDir string
	builder *fakeBuilder
	images  *fakeImages
	tpl     *control.Templates
	// baseArtifact is the base template's artifact directory.
	baseArtifact string
}

type buildOptions struct {
	noBuilder      bool
	maxUploadBytes int64
	fillerLines    int
}

func newBuildEnv(t *testing.T, o buildOptions) *buildEnv {
	t.Helper()
	e := &buildEnv{env: newEnv(t, envOptions{}), dataDir: t.TempDir(), images: &fakeImages{}}
	e.builder = &fakeBuilder{dataDir: e.dataDir, fillerLines: o.fillerLines, copied: map[string][]string{}}
	ctx := context.Background()
	e.baseArtifact = filepath.Join(e.dataDir, "templates", "base", "0123456789abcdef")
	_, err := writeFakeArtifact(e.baseArtifact, "0123456789abcdef", 2, 512)
	must(t, err)
	b, err := e.store.GetBuild(ctx, baseBuild)
	must(t, err)
	b.Artifact = "templates/base/0123456789abcdef"
	must(t, e.store.UpdateBuild(ctx, b))

	cfg := control.TemplatesConfig{
		Store: e.store, DataDir: e.dataDir, Builder: e.builder, Images: e.images,
		MaxUploadBytes: o.maxUploadBytes, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		GC: &control.TemplateGC{Store: e.store, DataDir: e.dataDir, CacheMax: template.DefaultCacheMax},
	}
	if o.noBuilder {
		cfg.Builder, cfg.Images = nil, nil
	}
	e.tpl = e.startTemplates(t, cfg)
	return e
}

// startTemplates makes a control.Templates (a warren start), runs it until
// the test ends, and serves the API with it.
func (e *buildEnv) startTemplates(t *testing.T, cfg control.TemplatesConfig) *control.Templates {
	t.Helper()
	tpl, err := control.NewTemplates(context.Background(), cfg)
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tpl.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := httptest.NewServer(api.New(api.Config{Control: e.ctrl, Templates: tpl, Store: e.store, Log: quiet}))
	t.Cleanup(srv.Close)
	e.url = srv.URL
	return tpl
}

// requested is TemplateRequestResponseV3 as the SDK reads it.
type requested struct {
	TemplateID string   `json:"templateID"`
	BuildID    string   `json:"buildID"`
	Public     bool     `json:"public"`
	Names      []string `json:"names"`
	Tags       []string `json:"tags"`
	Aliases    []string `json:"aliases"`
}

func (e *buildEnv) request(key, body string) requested {
	e.t.Helper()
	var r requested
	e.do("POST", "/v3/templates", key, body).wantStatus(e.t, http.StatusAccepted).decode(e.t, &r)
	return r
}

// fileUpload is TemplateBuildFileUpload.
type fileUpload struct {
	Present bool              `json:"present"`
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers"`
}

func (e *buildEnv) files(key, templateID, hash string) fileUpload {
	e.t.Helper()
	var f fileUpload
	e.do("GET", "/templates/"+templateID+"/files/"+hash, key, "").wantStatus(e.t, http.StatusCreated).decode(e.t, &f)
	return f
}

// upload PUTs body to an upload URL as the SDK does: the returned headers,
// an exact Content-Length, no API key.
func upload(t testing.TB, f fileUpload, body []byte) *response {
	t.Helper()
	req, err := http.NewRequest("PUT", f.URL, strings.NewReader(string(body)))
	must(t, err)
	for k, v := range f.Headers {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	must(t, err)
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return &response{status: res.StatusCode, header: res.Header, body: b}
}

// rawRequest sends head (request line and headers, without the blank line)
// and body on a new connection, half-closes it, and reads the answer: for
// requests net/http's client will not send (a body shorter than its
// Content-Length, a huge announced length).
func rawRequest(t testing.TB, base, head string, body []byte) *response {
	t.Helper()
	u, err := url.Parse(base)
	must(t, err)
	conn, err := net.Dial("tcp", u.Host)
	must(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = io.WriteString(conn, head+"\r\nHost: "+u.Host+"\r\nConnection: close\r\n\r\n")
	must(t, err)
	conn.Write(body)
	conn.(*net.TCPConn).CloseWrite()
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	must(t, err)
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return &response{status: res.StatusCode, header: res.Header, body: b}
}

// buildInfo is TemplateBuildInfo as the SDK reads it.
type buildInfo struct {
	TemplateID string     `json:"templateID"`
	BuildID    string     `json:"buildID"`
	Status     string     `json:"status"`
	Logs       []string   `json:"logs"`
	LogEntries []logEntry `json:"logEntries"`
	Reason     *struct {
		Message    string     `json:"message"`
		Step       string     `json:"step"`
		LogEntries []logEntry `json:"logEntries"`
	} `json:"reason"`
}

type logEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step"`
}

// wait polls a build's status as the SDK's waitForBuildFinish does: with
// logsOffset advanced by each page, until the build is ready or failed and a
// page brings no more entries. It returns the last answer, every entry, and
// the largest page.
func (e *buildEnv) wait(key, templateID, buildID string) (last buildInfo, entries []logEntry, maxPage int) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var info buildInfo
		e.do("GET", fmt.Sprintf("/templates/%s/builds/%s/status?logsOffset=%d", templateID, buildID, len(entries)), key, "").
			wantStatus(e.t, http.StatusOK).decode(e.t, &info)
		entries = append(entries, info.LogEntries...)
		maxPage = max(maxPage, len(info.LogEntries))
		if (info.Status == "ready" || info.Status == "error") && len(info.LogEntries) == 0 {
			return info, entries, maxPage
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("build %s still %s after 10 s", buildID, info.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const filesHash = "3f2a9c0d4e5b6a7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"

// TestTemplateBuildFlow is Template.build as the SDK runs it, then a sandbox
// from the new template's tag.
func TestTemplateBuildFlow(t *testing.T) {
	e := newBuildEnv(t, buildOptions{maxUploadBytes: 1 << 20, fillerLines: 150})

	// 1. Request the build.
	r := e.request(keyA, `{"name":"my-tpl:v1","cpuCount":2,"memoryMB":1024,"minFreeDiskMb":2048}`)
	if len(r.TemplateID) != 20 || strings.Trim(r.TemplateID, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		t.Errorf("templateID = %q, want 20 characters [a-z0-9]", r.TemplateID)
	}
	if len(r.BuildID) != 36 || r.Public || fmt.Sprint(r.Tags) != "[v1]" || fmt.Sprint(r.Names) != "[my-tpl]" || fmt.Sprint(r.Aliases) != "[my-tpl]" {
		t.Errorf("response = %+v, want a UUID build, private, tags [v1], names and aliases [my-tpl]", r)
	}
	var status buildInfo
	e.do("GET", "/templates/"+r.TemplateID+"/builds/"+r.BuildID+"/status", keyA, "").wantStatus(t, http.StatusOK).decode(t, &status)
	if status.Status != "waiting" || status.LogEntries == nil || status.Logs == nil {
		t.Errorf("status before start = %+v, want waiting with empty logs and logEntries arrays", status)
	}

	// 2. Files of the COPY step: absent, so upload them.
	f := e.files(keyA, r.TemplateID, filesHash)
	if f.Present || !strings.HasPrefix(f.URL, e.url+"/upload/") {
		t.Fatalf("files = %+v, want absent with an upload URL on %s", f, e.url)
	}
	e.do("GET", "/templates/"+r.TemplateID+"/files/"+filesHash, keyB, "").wantError(t, http.StatusNotFound, "not found")
	e.do("GET", "/templates/"+r.TemplateID+"/files/bad.hash", keyA, "").wantError(t, http.StatusBadRequest, "Invalid files hash")

	archive := tarGz(t, map[string]string{"app/main.py": "print('hi')\n", "app/data.txt": "data"})
	uploadPath := strings.TrimPrefix(f.URL, e.url)
	token := strings.TrimPrefix(uploadPath, "/upload/")
	forged := fileUpload{URL: e.url + "/upload/" + token[:len(token)-2] + "AA", Headers: f.Headers}
	upload(t, forged, archive).wantError(t, http.StatusForbidden, "invalid or expired upload URL")
	rawRequest(t, e.url, "PUT "+uploadPath+" HTTP/1.1\r\nContent-Length: "+strconv.Itoa(len(archive)+10), archive).
		wantError(t, http.StatusBadRequest, fmt.Sprintf("ended after %d of the %d bytes", len(archive), len(archive)+10))
	rawRequest(t, e.url, "PUT "+uploadPath+" HTTP/1.1\r\nContent-Length: 2097152", nil).
		wantError(t, http.StatusRequestEntityTooLarge, "larger than 1048576 bytes")
	rawRequest(t, e.url, "PUT "+uploadPath+" HTTP/1.1\r\nTransfer-Encoding: chunked", []byte("5\r\nhello\r\n0\r\n\r\n")).
		wantError(t, http.StatusLengthRequired, "Content-Length is required")
	upload(t, f, []byte("not a gzip stream")).wantError(t, http.StatusBadRequest, "not a gzip archive")
	if e.files(keyA, r.TemplateID, filesHash).Present {
		t.Fatal("failed uploads left the files present")
	}
	res := upload(t, f, archive).wantStatus(t, http.StatusOK)
	if res.header.Get("Content-Length") != "0" {
		t.Errorf("upload answer Content-Length = %q, want 0", res.header.Get("Content-Length"))
	}
	if !e.files(keyA, r.TemplateID, filesHash).Present {
		t.Fatal("files not present after the upload")
	}

	// 3. Start it.
	start := `{"fromTemplate":"base","force":false,"startCmd":"python3 -m http.server","readyCmd":"sleep 1","steps":[
		{"type":"RUN","args":["apt-get update","root"],"force":false},
		{"type":"COPY","args":["app","/home/user/app","",""],"force":false,"filesHash":"` + filesHash + `","forceUpload":false,"resolveSymlinks":false},
		{"type":"ENV","args":["A","1"]},
		{"type":"WORKDIR","args":["/home/user/app"]},
		{"type":"USER","args":["user"]}]}`
	res = e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/"+r.BuildID, keyA, start).wantStatus(t, http.StatusAccepted)
	if len(res.body) != 0 || res.header.Get("Content-Length") != "0" {
		t.Errorf("start answer body %q, Content-Length %q; want empty with Content-Length 0", res.body, res.header.Get("Content-Length"))
	}

	// 4. Poll until ready.
	info, entries, maxPage := e.wait(keyA, r.TemplateID, r.BuildID)
	if info.Status != "ready" || info.Reason != nil {
		t.Fatalf("build = %+v, want ready without a reason", info)
	}
	if maxPage > 100 || len(entries) < 150 {
		t.Errorf("polled %d entries in pages of up to %d, want them all (> 150) in pages of ≤ 100", len(entries), maxPage)
	}
	steps := map[string]bool{}
	for i, en := range entries {
		steps[en.Step] = true
		if en.Timestamp.IsZero() || en.Level == "" || (i > 0 && en.Timestamp.Before(entries[i-1].Timestamp)) {
			t.Fatalf("entry %d = %+v: want a level and timestamps in order", i, en)
		}
	}
	for _, s := range []string{"base", "1", "2", "5", "finalize"} {
		if !steps[s] {
			t.Errorf("no log entry of step %q", s)
		}
	}

	reqs := e.builder.requests()
	if len(reqs) != 1 {
		t.Fatalf("builder ran %d builds, want 1", len(reqs))
	}
	got := reqs[0]
	if got.From.Template == nil || got.From.Template.Dir != e.baseArtifact || got.CPUs != 2 || got.MemoryMiB != 1024 || got.MinFreeDiskMiB != 2048 ||
		got.StartCmd != "python3 -m http.server" || got.ReadyCmd != "sleep 1" || len(got.Steps) != 5 ||
		got.Steps[1].FilesHash != filesHash || fmt.Sprint(got.Steps[0].Args) != "[apt-get update root]" {
		t.Errorf("builder request = %+v, want the base artifact, 2 CPUs, 1024 MiB, the commands and 5 steps", got)
	}
	if names := e.builder.copied[filesHash]; len(names) != 2 {
		t.Errorf("the COPY step's archive held %q, want the 2 uploaded files", names)
	}

	// The build is recorded with its artifact, resources and tags.
	b, err := e.store.GetBuild(context.Background(), r.BuildID)
	must(t, err)
	wantArtifact := filepath.Join("templates", r.TemplateID, r.BuildID)
	if b.Artifact != wantArtifact || b.DiskSizeMB != 3 || b.EnvdVersion == "" || b.FinishedAt == nil {
		t.Errorf("build = %+v, want artifact %s, 3 MiB disk, an envd version, a finish time", b, wantArtifact)
	}
	var tags []templateTagBody
	e.do("GET", "/templates/"+r.TemplateID+"/tags", keyA, "").wantStatus(t, http.StatusOK).decode(t, &tags)
	if len(tags) != 2 || tags[0].Tag != "default" || tags[1].Tag != "v1" || tags[0].BuildID != r.BuildID || tags[1].BuildID != r.BuildID {
		t.Errorf("tags = %+v, want default and v1 on build %s", tags, r.BuildID)
	}

	// A sandbox from name:tag, and from the bare name.
	for _, ref := range []string{"my-tpl:v1", "my-tpl", "team-a/my-tpl:default", r.TemplateID} {
		sb := e.create(keyA, `{"templateID":"`+ref+`"}`)
		spec := e.node.lastSpec()
		if sb.TemplateID != r.TemplateID || spec.BuildID != r.BuildID || spec.Artifact != wantArtifact {
			t.Errorf("sandbox from %q: template %s, build %s, artifact %s; want %s, %s, %s",
				ref, sb.TemplateID, spec.BuildID, spec.Artifact, r.TemplateID, r.BuildID, wantArtifact)
		}
	}
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"my-tpl:v2"}`).wantError(t, http.StatusNotFound, "tag 'v2' does not exist")

	// The logs route pages by time in both directions.
	var logs struct {
		Logs []logEntry `json:"logs"`
	}
	base := "/templates/" + r.TemplateID + "/builds/" + r.BuildID + "/logs"
	e.do("GET", base+"?limit=3", keyA, "").wantStatus(t, http.StatusOK).decode(t, &logs)
	if len(logs.Logs) != 3 || logs.Logs[0].Message != entries[0].Message {
		t.Errorf("forward logs = %+v, want the first 3 entries", logs.Logs)
	}
	e.do("GET", base+"?direction=backward&limit=2", keyA, "").wantStatus(t, http.StatusOK).decode(t, &logs)
	if len(logs.Logs) != 2 || logs.Logs[0].Message != entries[len(entries)-1].Message {
		t.Errorf("backward logs = %+v, want the last 2 entries, newest first", logs.Logs)
	}
	e.do("GET", base+"?level=warn", keyA, "").wantStatus(t, http.StatusOK).decode(t, &logs)
	if len(logs.Logs) != 0 {
		t.Errorf("warn logs = %+v, want none", logs.Logs)
	}
	cursor := entries[len(entries)-1].Timestamp.Add(time.Millisecond).UnixMilli()
	e.do("GET", fmt.Sprintf("%s?cursor=%d", base, cursor), keyA, "").wantStatus(t, http.StatusOK).decode(t, &logs)
	if len(logs.Logs) != 0 {
		t.Errorf("logs after the last entry = %+v, want none", logs.Logs)
	}
	e.do("GET", base+"?direction=sideways", keyA, "").wantError(t, http.StatusBadRequest, "direction")
	e.do("GET", base, keyB, "").wantError(t, http.StatusNotFound, "not found")
	e.do("GET", "/templates/"+r.TemplateID+"/builds/00000000-0000-4000-8000-00000000ffff/status", keyA, "").
		wantError(t, http.StatusNotFound, "not found")
	e.do("GET", "/templates/"+r.TemplateID+"/builds/"+r.BuildID+"/status?limit=101", keyA, "").
		wantError(t, http.StatusBadRequest, "limit")

	// A new build of the same name is a new build of the same template.
	again := e.request(keyA, `{"name":"my-tpl"}`)
	if again.TemplateID != r.TemplateID || again.BuildID == r.BuildID || fmt.Sprint(again.Tags) != "[default]" {
		t.Errorf("second request = %+v, want a new build of template %s, tags [default]", again, r.TemplateID)
	}
}

type templateTagBody struct {
	Tag       string    `json:"tag"`
	BuildID   string    `json:"buildID"`
	CreatedAt time.Time `json:"createdAt"`
}

// buildTemplate runs a whole build of name from base with one RUN step and
// returns it.
func (e *buildEnv) buildTemplate(key, name string) requested {
	e.t.Helper()
	r := e.request(key, `{"name":"`+name+`"}`)
	e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/"+r.BuildID, key,
		`{"fromTemplate":"base","steps":[{"type":"RUN","args":["true"]}]}`).wantStatus(e.t, http.StatusAccepted)
	if info, _, _ := e.wait(key, r.TemplateID, r.BuildID); info.Status != "ready" {
		e.t.Fatalf("build of %s: %+v", name, info)
	}
	return r
}

func TestTemplateBuildFailure(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	e.builder.set(func(b *fakeBuilder) { b.fail = &template.BuildError{Step: "2", Message: "command exited with 1"} })
	r := e.request(keyA, `{"name":"broken","tags":["v1"]}`)
	e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/"+r.BuildID, keyA,
		`{"fromImage":"e2bdev/base:latest","steps":[{"type":"RUN","args":["true"]},{"type":"RUN","args":["false"]}]}`).
		wantStatus(t, http.StatusAccepted)
	info, entries, _ := e.wait(keyA, r.TemplateID, r.BuildID)
	if info.Status != "error" || info.Reason == nil || info.Reason.Message != "command exited with 1" || info.Reason.Step != "2" {
		t.Fatalf("build = %+v, want error with reason %q at step 2", info, "command exited with 1")
	}
	if len(info.Reason.LogEntries) == 0 {
		t.Error("reason has no log entries")
	}
	for _, en := range info.Reason.LogEntries {
		if en.Step != "2" {
			t.Errorf("reason entry %+v is not of step 2", en)
		}
	}
	if last := entries[len(entries)-1]; last.Level != "error" || !strings.Contains(last.Message, "command exited with 1") {
		t.Errorf("last log entry = %+v, want the failure", last)
	}
	// fromImage e2bdev/base started from the base template.
	if reqs := e.builder.requests(); len(reqs) != 1 || reqs[0].From.Template == nil || reqs[0].From.Template.Dir != e.baseArtifact {
		t.Errorf("builder requests = %+v, want one from the base artifact", reqs)
	}
	// A failed build gets no tags and serves no sandbox; its template stays.
	var tags []templateTagBody
	e.do("GET", "/templates/"+r.TemplateID+"/tags", keyA, "").wantStatus(t, http.StatusOK).decode(t, &tags)
	if len(tags) != 0 {
		t.Errorf("tags of a failed build = %+v, want none", tags)
	}
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"broken"}`).wantError(t, http.StatusNotFound, "has no successful build")
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"broken:v1"}`).wantError(t, http.StatusNotFound, "tag 'v1' does not exist")
}

func TestTemplateBuildSources(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	// Any other image goes to the image resolver, with its credentials.
	r := e.request(keyA, `{"name":"from-image"}`)
	e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/"+r.BuildID, keyA,
		`{"fromImage":"python:3.12-slim","fromImageRegistry":{"type":"registry","username":"u","password":"p"},"steps":[]}`).
		wantStatus(t, http.StatusAccepted)
	if info, _, _ := e.wait(keyA, r.TemplateID, r.BuildID); info.Status != "ready" {
		t.Fatalf("build from image: %+v", info)
	}
	src := e.builder.requests()[0].From
	if src.Template != nil || src.RootImage != "/images/python:3.12-slim/rootfs.ext4" || src.Workdir != "/app" || src.User != "node" || src.Env["PATH"] == "" {
		t.Errorf("source = %+v, want the resolver's root image and defaults", src)
	}
	if c := e.images.creds[0]; c == nil || c.Type != "registry" || c.Username != "u" || c.Password != "p" {
		t.Errorf("credentials = %+v, want the registry login", c)
	}
	// The spec stored with the build keeps no credentials.
	b, err := e.store.GetBuild(context.Background(), r.BuildID)
	must(t, err)
	if strings.Contains(b.Spec, `"p"`) || !strings.Contains(b.Spec, "python:3.12-slim") {
		t.Errorf("stored spec %s: want the image and no password", b.Spec)
	}

	// A template built here is a source too, by name:tag.
	r2 := e.request(keyA, `{"name":"child"}`)
	e.do("POST", "/v2/templates/"+r2.TemplateID+"/builds/"+r2.BuildID, keyA, `{"fromTemplate":"from-image:default"}`).
		wantStatus(t, http.StatusAccepted)
	if info, _, _ := e.wait(keyA, r2.TemplateID, r2.BuildID); info.Status != "ready" {
		t.Fatalf("build from template: %+v", info)
	}
	if src := e.builder.requests()[1].From; src.Template == nil || src.Template.BuildID != r.BuildID {
		t.Errorf("source = %+v, want the artifact of build %s", src, r.BuildID)
	}

	// A resolver error fails the build at step base.
	r3 := e.request(keyA, `{"name":"missing-image"}`)
	e.do("POST", "/v2/templates/"+r3.TemplateID+"/builds/"+r3.BuildID, keyA, `{"fromImage":"missing:latest"}`).
		wantStatus(t, http.StatusAccepted)
	if info, _, _ := e.wait(keyA, r3.TemplateID, r3.BuildID); info.Status != "error" || info.Reason.Step != "base" ||
		!strings.Contains(info.Reason.Message, "manifest unknown") {
		t.Errorf("build from a missing image = %+v, want an error at step base", info)
	}
}

func TestTemplateBuildsUnavailable(t *testing.T) {
	e := newBuildEnv(t, buildOptions{noBuilder: true})
	r := e.request(keyA, `{"name":"nobuilder"}`)
	e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/"+r.BuildID, keyA, `{"fromTemplate":"base"}`).wantStatus(t, http.StatusAccepted)
	info, _, _ := e.wait(keyA, r.TemplateID, r.BuildID)
	if info.Status != "error" || info.Reason.Step != "base" || !strings.Contains(info.Reason.Message, "template builds are not available") {
		t.Errorf("build without a builder = %+v, want an error saying builds are not available", info)
	}
}

func TestTemplateRequestValidation(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	for _, tc := range []struct{ name, body, msg string }{
		{"no name", `{"cpuCount":2}`, "Name is required"},
		{"blank name", `{"name":"  "}`, "Name is required"},
		{"long name", `{"name":"` + strings.Repeat("a", 129) + `"}`, "longer than 128 characters"},
		{"bad characters", `{"name":"my tpl"}`, "Invalid name"},
		{"other namespace", `{"name":"team-b/x"}`, "namespace 'team-b' must match your team 'team-a'"},
		{"bad tag", `{"name":"x:v 1"}`, "Invalid tag"},
		{"uuid tag", `{"name":"x","tags":["123e4567-e89b-12d3-a456-426614174000"]}`, "cannot be a UUID"},
		{"cpu 0", `{"name":"x","cpuCount":0}`, "CPU count must be at least 1"},
		{"cpu odd", `{"name":"x","cpuCount":3}`, "CPU count must be 1 or an even number"},
		{"cpu high", `{"name":"x","cpuCount":64}`, "CPU count must be at most 32"},
		{"memory low", `{"name":"x","memoryMB":64}`, "Memory must be at least 128 MiB"},
		{"memory odd", `{"name":"x","memoryMB":1025}`, "Memory must be divisible by 2"},
		{"cpu type", `{"name":"x","cpuCount":"2"}`, `Field "cpuCount"`},
		{"free disk negative", `{"name":"x","minFreeDiskMb":-1}`, "minFreeDiskMb must be between 0 and"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.do("POST", "/v3/templates", keyA, tc.body).wantError(t, http.StatusBadRequest, tc.msg)
		})
	}
	e.do("POST", "/v3/templates", keyA, `{"name":"x","teamID":"team-b-id"}`).wantError(t, http.StatusForbidden, "team-b-id")
	e.do("POST", "/v3/templates", "", `{"name":"x"}`).wantError(t, http.StatusUnauthorized, "API key")

	// The deprecated alias field, namespaced names and 1 CPU are accepted.
	if r := e.request(keyA, `{"alias":"legacy","cpuCount":1,"memoryMB":128}`); fmt.Sprint(r.Names) != "[legacy]" {
		t.Errorf("alias request = %+v", r)
	}
	if r := e.request(keyA, `{"name":"Team-A/Spaced:V2"}`); fmt.Sprint(r.Names) != "[team-a/spaced]" || fmt.Sprint(r.Tags) != "[v2]" {
		t.Errorf("namespaced request = %+v, want names [team-a/spaced], tags [v2]", r)
	}

	r := e.request(keyA, `{"name":"start-checks"}`)
	path := "/v2/templates/" + r.TemplateID + "/builds/" + r.BuildID
	for _, tc := range []struct {
		name, body string
		status     int
		msg        string
	}{
		{"both sources", `{"fromImage":"e2bdev/base","fromTemplate":"base"}`, 400, "not both"},
		{"no source", `{"steps":[]}`, 400, "Either fromImage or fromTemplate must be set"},
		{"unknown step", `{"fromTemplate":"base","steps":[{"type":"RUN","args":["x"]},{"type":"EXPOSE","args":["80"]}]}`, 400, `Step 2: unknown type "EXPOSE"`},
		{"empty run", `{"fromTemplate":"base","steps":[{"type":"RUN","args":[]}]}`, 400, "Step 1 (RUN): no command"},
		{"copy not uploaded", `{"fromTemplate":"base","steps":[{"type":"RUN","args":["x"]},{"type":"COPY","args":["a","/b","",""],"filesHash":"` + filesHash + `"}]}`, 400, "Step 2 (COPY): the files of a (hash " + filesHash + ") were not uploaded"},
		{"copy without hash", `{"fromTemplate":"base","steps":[{"type":"COPY","args":["a","/b"]}]}`, 400, "Step 1 (COPY): no filesHash"},
		{"odd env", `{"fromTemplate":"base","steps":[{"type":"ENV","args":["A"]}]}`, 400, "Step 1 (ENV)"},
		{"bad registry", `{"fromImage":"x:1","fromImageRegistry":{"type":"aws","awsAccessKeyId":"k"}}`, 400, "missing awsSecretAccessKey, awsRegion"},
		{"unknown template", `{"fromTemplate":"nope"}`, 404, "template 'nope' not found"},
		{"invisible template", `{"fromTemplate":"team-b/secret"}`, 404, "not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.do("POST", path, keyA, tc.body).wantError(t, tc.status, tc.msg)
		})
	}
	e.do("POST", "/v2/templates/"+r.TemplateID+"/builds/00000000-0000-4000-8000-00000000ffff", keyA, `{"fromTemplate":"base"}`).
		wantError(t, http.StatusNotFound, "not found")
	e.do("POST", path, keyB, `{"fromTemplate":"base"}`).wantError(t, http.StatusNotFound, "not found")
	// Failed checks leave the build startable; a second start is refused.
	e.do("POST", path, keyA, `{"fromTemplate":"base"}`).wantStatus(t, http.StatusAccepted)
	e.do("POST", path, keyA, `{"fromTemplate":"base"}`).wantError(t, http.StatusBadRequest, "already started")
}

// TestTemplateNames: the caller's own name gets a new build of the same
// template; a name only another team or the global namespace has makes a
// new template in the caller's namespace.
func TestTemplateNames(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	a1 := e.request(keyA, `{"name":"shared"}`)
	a2 := e.request(keyA, `{"name":"team-a/shared:v2"}`)
	b1 := e.request(keyB, `{"name":"shared"}`)
	if a1.TemplateID != a2.TemplateID || a1.BuildID == a2.BuildID {
		t.Errorf("team A's two requests: %+v and %+v, want two builds of one template", a1, a2)
	}
	if b1.TemplateID == a1.TemplateID {
		t.Error("team B's request of the same name reused team A's template")
	}
	g := e.request(keyA, `{"name":"base"}`)
	if g.TemplateID == baseID {
		t.Error("a request named like the global base template made a build of it")
	}
	a, err := e.store.GetAlias(context.Background(), "team-a", "base")
	if err != nil || a.TemplateID != g.TemplateID {
		t.Errorf("alias team-a/base = %+v, %v; want template %s", a, err, g.TemplateID)
	}
}

func TestTemplateTags(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	first := e.buildTemplate(keyA, "tagged:v1")
	second := e.buildTemplate(keyA, "tagged")

	var assigned struct {
		BuildID string   `json:"buildID"`
		Tags    []string `json:"tags"`
	}
	e.do("POST", "/templates/tags", keyA, `{"target":"tagged:v1","tags":["prod","Stable","prod"]}`).
		wantStatus(t, http.StatusCreated).decode(t, &assigned)
	if assigned.BuildID != first.BuildID || fmt.Sprint(assigned.Tags) != "[prod stable]" {
		t.Errorf("assigned = %+v, want build %s tagged [prod stable]", assigned, first.BuildID)
	}
	e.create(keyA, `{"templateID":"tagged:prod"}`)
	if got := e.node.lastSpec().BuildID; got != first.BuildID {
		t.Errorf("sandbox from tagged:prod runs build %s, want %s", got, first.BuildID)
	}
	e.create(keyA, `{"templateID":"tagged"}`)
	if got := e.node.lastSpec().BuildID; got != second.BuildID {
		t.Errorf("sandbox from tagged (default) runs build %s, want the latest, %s", got, second.BuildID)
	}
	// The newest assignment of a tag wins.
	e.do("POST", "/templates/tags", keyA, `{"target":"tagged","tags":["prod"]}`).wantStatus(t, http.StatusCreated)
	e.create(keyA, `{"templateID":"tagged:prod"}`)
	if got := e.node.lastSpec().BuildID; got != second.BuildID {
		t.Errorf("sandbox from tagged:prod after the move runs build %s, want %s", got, second.BuildID)
	}

	var tags []templateTagBody
	e.do("GET", "/templates/tagged/tags", keyA, "").wantStatus(t, http.StatusOK).decode(t, &tags)
	var names []string
	for _, tg := range tags {
		names = append(names, tg.Tag)
	}
	if fmt.Sprint(names) != "[default prod stable v1]" {
		t.Errorf("tags = %v, want [default prod stable v1]", names)
	}

	for _, tc := range []struct {
		name, method, body string
		status             int
		msg                string
	}{
		{"assign default", "POST", `{"target":"tagged","tags":["default"]}`, 400, "Tag 'default' cannot be assigned"},
		{"assign none", "POST", `{"target":"tagged","tags":[]}`, 400, "No tags given"},
		{"assign no target", "POST", `{"tags":["x"]}`, 400, `"target" is required`},
		{"assign unknown tag target", "POST", `{"target":"tagged:nope","tags":["x"]}`, 404, "tag 'nope' does not exist"},
		{"assign other team's", "POST", `{"target":"team-b/secret","tags":["x"]}`, 404, "not found"},
		{"assign public other team's", "POST", `{"target":"base","tags":["x"]}`, 404, "not found"},
		{"remove default", "DELETE", `{"name":"tagged","tags":["default"]}`, 400, "Tag 'default' cannot be removed"},
		{"remove unknown", "DELETE", `{"name":"tagged","tags":["stable","nope"]}`, 404, "tag 'nope' does not exist"},
		{"remove from unknown", "DELETE", `{"name":"nope","tags":["x"]}`, 404, "not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.do(tc.method, "/templates/tags", keyA, tc.body).wantError(t, tc.status, tc.msg)
		})
	}
	res := e.do("DELETE", "/templates/tags", keyA, `{"name":"tagged:prod","tags":["stable","v1"]}`).wantStatus(t, http.StatusNoContent)
	if len(res.body) != 0 {
		t.Errorf("remove answered %q, want no body", res.body)
	}
	e.do("GET", "/templates/"+first.TemplateID+"/tags", keyA, "").wantStatus(t, http.StatusOK).decode(t, &tags)
	if len(tags) != 2 || tags[0].Tag != "default" || tags[1].Tag != "prod" {
		t.Errorf("tags after remove = %+v, want default and prod", tags)
	}
	e.do("POST", "/v2/sandboxes", keyA, `{"templateID":"tagged:v1"}`).wantError(t, http.StatusNotFound, "tag 'v1' does not exist")

	// Template.exists: the owner sees it, another team is told it is taken
	// when it names the namespace, and does not find the bare name.
	e.do("GET", "/templates/aliases/tagged", keyA, "").wantStatus(t, http.StatusOK)
	e.do("GET", "/templates/aliases/team-a%2Ftagged", keyB, "").wantError(t, http.StatusForbidden, "another team")
	e.do("GET", "/templates/aliases/tagged", keyB, "").wantError(t, http.StatusNotFound, "not found")
}

func TestDeleteTemplate(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	r := e.buildTemplate(keyA, "doomed")
	artifact := filepath.Join(e.dataDir, "templates", r.TemplateID, r.BuildID)
	logFile := filepath.Join(e.dataDir, "builds", r.BuildID+".log")
	for _, p := range []string{artifact, logFile} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("before delete: %v", err)
		}
	}
	sb := e.create(keyA, `{"templateID":"doomed"}`)
	e.do("DELETE", "/templates/doomed", keyA, "").wantError(t, http.StatusConflict, "used by 1 sandbox")
	e.do("DELETE", "/templates/"+r.TemplateID, keyB, "").wantError(t, http.StatusNotFound, "not found")
	e.do("DELETE", "/templates/"+baseID, keyA, "").wantError(t, http.StatusNotFound, "not found")
	e.do("DELETE", "/sandboxes/"+sb.SandboxID, keyA, "").wantStatus(t, http.StatusNoContent)

	res := e.do("DELETE", "/templates/"+r.TemplateID, keyA, "").wantStatus(t, http.StatusNoContent)
	if len(res.body) != 0 {
		t.Errorf("delete answered %q, want no body", res.body)
	}
	// The log goes with the template, the artifact with the collection of
	// template storage the delete asks for.
	deadline := time.Now().Add(10 * time.Second)
	for _, p := range []string{logFile, artifact, filepath.Dir(artifact)} {
		for {
			_, err := os.Stat(p)
			if os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s after delete: %v, want it gone", p, err)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, err := os.Stat(filepath.Join(e.baseArtifact, "artifact.json")); err != nil {
		t.Errorf("the base template's artifact: %v", err)
	}
	e.do("GET", "/templates/"+r.TemplateID, keyA, "").wantError(t, http.StatusNotFound, "not found")
	e.do("DELETE", "/templates/"+r.TemplateID, keyA, "").wantError(t, http.StatusNotFound, "not found")
	e.do("GET", "/templates/aliases/doomed", keyA, "").wantError(t, http.StatusNotFound, "not found")
	// The name is free again.
	if again := e.request(keyA, `{"name":"doomed"}`); again.TemplateID == r.TemplateID {
		t.Error("a new request of a deleted template's name reused its ID")
	}

	// A paused sandbox holds its template too.
	r2 := e.buildTemplate(keyA, "held")
	e.insertSandboxes(t, e.teamA, 1, time.Now(), func(int) map[string]string { return nil })
	_, err := e.store.UpdateSandbox(context.Background(), "i00000000000000000000", func(s *store.Sandbox) error {
		s.TemplateID, s.State = r2.TemplateID, store.StatePaused
		return nil
	})
	must(t, err)
	e.do("DELETE", "/templates/held", keyA, "").wantError(t, http.StatusConflict, "running or paused")
}

func TestPublishTemplate(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	r := e.buildTemplate(keyA, "shared-tpl")
	e.do("POST", "/v2/sandboxes", keyB, `{"templateID":"team-a/shared-tpl"}`).wantError(t, http.StatusNotFound, "not found")
	var out struct {
		Names []string `json:"names"`
	}
	e.do("PATCH", "/v2/templates/"+r.TemplateID, keyA, `{"public":true}`).wantStatus(t, http.StatusOK).decode(t, &out)
	if fmt.Sprint(out.Names) != "[team-a/shared-tpl]" {
		t.Errorf("names = %v, want [team-a/shared-tpl]", out.Names)
	}
	e.create(keyB, `{"templateID":"team-a/shared-tpl"}`)
	e.do("PATCH", "/v2/templates/"+r.TemplateID, keyB, `{"public":false}`).wantError(t, http.StatusNotFound, "not found")
	e.do("PATCH", "/v2/templates/"+r.TemplateID, keyA, `{}`).wantError(t, http.StatusBadRequest, "public")
	e.do("PATCH", "/v2/templates/shared-tpl", keyA, `{"public":false}`).wantStatus(t, http.StatusOK)
	e.do("POST", "/v2/sandboxes", keyB, `{"templateID":"team-a/shared-tpl"}`).wantError(t, http.StatusNotFound, "not found")
}

// TestBuildsInterruptedByRestart: a start of warren ends the builds the
// previous run left waiting or building, and keeps their logs.
func TestBuildsInterruptedByRestart(t *testing.T) {
	e := newBuildEnv(t, buildOptions{})
	gate, started := make(chan struct{}), make(chan string, 1)
	e.builder.set(func(b *fakeBuilder) { b.gate, b.started = gate, started })
	defer close(gate)
	running := e.request(keyA, `{"name":"running"}`)
	e.do("POST", "/v2/templates/"+running.TemplateID+"/builds/"+running.BuildID, keyA, `{"fromTemplate":"base"}`).
		wantStatus(t, http.StatusAccepted)
	<-started
	waiting := e.request(keyA, `{"name":"waiting"}`)
	var info buildInfo
	e.do("GET", "/templates/running/builds/"+running.BuildID+"/status", keyA, "").wantStatus(t, http.StatusOK).decode(t, &info)
	if info.Status != "building" || len(info.LogEntries) == 0 {
		t.Fatalf("status = %+v, want building with log entries", info)
	}

	// warren starts again on the same store and data dir.
	e.startTemplates(t, control.TemplatesConfig{Store: e.store, DataDir: e.dataDir, Builder: e.builder,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	for _, r := range []requested{running, waiting} {
		info, entries, _ := e.wait(keyA, r.TemplateID, r.BuildID)
		if info.Status != "error" || info.Reason == nil || info.Reason.Message != "interrupted by a warren restart" {
			t.Errorf("build %s after restart = %+v, want error %q", r.BuildID, info, "interrupted by a warren restart")
		}
		if r.BuildID == running.BuildID && (len(entries) < 3 || !slices.ContainsFunc(entries, func(en logEntry) bool { return strings.Contains(en.Message, "queued") })) {
			t.Errorf("log of the interrupted build = %+v, want the entries before the restart, then the failure", entries)
		}
	}
	e.do("POST", "/v2/templates/waiting/builds/"+waiting.BuildID, keyA, `{"fromTemplate":"base"}`).
		wantError(t, http.StatusBadRequest, "failed before it started (interrupted by a warren restart)")
}

// The JSON the fake builder's artifact writer produces must load as an
// artifact, or every test above runs on a broken fixture.
func TestFakeArtifactLoads(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a")
	_, err := writeFakeArtifact(dir, "x", 2, 512)
	must(t, err)
	a, err := template.LoadArtifact(dir)
	must(t, err)
	if a.InitSecret != "secret" || a.CPUs != 2 {
		t.Fatalf("artifact = %+v", a)
	}
	b, _ := json.Marshal(a)
	if len(b) == 0 {
		t.Fatal("empty artifact")
	}
}
