package server_test

// These tests run warren as `warren up` does (server.Run) with real
// sandboxes: microVMs restored under QEMU (TCG here) in real network slots,
// driven through warren's API and proxy on a loopback port. They need root.
// The data directory is the test binary's own, seeded with hard links to the
// guest kernel and base root image cached in cacheDir; the first start of
// warren makes the base template's snapshot in it (seconds).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/image"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm/microvmtest"
	"github.com/warren-sh/warren/internal/server"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/sqlite"
)

// cacheDir is the data directory shared with the other VM tests (kernel,
// root image), kept between runs.
const cacheDir = "/var/tmp/warren-test-cache"

// dataPrefix names this binary's data directory in cacheDir (the same file
// system, for hard links): <dataPrefix><pid>-*.
const dataPrefix = ".server-test-"

// apiKey is the first API key of every test's fresh store.
const apiKey = "e2b_5e4f5e4f5e4f5e4f5e4f5e4f5e4f5e4f5e4f5e4f"

var (
	seedOnce sync.Once
	seedErr  error
	workDir  string // envd built for the tests
	envdBin  string
	dataDir  string // warren's data directory in these tests
)

func TestMain(m *testing.M) {
	code := m.Run()
	if workDir != "" {
		os.RemoveAll(workDir)
	}
	if dataDir != "" {
		os.RemoveAll(dataDir)
	}
	os.Exit(code)
}

// seedDataDir makes the tests' data directory once: envd built from this
// checkout, the cached base root image given that envd (as the other VM tests
// do), then the kernel and root image hard-linked into a directory of this
// binary's own.
func seedDataDir(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("runs microVMs in network namespaces: run as root")
	}
	seedOnce.Do(func() {
		// Data directories of earlier binaries that died without cleanup.
		microvmtest.ReapLeftovers(cacheDir, dataPrefix)
		if workDir, seedErr = os.MkdirTemp("", "warren-server-test-"); seedErr != nil {
			return
		}
		envdBin = filepath.Join(workDir, "envd")
		build := exec.Command("go", "build", "-o", envdBin, "github.com/warren-sh/warren/cmd/envd")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			seedErr = fmt.Errorf("build envd: %v\n%s", err, out)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		if _, seedErr = image.BuildDebianBase(ctx, image.DebianBaseOptions{DataDir: cacheDir, Envd: envdBin}); seedErr != nil {
			return
		}
		if dataDir, seedErr = os.MkdirTemp(cacheDir, dataPrefix+strconv.Itoa(os.Getpid())+"-"); seedErr != nil {
			return
		}
		for _, rel := range []string{"kernels", "templates/base/rootfs.ext4", "templates/base/manifest.json"} {
			if seedErr = linkTree(filepath.Join(cacheDir, rel), filepath.Join(dataDir, rel)); seedErr != nil {
				return
			}
		}
	})
	if seedErr != nil {
		t.Fatal(seedErr)
	}
}

// linkTree hard-links the file or directory tree src to dst.
func linkTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		switch {
		case e.IsDir():
			return os.MkdirAll(to, 0o755)
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, to)
		}
		if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
			return err
		}
		return os.Link(p, to)
	})
}

// syncBuffer is a bytes.Buffer that warren's goroutines write while the
// test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// warren is one run of server.Run.
type warren struct {
	url    string
	cancel context.CancelFunc // SIGTERM
	done   chan error
	log    *syncBuffer
	once   sync.Once // stop's
}

var readyURL = regexp.MustCompile(`API and sandbox traffic on (http://\S+)`)

// startWarren runs warren on the tests' data directory until the test ends
// (or stop), with the store it has: a test that wants a fresh one calls
// freshStore first.
func startWarren(t *testing.T, shutdownTimeout time.Duration) *warren {
	t.Helper()
	seedDataDir(t)
	ctx, cancel := context.WithCancel(context.Background())
	w := &warren{cancel: cancel, done: make(chan error, 1), log: &syncBuffer{}}
	out := &syncBuffer{}
	cfg := server.Config{
		Listen: "127.0.0.1:0", DataDir: dataDir, TLS: "off", VMAccel: "auto", GuestASLR: "auto",
		Envd: envdBin, SlotRange: netns.DefaultRange, MaxSandboxes: 10, MaxLifetime: time.Hour,
		NodeMaxSandboxes: 4, BootstrapAPIKey: apiKey, ShutdownTimeout: shutdownTimeout,
	}
	log := slog.New(slog.NewTextHandler(w.log, nil))
	go func() { w.done <- server.Run(ctx, cfg, out, log) }()
	t.Cleanup(func() {
		w.stop(t)
		if t.Failed() {
			t.Logf("warren's output:\n%s\nwarren's log:\n%s", out, w.log)
		}
	})
	deadline := time.Now().Add(10 * time.Minute) // the first start snapshots the base template
	for !strings.Contains(out.String(), "\nready\n") {
		select {
		case err := <-w.done:
			w.done <- err
			t.Fatalf("warren stopped before it was ready: %v\n%s\n%s", err, out, w.log)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("warren not ready after 10 minutes:\n%s", out)
		}
	}
	m := readyURL.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("no URL in warren's output:\n%s", out)
	}
	w.url = m[1]
	return w
}

