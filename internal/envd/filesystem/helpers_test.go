package filesystem_test

import (
	"context"
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"connectrpc.com/connect"

	rpc "github.com/warren-sh/warren/gen/filesystem"
	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
)

// codecs are the wire formats every cheap case runs with: binary protobuf
// (Go tooling) and JSON (what the SDKs send).
var codecs = []struct {
	name string
	opts []connect.ClientOption
}{
	{"proto", nil},
	{"json", []connect.ClientOption{connect.WithProtoJSON()}},
}

// env is one test's agent and scratch directory.
type env struct {
	agent *envdtest.Agent
	dir   string // fresh, under /home/user, owned by user
	uid   int
	gid   int
}

// newEnv starts envd and makes a scratch directory for the test, owned by
// the test user and removed at the end.
func newEnv(t *testing.T) *env {
	t.Helper()
	a := envdtest.Start(t, envdtest.Options{})
	u, err := user.Lookup(envdtest.TestUser)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	dir, err := os.MkdirTemp(u.HomeDir, "fstest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return &env{agent: a, dir: dir, uid: uid, gid: gid}
}

// client acts as name ("" sends no user: the default user, "user").
func (e *env) client(name string, opts ...connect.ClientOption) filesystemconnect.FilesystemClient {
	return e.agent.FilesystemClient(append(opts, envdtest.AsUser(name, ""))...)
}

// path is p inside the scratch directory.
func (e *env) path(p ...string) string {
	return filepath.Join(append([]string{e.dir}, p...)...)
}

// writeFile creates a file owned by the test user.
func (e *env) writeFile(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	e.chown(t, p)
}

// mkdir creates a directory owned by the test user.
func (e *env) mkdir(t *testing.T, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	e.chown(t, p)
}

// symlink creates a link owned by the test user.
func (e *env) symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, e.uid, e.gid); err != nil {
		t.Fatal(err)
	}
}

func (e *env) chown(t *testing.T, p string) {
	t.Helper()
	if err := os.Lchown(p, e.uid, e.gid); err != nil {
		t.Fatal(err)
	}
}

// ctx is a per-call deadline so a hung agent fails the test instead of the run.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// wantCode fails unless err is a Connect error with code.
func wantCode(t *testing.T, err error, code connect.Code) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", code)
	}
	if got := connect.CodeOf(err); got != code {
		t.Fatalf("got %v (%v), want %v", got, err, code)
	}
}

// watchStream is an open WatchDir stream whose messages a goroutine pumps
// into a channel, so tests can wait with a timeout.
type watchStream struct {
	msgs chan *rpc.WatchDirResponse
	err  error // set when msgs is closed
}

// openWatch starts WatchDir and checks that the first message is start.
func openWatch(t *testing.T, c filesystemconnect.FilesystemClient, msg *rpc.WatchDirRequest, headers map[string]string) *watchStream {
	t.Helper()
	streamCtx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	req := connect.NewRequest(msg)
	for k, v := range headers {
		req.Header().Set(k, v)
	}
	stream, err := c.WatchDir(streamCtx, req)
	if err != nil {
		cancel()
		t.Fatalf("WatchDir: %v", err)
	}
	if !stream.Receive() {
		cancel()
		t.Fatalf("WatchDir ended before its first message: %v", stream.Err())
	}
	if stream.Msg().GetStart() == nil {
		cancel()
		t.Fatalf("first WatchDir message is %v, want start", stream.Msg())
	}
	ws := &watchStream{msgs: make(chan *rpc.WatchDirResponse)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(ws.msgs)
		for stream.Receive() {
			select {
			case ws.msgs <- stream.Msg():
			case <-streamCtx.Done():
				return
			}
		}
		ws.err = stream.Err()
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		stream.Close()
	})
	return ws
}

// waitEvent returns the first filesystem event that matches, skipping others
// and keepalives; it fails after timeout.
func (ws *watchStream) waitEvent(t *testing.T, match func(*rpc.FilesystemEvent) bool) *rpc.FilesystemEvent {
	t.Helper()
	var seen []string
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m, ok := <-ws.msgs:
			if !ok {
				t.Fatalf("watch stream ended (%v); events seen: %v", ws.err, seen)
			}
			if ev := m.GetFilesystem(); ev != nil {
				if match(ev) {
					return ev
				}
				seen = append(seen, ev.GetType().String()+" "+ev.GetName())
			}
		case <-timeout:
			t.Fatalf("no matching event within 10s; events seen: %v", seen)
		}
	}
}

// isEvent matches an event by type and name.
func isEvent(typ rpc.EventType, name string) func(*rpc.FilesystemEvent) bool {
	return func(ev *rpc.FilesystemEvent) bool { return ev.GetType() == typ && ev.GetName() == name }
}

// streamErr opens WatchDir and returns the error it ends with before any message.
func streamErr(t *testing.T, c filesystemconnect.FilesystemClient, msg *rpc.WatchDirRequest) error {
	t.Helper()
	stream, err := c.WatchDir(ctx(t), connect.NewRequest(msg))
	if err != nil {
		return err
	}
	defer stream.Close()
	if stream.Receive() {
		t.Fatalf("WatchDir answered %v, want an error", stream.Msg())
	}
	if stream.Err() == nil {
		return errors.New("stream ended without error")
	}
	return stream.Err()
}
