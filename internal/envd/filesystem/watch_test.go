package filesystem_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"connectrpc.com/connect"

	rpc "github.com/warren-sh/warren/gen/filesystem"
	"github.com/warren-sh/warren/internal/envd/envdtest"
)

const (
	evCreate = rpc.EventType_EVENT_TYPE_CREATE
	evWrite  = rpc.EventType_EVENT_TYPE_WRITE
	evRemove = rpc.EventType_EVENT_TYPE_REMOVE
	evRename = rpc.EventType_EVENT_TYPE_RENAME
	evChmod  = rpc.EventType_EVENT_TYPE_CHMOD
)

func TestWatchDir(t *testing.T) {
	e := newEnv(t)
	for _, c := range codecs {
		t.Run(c.name, func(t *testing.T) {
			fs := e.client("user", c.opts...)
			t.Run("reports create, write, chmod, rename and remove by name", func(t *testing.T) {
				dir := e.path(c.name + "-flat")
				e.mkdir(t, dir)
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir}, nil)
				e.writeFile(t, dir+"/new.txt", "hi")
				ev := ws.waitEvent(t, isEvent(evCreate, "new.txt"))
				if ev.Entry != nil {
					t.Errorf("entry %v sent without include_entry", ev.GetEntry())
				}
				ws.waitEvent(t, isEvent(evWrite, "new.txt"))
				if err := os.Chmod(dir+"/new.txt", 0o600); err != nil {
					t.Fatal(err)
				}
				ws.waitEvent(t, isEvent(evChmod, "new.txt"))
				if err := os.Rename(dir+"/new.txt", dir+"/renamed.txt"); err != nil {
					t.Fatal(err)
				}
				ws.waitEvent(t, isEvent(evRename, "new.txt"))
				ws.waitEvent(t, isEvent(evCreate, "renamed.txt"))
				if err := os.Remove(dir + "/renamed.txt"); err != nil {
					t.Fatal(err)
				}
				ws.waitEvent(t, isEvent(evRemove, "renamed.txt"))
			})
			t.Run("non-recursive watch ignores subdirectories", func(t *testing.T) {
				dir := e.path(c.name + "-nonrec")
				e.mkdir(t, dir)
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir}, nil)
				e.mkdir(t, dir+"/sub")
				ws.waitEvent(t, isEvent(evCreate, "sub"))
				e.writeFile(t, dir+"/sub/inner.txt", "x")
				e.writeFile(t, dir+"/marker.txt", "x")
				// Events arrive in order: anything from sub/ would come before the marker.
				ws.waitEvent(t, func(ev *rpc.FilesystemEvent) bool {
					if ev.GetName() == "sub/inner.txt" {
						t.Errorf("non-recursive watch reported %v %s", ev.GetType(), ev.GetName())
					}
					return ev.GetName() == "marker.txt"
				})
			})
			t.Run("recursive watch follows new subdirectories", func(t *testing.T) {
				dir := e.path(c.name + "-rec")
				e.mkdir(t, dir+"/existing")
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir, Recursive: true}, nil)
				e.writeFile(t, dir+"/existing/a.txt", "a")
				ws.waitEvent(t, isEvent(evCreate, "existing/a.txt"))
				// Made at once, before envd can watch the new directories.
				e.writeFile(t, dir+"/sub/deeper/new.txt", "new")
				ws.waitEvent(t, isEvent(evCreate, "sub/deeper/new.txt"))
				e.writeFile(t, dir+"/sub/deeper/later.txt", "later")
				ws.waitEvent(t, isEvent(evCreate, "sub/deeper/later.txt"))
			})
			t.Run("recursive watch stops reporting a moved-away subdirectory under its old name", func(t *testing.T) {
				dir := e.path(c.name + "-moved")
				e.mkdir(t, dir+"/sub/inner")
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir, Recursive: true}, nil)
				if err := os.Rename(dir+"/sub", e.path(c.name+"-moved-away")); err != nil {
					t.Fatal(err)
				}
				ws.waitEvent(t, isEvent(evRename, "sub"))
				e.writeFile(t, e.path(c.name+"-moved-away", "inner", "x.txt"), "x")
				e.writeFile(t, dir+"/marker.txt", "x")
				ws.waitEvent(t, func(ev *rpc.FilesystemEvent) bool {
					if ev.GetName() == "sub/inner/x.txt" || ev.GetName() == "sub" {
						t.Errorf("moved directory still reported: %v %s", ev.GetType(), ev.GetName())
					}
					return ev.GetName() == "marker.txt"
				})
			})
			t.Run("recursive watch reports a subdirectory's chmod once", func(t *testing.T) {
				dir := e.path(c.name + "-chmod")
				e.mkdir(t, dir+"/sub")
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir, Recursive: true}, nil)
				if err := os.Chmod(dir+"/sub", 0o700); err != nil {
					t.Fatal(err)
				}
				ws.waitEvent(t, isEvent(evChmod, "sub"))
				e.writeFile(t, dir+"/marker.txt", "x")
				ws.waitEvent(t, func(ev *rpc.FilesystemEvent) bool {
					if ev.GetName() == "sub" {
						t.Errorf("second event for sub: %v", ev.GetType())
					}
					return ev.GetName() == "marker.txt"
				})
			})
			t.Run("include_entry describes created and written entries only", func(t *testing.T) {
				dir := e.path(c.name + "-entry")
				e.mkdir(t, dir)
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: dir, IncludeEntry: true}, nil)
				e.writeFile(t, dir+"/f.txt", "hello")
				ev := ws.waitEvent(t, isEvent(evCreate, "f.txt"))
				if got := ev.GetEntry(); got.GetName() != "f.txt" || got.GetPath() != dir+"/f.txt" || got.GetType() != rpc.FileType_FILE_TYPE_FILE {
					t.Errorf("create entry = %v", got)
				}
				ev = ws.waitEvent(t, isEvent(evWrite, "f.txt"))
				if ev.GetEntry().GetPath() != dir+"/f.txt" {
					t.Errorf("write entry = %v", ev.GetEntry())
				}
				if err := os.Remove(dir + "/f.txt"); err != nil {
					t.Fatal(err)
				}
				if ev := ws.waitEvent(t, isEvent(evRemove, "f.txt")); ev.Entry != nil {
					t.Errorf("remove event has entry %v", ev.GetEntry())
				}
			})
			t.Run("keepalive when idle", func(t *testing.T) {
				ws := openWatch(t, fs, &rpc.WatchDirRequest{Path: e.dir}, map[string]string{"Keepalive-Ping-Interval": "1"})
				select {
				case m, ok := <-ws.msgs:
					if !ok || m.GetKeepalive() == nil {
						t.Fatalf("got %v (stream err %v), want keepalive", m, ws.err)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("no keepalive within 5s with Keepalive-Ping-Interval: 1")
				}
			})
			errorCases := []struct {
				name string
				req  *rpc.WatchDirRequest
				code connect.Code
			}{
				{"missing directory is not_found", &rpc.WatchDirRequest{Path: e.path("nope")}, connect.CodeNotFound},
				{"a file is invalid_argument", &rpc.WatchDirRequest{Path: e.path(c.name + "-file")}, connect.CodeInvalidArgument},
				{"an unreadable directory is permission_denied", &rpc.WatchDirRequest{Path: "/root"}, connect.CodePermissionDenied},
				{"another user's home is invalid_argument", &rpc.WatchDirRequest{Path: "~other"}, connect.CodeInvalidArgument},
			}
			e.writeFile(t, e.path(c.name+"-file"), "x")
			for _, tc := range errorCases {
				t.Run(tc.name, func(t *testing.T) {
					wantCode(t, streamErr(t, fs, tc.req), tc.code)
				})
			}
		})
	}
	t.Run("root may watch /root", func(t *testing.T) {
		dir, err := os.MkdirTemp("/root", "fstest-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		ws := openWatch(t, e.client("root"), &rpc.WatchDirRequest{Path: dir}, nil)
		if err := os.WriteFile(dir+"/r.txt", nil, 0o600); err != nil {
			t.Fatal(err)
		}
		ws.waitEvent(t, isEvent(evCreate, "r.txt"))
	})
}

