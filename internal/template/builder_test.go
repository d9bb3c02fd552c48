package template_test

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/oci"
	"github.com/warren-sh/warren/internal/oci/ocitest"
	"github.com/warren-sh/warren/internal/template"
)

// buildLog collects a build's log entries.
type buildLog struct {
	mu      sync.Mutex
	entries []template.LogEntry
}

func (l *buildLog) add(e template.LogEntry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.entries = append(l.entries, e)
}

func (l *buildLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, e := range l.entries {
		fmt.Fprintf(&b, "[%s] %s %s\n", e.Step, e.Level, e.Message)
	}
	return b.String()
}

// has reports whether an entry of step contains text.
func (l *buildLog) has(step, text string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.entries {
		if e.Step == step && strings.Contains(e.Message, text) {
			return true
		}
	}
	return false
}

// writeContext writes a tar.gz of files (path → content; a trailing / is a
// directory) as the SDK uploads a COPY step's files, and returns its path.
func writeContext(t testing.TB, files map[string]string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "files.tar.gz")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	gz := gzip.NewWriter(f)
	tw := tar.NewWriter(gz)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		h := &tar.Header{Name: n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg, ModTime: time.Now()}
		if strings.HasSuffix(n, "/") {
			h.Mode, h.Size, h.Typeflag = 0o755, 0, tar.TypeDir
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(files[n]))
		}
	}
	if err := errors.Join(tw.Close(), gz.Close(), f.Close()); err != nil {
		t.Fatal(err)
	}
	return p
}