// stop shuts warren down as SIGTERM does and waits for Run to return; a
// second stop does nothing.
func (w *warren) stop(t *testing.T) {
	t.Helper()
	w.once.Do(func() {
		w.cancel()
		select {
		case err := <-w.done:
			if err != nil {
				t.Errorf("warren ended with %v", err)
			}
		case <-time.After(5 * time.Minute):
			t.Fatal("warren did not stop within 5 minutes")
		}
	})
}

// freshStore removes the store of earlier tests, as a new install has none.
func freshStore(t *testing.T) {
	t.Helper()
	seedDataDir(t)
	for _, f := range []string{"warren.db", "warren.db-wal", "warren.db-shm", "api-key"} {
		if err := os.Remove(filepath.Join(dataDir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
	}
}

// call sends an API request and decodes the JSON answer into out (if any);
// it returns the status.
func (w *warren) call(t *testing.T, method, path string, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, w.url+path, rd)
	req.Header.Set("X-API-Key", apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %s: %v", method, path, b, err)
		}
	}
	return resp.StatusCode
}

// sandbox is what a create or connect answers.
type sandbox struct {
	ID    string `json:"sandboxID"`
	Token string `json:"envdAccessToken"`
	State string `json:"state"`
}

func (w *warren) create(t *testing.T, autoPause bool) sandbox {
	t.Helper()
	var sb sandbox
	body := map[string]any{"templateID": "base", "timeout": 600, "autoPause": autoPause}
	if status := w.call(t, "POST", "/sandboxes", body, &sb); status != http.StatusCreated {
		t.Fatalf("create (autoPause %v): status %d", autoPause, status)
	}
	return sb
}

// run runs script with bash in the sandbox through warren's proxy; it must
// exit 0 within a minute.
func (w *warren) run(t *testing.T, sb sandbox, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream := w.start(ctx, t, sb, script)
	defer stream.Close()
	out, err := envdtest.Collect(stream)
	if err != nil || !out.OK() {
		t.Fatalf("%s: %q ended %v (%v): %s", sb.ID, script, out.End, err, out.Combined)
	}
	return out.Combined
}

// start starts script with bash in the sandbox through warren's proxy.
func (w *warren) start(ctx context.Context, t *testing.T, sb sandbox, script string) *connect.ServerStreamForClient[processpb.StartResponse] {
	t.Helper()
	client := processconnect.NewProcessClient(http.DefaultClient, w.url)
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}})
	req.Header().Set("E2b-Sandbox-Id", sb.ID)
	req.Header().Set("E2b-Sandbox-Port", "49983")
	req.Header().Set("X-Access-Token", sb.Token)
	stream, err := client.Start(ctx, req)
	if err != nil {
		t.Fatalf("%s: %q: %v", sb.ID, script, err)
	}
	return stream
}

// follow starts script in the sandbox through warren's proxy, waits for its
// first output and returns a channel that receives how the stream ended.
func (w *warren) follow(t *testing.T, sb sandbox, script string) <-chan error {
	t.Helper()
	stream := w.start(context.Background(), t, sb, script)
	started := false
	for !started && stream.Receive() {
		started = len(stream.Msg().GetEvent().GetData().GetStdout()) > 0
	}
	if !started {
		stream.Close()
		t.Fatalf("%s: %q printed nothing: %v", sb.ID, script, stream.Err())
	}
	ended := make(chan error, 1)
	go func() {
		defer stream.Close()
		for stream.Receive() {
		}
		ended <- stream.Err()
	}()
	return ended
}

// counterScript starts a background loop that counts into /tmp/count (RAM:
// a tmpfs) and prints its pid.
const counterScript = `setsid bash -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`