// TestWatchDirJSONWire checks the bytes the SDK parses: Connect streaming
// envelopes whose JSON flattens the oneof (ENVD.md §5).
func TestWatchDirJSONWire(t *testing.T) {
	e := newEnv(t)
	body, _ := json.Marshal(map[string]any{"path": e.dir})
	var envelope bytes.Buffer
	envelope.WriteByte(0)
	binary.Write(&envelope, binary.BigEndian, uint32(len(body)))
	envelope.Write(body)
	req, err := http.NewRequestWithContext(ctx(t), http.MethodPost, e.agent.URL+"/filesystem.Filesystem/WatchDir", &envelope)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Connect-Protocol-Version", "1")
	req.Header.Set("Connect-Timeout-Ms", "10000")
	req.Header.Set("Authorization", envdtest.BasicAuth("user"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/connect+json" {
		t.Fatalf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(resp.Body)

	if got := readEnvelope(t, r); got != `{"start":{}}` {
		t.Fatalf("first message %s, want {\"start\":{}}", got)
	}
	e.writeFile(t, e.path("wire.txt"), "")
	want := `{"filesystem":{"name":"wire.txt","type":"EVENT_TYPE_CREATE"}}`
	if got := readEnvelope(t, r); got != want {
		t.Fatalf("event %s, want %s", got, want)
	}
}

// readEnvelope reads one Connect message envelope and returns its JSON,
// compacted (protojson varies whitespace on purpose).
func readEnvelope(t *testing.T, r io.Reader) string {
	t.Helper()
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		t.Fatalf("read envelope header: %v", err)
	}
	payload := make([]byte, binary.BigEndian.Uint32(head[1:]))
	if _, err := io.ReadFull(r, payload); err != nil {
		t.Fatalf("read envelope: %v", err)
	}
	if head[0] != 0 {
		t.Fatalf("envelope flags %#x (payload %s), want 0 (uncompressed message)", head[0], payload)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, payload); err != nil {
		t.Fatalf("payload %q is not JSON: %v", payload, err)
	}
	return compact.String()
}

func TestWatchers(t *testing.T) {
	e := newEnv(t)
	for _, c := range codecs {
		t.Run(c.name, func(t *testing.T) {
			fs := e.client("user", c.opts...)
			dir := e.path(c.name)
			e.mkdir(t, dir)
			created, err := fs.CreateWatcher(ctx(t), connect.NewRequest(&rpc.CreateWatcherRequest{Path: dir, Recursive: true, IncludeEntry: true}))
			if err != nil {
				t.Fatal(err)
			}
			id := created.Msg.GetWatcherId()
			if id == "" {
				t.Fatal("empty watcher_id")
			}
			e.writeFile(t, dir+"/sub/polled.txt", "x")

			var seen []string
			deadline := time.Now().Add(10 * time.Second)
			for found := false; !found; {
				if time.Now().After(deadline) {
					t.Fatalf("no CREATE sub/polled.txt within 10s; saw %v", seen)
				}
				resp, err := fs.GetWatcherEvents(ctx(t), connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: id}))
				if err != nil {
					t.Fatal(err)
				}
				for _, ev := range resp.Msg.GetEvents() {
					seen = append(seen, fmt.Sprint(ev.GetType(), " ", ev.GetName()))
					if ev.GetType() == evCreate && ev.GetName() == "sub/polled.txt" {
						found = true
						if ev.GetEntry().GetPath() != dir+"/sub/polled.txt" {
							t.Errorf("entry %v", ev.GetEntry())
						}
					}
				}
				time.Sleep(50 * time.Millisecond)
			}
			t.Run("events are drained", func(t *testing.T) {
				resp, err := fs.GetWatcherEvents(ctx(t), connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: id}))
				if err != nil {
					t.Fatal(err)
				}
				for _, ev := range resp.Msg.GetEvents() {
					if ev.GetType() == evCreate && ev.GetName() == "sub/polled.txt" {
						t.Errorf("event returned twice: %v", ev)
					}
				}
			})
			t.Run("removed watcher is gone", func(t *testing.T) {
				if _, err := fs.RemoveWatcher(ctx(t), connect.NewRequest(&rpc.RemoveWatcherRequest{WatcherId: id})); err != nil {
					t.Fatal(err)
				}
				_, err := fs.GetWatcherEvents(ctx(t), connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: id}))
				wantCode(t, err, connect.CodeNotFound)
			})
			t.Run("unknown id is not_found", func(t *testing.T) {
				_, err := fs.GetWatcherEvents(ctx(t), connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: "wnope"}))
				wantCode(t, err, connect.CodeNotFound)
				_, err = fs.RemoveWatcher(ctx(t), connect.NewRequest(&rpc.RemoveWatcherRequest{WatcherId: "wnope"}))
				wantCode(t, err, connect.CodeNotFound)
			})
			t.Run("missing directory is not_found", func(t *testing.T) {
				_, err := fs.CreateWatcher(ctx(t), connect.NewRequest(&rpc.CreateWatcherRequest{Path: e.path("nope")}))
				wantCode(t, err, connect.CodeNotFound)
			})
		})
	}
}