// newBuilder makes a builder with a data directory of its own (beside the
// runtime's root, on the cache's file system), removed after the test.
func newBuilder(t testing.TB, pool *netns.Pool, base *template.Artifact) (*template.LocalBuilder, string) {
	t.Helper()
	dataDir, err := os.MkdirTemp(cacheDir, ".test-builds-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dataDir) })
	b, err := template.NewBuilder(template.BuilderConfig{DataDir: dataDir, Runtime: rt, Slots: pool, Base: base})
	if err != nil {
		t.Fatal(err)
	}
	return b, dataDir
}

func TestBuildSteps(t *testing.T) {
	pool := newPool(t)
	base := ensureBase(t, pool)
	b, dataDir := newBuilder(t, pool, base)
	ctxFiles := writeContext(t, map[string]string{"app/": "", "app/data.txt": "data from the context\n", "app/main.py": "print('hi')\n"})
	files := func(hash string) (string, error) {
		if hash != "h-app" {
			return "", fmt.Errorf("no upload %q", hash)
		}
		return ctxFiles, nil
	}
	steps := []template.Step{
		{Type: "ENV", Args: []string{"GREETING", "hello", "SPACED", "a b"}},
		{Type: "RUN", Args: []string{"echo built-by-$(whoami) > /opt/marker", "root"}},
		{Type: "WORKDIR", Args: []string{"/srv/app"}},
		{Type: "COPY", Args: []string{"app", "./", "", ""}, FilesHash: "h-app"},
		{Type: "RUN", Args: []string{`echo "$GREETING from $(pwd)" > greeting.txt`}},
		{Type: "USER", Args: []string{"alice", "true"}},
		{Type: "RUN", Args: []string{"sudo -n true && id -un > ~/who"}},
	}
	req := func(id string, log *buildLog, steps []template.Step) template.BuildRequest {
		return template.BuildRequest{
			BuildID: id, TemplateID: "tpltest", From: template.Source{Template: base}, Steps: steps,
			StartCmd: "python3 -m http.server 8000", ReadyCmd: `[ -n "$(ss -Htuln sport = :8000)" ]`,
			CPUs: base.CPUs, MemoryMiB: base.MemoryMiB, Files: files, Log: log.add,
		}
	}

	var first buildLog
	t0 := time.Now()
	a, err := b.Build(t.Context(), req("build-1", &first, steps))
	firstTime := time.Since(t0)
	t.Logf("first build: %s\n%s", firstTime.Round(time.Millisecond), first.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []string{"base", "1", "2", "3", "4", "5", "6", "7", "finalize"} {
		if !first.has(step, "") {
			t.Errorf("no log entry for step %s", step)
		}
	}
	if a.User != "alice" || a.Workdir != "/srv/app" || a.Env["GREETING"] != "hello" || a.StartCmd == "" {
		t.Errorf("artifact defaults: user %q workdir %q env %v start %q", a.User, a.Workdir, a.Env, a.StartCmd)
	}
	if _, err := template.LoadArtifact(a.Dir); err != nil {
		t.Fatalf("LoadArtifact: %v", err)
	}

	t.Run("a sandbox of the template", func(t *testing.T) {
		proc, token := restore(t, pool, a)
		for _, tc := range []struct{ script, want string }{
			{"whoami", "alice"},
			{"pwd", "/srv/app"},
			{`echo "$GREETING|$SPACED"`, "hello|a b"},
			{"cat /opt/marker", "built-by-root"},
			{"cat data.txt", "data from the context"},
			{"stat -c %U:%a data.txt main.py greeting.txt", "user:644\nuser:644\nuser:644"},
			{"cat greeting.txt", "hello from /srv/app"},
			{"cat ~/who", "alice"},
			{"curl -s localhost:8000/data.txt", "data from the context"},
			{"pgrep -fx 'python3 -m http.server 8000' | wc -l", "1"},
			{"cat /.e2b", "ENV_ID=tpltest\nTEMPLATE_ID=tpltest\nBUILD_ID=build-1"},
		} {
			if got := strings.TrimSpace(run(t, proc, token, tc.script)); got != tc.want {
				t.Errorf("%q printed %q, want %q", tc.script, got, tc.want)
			}
		}
	})

	t.Run("an unchanged rebuild is cached", func(t *testing.T) {
		var log buildLog
		t0 := time.Now()
		a2, err := b.Build(t.Context(), req("build-2", &log, steps))
		took := time.Since(t0)
		t.Logf("cached build: %s\n%s", took.Round(time.Millisecond), log.String())
		if err != nil {
			t.Fatal(err)
		}
		if took > firstTime/5 {
			t.Errorf("the cached build took %s, more than 20%% of the first's %s", took, firstTime)
		}
		if a2.BuildID != "build-2" || a2.Dir == a.Dir {
			t.Errorf("cached build artifact %+v", a2)
		}
		if _, err := template.LoadArtifact(a2.Dir); err != nil {
			t.Errorf("LoadArtifact: %v", err)
		}

		// build-1 deleted, a collection that keeps no cache beyond live
		// builds removes its artifact (build-2 shares its snapshot's
		// files) and keeps the layers build-2 builds on, read from the
		// headers QEMU wrote: build-2 still starts, and its steps are
		// still cached for the next subtest.
		res, err := template.CollectGarbage(t.Context(), template.GCOptions{
			DataDir: dataDir, CacheMax: 0,
			Live: func(context.Context) ([]string, error) { return []string{a2.Dir}, nil },
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("collection: %+v", res)
		if _, err := os.Stat(a.Dir); !os.IsNotExist(err) || res.Removed["artifact"] != 1 || res.Removed["layer"] != 0 {
			t.Errorf("after the collection build-1's artifact: %v; removed %v, want build-1's artifact alone", err, res.Removed)
		}
		proc, token := restore(t, pool, a2)
		if got := strings.TrimSpace(run(t, proc, token, "cat /opt/marker ~/who")); got != "built-by-root\nalice" {
			t.Errorf("a sandbox of build-2 after the collection read %q", got)
		}
	})

	t.Run("a changed step reruns from there", func(t *testing.T) {
		var log buildLog
		changed := slices.Clone(steps)
		changed[6] = template.Step{Type: "RUN", Args: []string{"echo changed > ~/who"}}
		if _, err := b.Build(t.Context(), req("build-3", &log, changed)); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		for _, step := range []string{"1", "2", "3", "4", "5", "6"} {
			if !log.has(step, "cached") {
				t.Errorf("step %s was not cached:\n%s", step, log.String())
			}
		}
		if log.has("7", "cached") {
			t.Errorf("the changed step 7 was cached")
		}
	})

	t.Run("a failing step names itself and leaves nothing", func(t *testing.T) {
		var log buildLog
		layersBefore, _ := filepath.Glob(filepath.Join(dataDir, "templates", "layers", "*"))
		bad := []template.Step{steps[0], {Type: "RUN", Args: []string{"echo about to fail; exit 3"}}}
		_, err := b.Build(t.Context(), req("build-bad", &log, bad))
		var be *template.BuildError
		if !errors.As(err, &be) || be.Step != "2" || !strings.Contains(be.Message, "code 3") {
			t.Fatalf("err = %v, want a BuildError of step 2 with exit code 3\n%s", err, log.String())
		}
		if !log.has("2", "about to fail") {
			t.Errorf("the step's output is not in the log:\n%s", log.String())
		}
		if _, err := os.Stat(filepath.Join(dataDir, "templates", "tpltest", "build-bad")); !os.IsNotExist(err) {
			t.Errorf("the failed build's directory remains: %v", err)
		}
		layersAfter, _ := filepath.Glob(filepath.Join(dataDir, "templates", "layers", "*"))
		for _, f := range layersAfter {
			if !slices.Contains(layersBefore, f) && strings.Contains(f, "build-bad") {
				t.Errorf("the failed build left %s", f)
			}
		}
	})
}

// restore starts a sandbox VM from a and /inits it as a node does with the
// template's defaults; it returns a process client and the access token.
func restore(t *testing.T, pool *netns.Pool, a *template.Artifact) (processconnect.ProcessClient, string) {
	t.Helper()
	slot, err := pool.Acquire(t.Context(), netns.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Release(slot) })
	vm, err := rt.Start(t.Context(), a.Spec("restore-"+a.BuildID, slot))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Kill(context.Background(), vm) })
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 60 * time.Second}
	url := "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983")
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("envd did not answer: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	body := fmt.Sprintf(`{"accessToken":"tok","timestamp":%q,"defaultUser":%q,"defaultWorkdir":%q}`,
		time.Now().UTC().Format(time.RFC3339Nano), a.User, a.Workdir)
	if len(a.Env) > 0 {
		var kv []string
		for k, v := range a.Env {
			kv = append(kv, fmt.Sprintf("%q:%q", k, v))
		}
		body = strings.TrimSuffix(body, "}") + `,"envVars":{` + strings.Join(kv, ",") + "}}"
	}
	req, _ := http.NewRequest(http.MethodPost, url+"/init", strings.NewReader(body))
	req.Header.Set(envd.InitSecretHeader, a.InitSecret)
	resp, err := client.Do(req)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("/init: %v %v", resp, err)
	}
	resp.Body.Close()
	return processconnect.NewProcessClient(client, url, connect.WithProtoJSON()), "tok"
}

