package filesystem

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"connectrpc.com/connect"

	rpc "github.com/warren-sh/warren/gen/filesystem"
)

// maxBufferedEvents bounds a polling watcher's memory when nobody drains it.
const maxBufferedEvents = 10_000

// CreateWatcher starts a watch whose events are buffered for GetWatcherEvents
// (the polling variant of WatchDir, used by the Python SDK).
func (s *Service) CreateWatcher(ctx context.Context, req *connect.Request[rpc.CreateWatcherRequest]) (*connect.Response[rpc.CreateWatcherResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	root, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	w, err := startWatch(u, root, watchOptions{
		recursive:          req.Msg.GetRecursive(),
		includeEntry:       req.Msg.GetIncludeEntry(),
		allowNetworkMounts: req.Msg.GetAllowNetworkMounts(),
	}, s.log)
	if err != nil {
		return nil, err
	}
	id := "w" + rand.Text()
	pw := &pollWatcher{watch: w, log: s.log.With("watcher", id, "path", root), done: make(chan struct{})}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		w.Close()
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("envd is shutting down"))
	}
	s.watchers[id] = pw
	s.mu.Unlock()
	go pw.collect()
	return connect.NewResponse(&rpc.CreateWatcherResponse{WatcherId: id}), nil
}

// GetWatcherEvents returns and forgets the events a watcher buffered.
func (s *Service) GetWatcherEvents(ctx context.Context, req *connect.Request[rpc.GetWatcherEventsRequest]) (*connect.Response[rpc.GetWatcherEventsResponse], error) {
	pw, err := s.watcher(req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&rpc.GetWatcherEventsResponse{Events: pw.drain()}), nil
}

// RemoveWatcher stops a watcher and drops its buffered events.
func (s *Service) RemoveWatcher(ctx context.Context, req *connect.Request[rpc.RemoveWatcherRequest]) (*connect.Response[rpc.RemoveWatcherResponse], error) {
	id := req.Msg.GetWatcherId()
	s.mu.Lock()
	pw, ok := s.watchers[id]
	delete(s.watchers, id)
	s.mu.Unlock()
	if !ok {
		return nil, unknownWatcher(id)
	}
	pw.Close()
	return connect.NewResponse(&rpc.RemoveWatcherResponse{}), nil
}

func (s *Service) watcher(id string) (*pollWatcher, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pw, ok := s.watchers[id]
	if !ok {
		return nil, unknownWatcher(id)
	}
	return pw, nil
}

func unknownWatcher(id string) error {
	return connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher '%s' not found", id))
}

// pollWatcher buffers a watch's events until a client drains them. Its collect
// goroutine ends when Close stops the watch.
type pollWatcher struct {
	watch *dirWatch
	log   *slog.Logger
	done  chan struct{}

	mu      sync.Mutex
	events  []*rpc.FilesystemEvent
	dropped int // events dropped since the last drain
}

func (pw *pollWatcher) collect() {
	defer close(pw.done)
	for ev := range pw.watch.Events() {
		pw.mu.Lock()
		if len(pw.events) == maxBufferedEvents {
			if pw.dropped == 0 {
				pw.log.Warn("watcher buffer full, dropping its oldest events until it is drained", "limit", maxBufferedEvents)
			}
			pw.events = pw.events[1:]
			pw.dropped++
		}
		pw.events = append(pw.events, ev)
		pw.mu.Unlock()
	}
}

func (pw *pollWatcher) drain() []*rpc.FilesystemEvent {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	if pw.dropped > 0 {
		pw.log.Warn("watcher dropped events", "dropped", pw.dropped)
		pw.dropped = 0
	}
	events := pw.events
	pw.events = nil
	return events
}

// Close stops the watch and waits for the collector.
func (pw *pollWatcher) Close() {
	pw.watch.Close()
	<-pw.done
}