// countsOn fails unless the loop pid runs and counts past from; it returns
// the count.
func (w *warren) countsOn(t *testing.T, sb sandbox, pid string, from int) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out := strings.TrimSpace(w.run(t, sb, "kill -0 "+pid+" && cat /tmp/count"))
		n, err := strconv.Atoi(out)
		if err != nil {
			t.Fatalf("%s: /tmp/count is %q", sb.ID, out)
		}
		if n > from {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the loop (pid %s) stays at %d, want past %d", sb.ID, pid, n, from)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// storedStates reads the store of the stopped warren: sandbox ID → row.
func storedStates(t *testing.T) map[string]*store.Sandbox {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(dataDir, "warren.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	list, err := st.ListSandboxes(context.Background(), store.SandboxFilter{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*store.Sandbox{}
	for _, sb := range list {
		out[sb.ID] = sb
	}
	return out
}

// savedState reports whether the blob storage holds a paused sandbox's state.
func savedState(id string) bool {
	_, err := os.Stat(filepath.Join(dataDir, "blobs", "paused", id))
	return err == nil
}

// SIGTERM pauses a running sandbox created with autoPause and kills the
// others; after the restart the paused one resumes through connect with its
// files and its running process, which counts on from where it was.
func TestShutdownPausesAutoPauseSandboxes(t *testing.T) {
	freshStore(t)
	w := startWarren(t, 0)
	keep, gone := w.create(t, true), w.create(t, false)
	pid := strings.TrimSpace(w.run(t, keep, "echo kept > ~/file && "+counterScript))
	count := w.countsOn(t, keep, pid, 0)
	// A client follows a long command: its stream must not hold up the
	// shutdown (requests in flight get up to 10 s, streams are cut at once).
	streamEnded := w.follow(t, gone, "echo started; sleep 600")

	began := time.Now()
	w.stop(t)
	took := time.Since(began)
	t.Logf("shutdown took %s", took.Round(time.Millisecond))
	if took > 8*time.Second {
		t.Errorf("shutdown took %s with a command stream open, want it cut at once (well under the 10 s for requests in flight)", took.Round(time.Millisecond))
	}
	select {
	case err := <-streamEnded:
		t.Logf("the open command stream ended with: %v", err)
	case <-time.After(5 * time.Second):
		t.Error("the open command stream did not end with the shutdown")
	}
	rows := storedStates(t)
	if sb := rows[keep.ID]; sb == nil || sb.State != store.StatePaused || sb.Paused == nil || !sb.Paused.Memory {
		t.Errorf("the autoPause sandbox is stored as %+v, want paused with its memory", sb)
	}
	if sb := rows[gone.ID]; sb != nil {
		t.Errorf("the sandbox without autoPause is still stored: %+v", sb)
	}
	if !savedState(keep.ID) || savedState(gone.ID) {
		t.Errorf("saved states: autoPause one %v (want true), other %v (want false)", savedState(keep.ID), savedState(gone.ID))
	}
	for _, want := range []string{"pausing 1 with autoPause, killing 1 without", "sandbox paused at shutdown", "sandbox killed at shutdown"} {
		if !strings.Contains(w.log.String(), want) {
			t.Errorf("the shutdown did not log %q", want)
		}
	}

	w = startWarren(t, 0)
	var info sandbox
	if status := w.call(t, "GET", "/sandboxes/"+keep.ID, nil, &info); status != http.StatusOK || info.State != "paused" {
		t.Fatalf("after the restart the autoPause sandbox answers %d, state %q; want paused", status, info.State)
	}
	if status := w.call(t, "GET", "/sandboxes/"+gone.ID, nil, nil); status != http.StatusNotFound {
		t.Errorf("after the restart the killed sandbox answers %d, want 404", status)
	}
	var resumed sandbox
	if status := w.call(t, "POST", "/sandboxes/"+keep.ID+"/connect", map[string]any{"timeout": 300}, &resumed); status != http.StatusCreated {
		t.Fatalf("connect answered %d, want 201 (resumed)", status)
	}
	if resumed.ID != keep.ID || resumed.Token != keep.Token {
		t.Errorf("connect returned %+v, want the same sandbox and token", resumed)
	}
	w.countsOn(t, keep, pid, count)
	if got := w.run(t, keep, "cat ~/file"); got != "kept\n" {
		t.Errorf("the file reads %q after the resume", got)
	}
	// Nothing left to pause at the cleanup's shutdown.
	if status := w.call(t, "DELETE", "/sandboxes/"+keep.ID, nil, nil); status != http.StatusNoContent {
		t.Errorf("kill answered %d", status)
	}
}

// A pause the shutdown's deadline cuts short (or finds not begun) ends in a
// kill: nothing stays pausing in the store or half-saved in the blobs.
func TestShutdownKillsWhatItCannotPauseInTime(t *testing.T) {
	freshStore(t)
	w := startWarren(t, 100*time.Millisecond)
	sb := w.create(t, true)
	// RAM to save that takes far longer than 100 ms to write (migration
	// skips zero pages only).
	w.run(t, sb, `python3 -c 'open("/dev/shm/fill", "wb").write(b"x" * (160 << 20))'`)

	w.stop(t)
	rows := storedStates(t)
	if len(rows) != 0 {
		for id, row := range rows {
			t.Errorf("still stored after the shutdown: %s %s", id, row.State)
		}
	}
	if savedState(sb.ID) {
		t.Error("a saved state is left in the blobs")
	}
	if !strings.Contains(w.log.String(), "sandbox killed at shutdown") {
		t.Errorf("the shutdown did not log the kill")
	}
	for _, line := range strings.Split(w.log.String(), "\n") {
		if strings.Contains(line, "killed at shutdown") {
			t.Log(line)
		}
	}
}