// TestBuildFromImage builds from an OCI image the test makes (the Debian
// base's tree plus a marker file) and imports into an image store.
func TestBuildFromImage(t *testing.T) {
	pool := newPool(t)
	base := ensureBase(t, pool)
	b, dataDir := newBuilder(t, pool, base)
	archive := ocitest.DebianArchive(t, base.RootDisk, map[string]string{"/etc/compat-image.txt": "from the imported image\n"})
	store := &oci.Store{Dir: filepath.Join(dataDir, "images")}
	if _, err := store.Import(t.Context(), "debian-test:v1", archive); err != nil {
		t.Fatal(err)
	}
	fs, err := store.RootImage(t.Context(), "debian-test:v1", envdBin, nil)
	if err != nil {
		t.Fatal(err)
	}
	var log buildLog
	a, err := b.Build(t.Context(), template.BuildRequest{
		BuildID: "image-1", TemplateID: "imgtest",
		From:  template.Source{RootImage: fs.Path, Env: map[string]string{"FROM_IMAGE": "yes"}},
		Steps: []template.Step{{Type: "RUN", Args: []string{"cp /etc/compat-image.txt /home/user/copied.txt"}}},
		CPUs:  base.CPUs, MemoryMiB: base.MemoryMiB, Log: log.add,
	})
	t.Logf("build log:\n%s", log.String())
	if err != nil {
		t.Fatal(err)
	}
	// The image store may prune its root image: the template must not care.
	if err := store.Remove("debian-test:v1"); err != nil {
		t.Fatal(err)
	}
	proc, token := restore(t, pool, a)
	for _, tc := range []struct{ script, want string }{
		{"whoami", "user"},
		{"cat ~/copied.txt", "from the imported image"},
		{"echo $FROM_IMAGE", "yes"},
		{"sudo -n id -u", "0"},
	} {
		if got := strings.TrimSpace(run(t, proc, token, tc.script)); got != tc.want {
			t.Errorf("%q printed %q, want %q", tc.script, got, tc.want)
		}
	}
}

// TestBuildMinFreeDisk asks for more free disk than base leaves (~1 GiB):
// the build grows the disk and its file system, and sandboxes have the room.
func TestBuildMinFreeDisk(t *testing.T) {
	pool := newPool(t)
	base := ensureBase(t, pool)
	b, _ := newBuilder(t, pool, base)
	var log buildLog
	a, err := b.Build(t.Context(), template.BuildRequest{
		BuildID: "disk-1", TemplateID: "disktest", From: template.Source{Template: base},
		Steps:          []template.Step{{Type: "RUN", Args: []string{"true"}}},
		MinFreeDiskMiB: 2048, CPUs: base.CPUs, MemoryMiB: base.MemoryMiB, Log: log.add,
	})
	t.Logf("build log:\n%s", log.String())
	if err != nil {
		t.Fatal(err)
	}
	if !log.has("finalize", "growing the disk") {
		t.Errorf("the build did not grow the disk")
	}
	proc, token := restore(t, pool, a)
	out := strings.TrimSpace(run(t, proc, token, "df -B1M --output=avail / | tail -n 1"))
	free, err := strconv.Atoi(out)
	if err != nil || free < 2048 {
		t.Errorf("a sandbox of the template has %q MiB free, want at least 2048", out)
	}
}
