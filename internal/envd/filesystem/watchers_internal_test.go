package filesystem

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	rpc "github.com/warren-sh/warren/gen/filesystem"
	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/envd/state"
)

// TestPollWatcherDropsOldest fills a polling watcher's buffer past its bound:
// the oldest events go, the newest stay.
func TestPollWatcherDropsOldest(t *testing.T) {
	events := make(chan *rpc.FilesystemEvent)
	pw := &pollWatcher{watch: &dirWatch{events: events}, log: slog.New(slog.DiscardHandler), done: make(chan struct{})}
	go pw.collect()
	const extra = 5
	for i := range maxBufferedEvents + extra {
		events <- &rpc.FilesystemEvent{Name: strconv.Itoa(i)}
	}
	close(events)
	<-pw.done
	got := pw.drain()
	if len(got) != maxBufferedEvents {
		t.Fatalf("buffered %d events, want %d", len(got), maxBufferedEvents)
	}
	if first, last := got[0].GetName(), got[len(got)-1].GetName(); first != strconv.Itoa(extra) || last != strconv.Itoa(maxBufferedEvents+extra-1) {
		t.Errorf("buffer holds %s..%s, want %d..%d", first, last, extra, maxBufferedEvents+extra-1)
	}
	if again := pw.drain(); len(again) != 0 {
		t.Errorf("second drain returned %d events, want 0", len(again))
	}
}

// TestWatchersConcurrentUse runs the service in this process, so that
// `go test -race` sees its goroutines (envdtest's binary has no race
// detector): a stream and several polling watchers while files change, then
// Close with watchers still running.
func TestWatchersConcurrentUse(t *testing.T) {
	envdtest.EnsureUser(t)
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
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}

	svc := NewService(state.New(envdtest.TestUser), slog.New(slog.DiscardHandler))
	path, h := filesystemconnect.NewFilesystemHandler(svc)
	mux := http.NewServeMux()
	mux.Handle(path, h)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	client := filesystemconnect.NewFilesystemClient(srv.Client(), srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	stream, err := client.WatchDir(ctx, connect.NewRequest(&rpc.WatchDirRequest{Path: dir, Recursive: true, IncludeEntry: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() || stream.Msg().GetStart() == nil {
		t.Fatalf("no start event: %v", stream.Err())
	}
	var ids []string
	for range 3 {
		resp, err := client.CreateWatcher(ctx, connect.NewRequest(&rpc.CreateWatcherRequest{Path: dir, Recursive: true, IncludeEntry: true}))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, resp.Msg.GetWatcherId())
	}

	const files = 20
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range files {
			p := filepath.Join(dir, fmt.Sprintf("d%d", i%3), fmt.Sprintf("f%d.txt", i))
			os.MkdirAll(filepath.Dir(p), 0o755)
			os.WriteFile(p, []byte("x"), 0o644)
		}
	}()
	seen := make([]map[string]bool, len(ids))
	for i, id := range ids {
		seen[i] = map[string]bool{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for deadline := time.Now().Add(10 * time.Second); len(seen[i]) < files && time.Now().Before(deadline); {
				resp, err := client.GetWatcherEvents(ctx, connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: id}))
				if err != nil {
					t.Errorf("GetWatcherEvents %s: %v", id, err)
					return
				}
				for _, ev := range resp.Msg.GetEvents() {
					if ev.GetType() == rpc.EventType_EVENT_TYPE_CREATE && filepath.Ext(ev.GetName()) == ".txt" {
						seen[i][ev.GetName()] = true
					}
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	streamed := map[string]bool{}
	for len(streamed) < files && stream.Receive() {
		if ev := stream.Msg().GetFilesystem(); ev.GetType() == rpc.EventType_EVENT_TYPE_CREATE && filepath.Ext(ev.GetName()) == ".txt" {
			streamed[ev.GetName()] = true
		}
	}
	wg.Wait()
	if len(streamed) != files {
		t.Errorf("stream saw %d of %d created files (%v)", len(streamed), files, stream.Err())
	}
	for i, s := range seen {
		if len(s) != files {
			t.Errorf("watcher %s saw %d of %d created files", ids[i], len(s), files)
		}
	}

	if _, err := client.RemoveWatcher(ctx, connect.NewRequest(&rpc.RemoveWatcherRequest{WatcherId: ids[0]})); err != nil {
		t.Fatal(err)
	}
	svc.Close()
	for _, id := range ids {
		_, err := client.GetWatcherEvents(ctx, connect.NewRequest(&rpc.GetWatcherEventsRequest{WatcherId: id}))
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("GetWatcherEvents %s after Close: %v, want not_found", id, err)
		}
	}
	if _, err := client.CreateWatcher(ctx, connect.NewRequest(&rpc.CreateWatcherRequest{Path: dir})); connect.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("CreateWatcher after Close: %v, want unavailable", err)
	}
}
