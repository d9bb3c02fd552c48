package filesystem

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"

	rpc "github.com/warren-sh/warren/gen/filesystem"
	"github.com/warren-sh/warren/internal/envd/identity"
)

// defaultKeepalive is the idle time after which a watch stream sends a
// keepalive when the client sends no Keepalive-Ping-Interval (E2B's default).
const defaultKeepalive = 90 * time.Second

// WatchDir streams a start event, then the filesystem events under a
// directory, and keepalives while idle, until the client leaves or the
// request's deadline passes.
func (s *Service) WatchDir(ctx context.Context, req *connect.Request[rpc.WatchDirRequest], stream *connect.ServerStream[rpc.WatchDirResponse]) error {
	u, err := s.caller(req.Header())
	if err != nil {
		return err
	}
	root, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return err
	}
	w, err := startWatch(u, root, watchOptions{
		recursive:          req.Msg.GetRecursive(),
		includeEntry:       req.Msg.GetIncludeEntry(),
		allowNetworkMounts: req.Msg.GetAllowNetworkMounts(),
	}, s.log)
	if err != nil {
		return err
	}
	defer w.Close()

	// The SDK fails with "Expected start event" unless this comes first.
	start := &rpc.WatchDirResponse{Event: &rpc.WatchDirResponse_Start{Start: &rpc.WatchDirResponse_StartEvent{}}}
	if err := stream.Send(start); err != nil {
		return fmt.Errorf("send start event: %w", err)
	}
	interval := keepaliveInterval(req.Header())
	keepalive := time.NewTicker(interval)
	defer keepalive.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-keepalive.C:
			msg := &rpc.WatchDirResponse{Event: &rpc.WatchDirResponse_Keepalive{Keepalive: &rpc.WatchDirResponse_KeepAlive{}}}
			if err := stream.Send(msg); err != nil {
				return fmt.Errorf("send keepalive: %w", err)
			}
		case ev, ok := <-w.Events():
			if !ok {
				return connect.NewError(connect.CodeInternal, fmt.Errorf("watch of '%s' stopped", root))
			}
			msg := &rpc.WatchDirResponse{Event: &rpc.WatchDirResponse_Filesystem{Filesystem: ev}}
			if err := stream.Send(msg); err != nil {
				return fmt.Errorf("send filesystem event: %w", err)
			}
			keepalive.Reset(interval)
		}
	}
}

// keepaliveInterval reads the Keepalive-Ping-Interval header (seconds).
func keepaliveInterval(h http.Header) time.Duration {
	secs, err := strconv.Atoi(strings.TrimSpace(h.Get("Keepalive-Ping-Interval")))
	if err != nil || secs <= 0 {
		return defaultKeepalive
	}
	return time.Duration(secs) * time.Second
}

// watchOptions are the request fields WatchDir and CreateWatcher share.
type watchOptions struct {
	recursive          bool
	includeEntry       bool
	allowNetworkMounts bool
}

// dirWatch turns inotify events under one directory into FilesystemEvents.
// Whoever calls startWatch owns it and must Close it, which stops its goroutine.
type dirWatch struct {
	user   *identity.User
	root   string
	opts   watchOptions
	log    *slog.Logger
	notify *fsnotify.Watcher
	events chan *rpc.FilesystemEvent
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once

	// The fields below belong to the run goroutine (and to startWatch before
	// that starts).

	// subdirs are the directories below root with their own inotify watch
	// (recursive watches only).
	subdirs map[string]bool
	// moved are subdirectories renamed away whose own IN_MOVE_SELF, which
	// repeats the parent's rename event, is still to come.
	moved map[string]bool
	// last is the previous event, to drop the attribute-change echo that a
	// watched subdirectory reports about itself after its parent did.
	last fsnotify.Event
}

// startWatch checks that u may watch root and starts watching it.
func startWatch(u *identity.User, root string, opts watchOptions, log *slog.Logger) (*dirWatch, error) {
	notify, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("watch '%s': %w", root, err))
	}
	w := &dirWatch{
		user:    u,
		root:    root,
		opts:    opts,
		log:     log,
		notify:  notify,
		events:  make(chan *rpc.FilesystemEvent),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		subdirs: map[string]bool{},
		moved:   map[string]bool{},
	}
	// inotify_add_watch checks read permission with the thread's fsuid, so
	// adding the watches as the user keeps them to what the user may read.
	err = u.Do(func() error {
		info, err := os.Stat(root)
		if err != nil {
			return err
		}
		if !info.IsDir() {
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is not a directory", root))
		}
		if !opts.allowNetworkMounts {
			fsName, err := networkFilesystem(root)
			if err != nil {
				return err
			}
			if fsName != "" {
				return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is on a network filesystem (%s); set allow_network_mounts to watch it", root, fsName))
			}
		}
		f, err := os.Open(root)
		if err != nil {
			return err
		}
		f.Close()
		if err := notify.Add(root); err != nil {
			return err
		}
		if opts.recursive {
			w.watchTree(root, false)
		}
		return nil
	})
	if err != nil {
		notify.Close()
		return nil, pathError("watch", root, err)
	}
	go w.run()
	return w, nil
}

// networkFilesystem names the network filesystem path is on, or "" when it
// is local. Events of remote changes never reach inotify there.
func networkFilesystem(path string) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "", &fs.PathError{Op: "statfs", Path: path, Err: err}
	}
	// Magic numbers from linux/magic.h; FUSE covers sshfs and the like.
	switch uint32(st.Type) {
	case unix.NFS_SUPER_MAGIC:
		return "nfs", nil
	case unix.CIFS_SUPER_MAGIC:
		return "cifs", nil
	case unix.SMB_SUPER_MAGIC:
		return "smb", nil
	case unix.SMB2_SUPER_MAGIC:
		return "smb2", nil
	case unix.FUSE_SUPER_MAGIC:
		return "fuse", nil
	case unix.AFS_SUPER_MAGIC, unix.AFS_FS_MAGIC:
		return "afs", nil
	case unix.CEPH_SUPER_MAGIC:
		return "ceph", nil
	}
	return "", nil
}

// Events delivers the watch's events; it is closed when the watch stops.
func (w *dirWatch) Events() <-chan *rpc.FilesystemEvent { return w.events }

// Close stops the watch and waits for its goroutine.
func (w *dirWatch) Close() {
	w.once.Do(func() {
		close(w.stop)
		<-w.done
		w.notify.Close()
	})
}

func (w *dirWatch) run() {
	defer close(w.done)
	defer close(w.events)
	for {
		select {
		case <-w.stop:
			return
		case err, ok := <-w.notify.Errors:
			if !ok {
				return
			}
			// Mostly a kernel queue overflow: some events are lost, but the
			// watch goes on, so the stream stays up.
			w.log.Warn("watch error", "path", w.root, "err", err)
		case e, ok := <-w.notify.Events:
			if !ok {
				return
			}
			for _, ev := range w.handle(e) {
				select {
				case w.events <- ev:
				case <-w.stop:
					return
				}
			}
		}
	}
}

// handle turns one notify event into E2B events: one per operation, plus,
// for a directory that appears under a recursive watch, a CREATE for each
// entry already inside it (it was made before its watch could be added, as
// with "mkdir -p a/b && touch a/b/f"; such an entry may get a second CREATE
// from the new watch).
func (w *dirWatch) handle(e fsnotify.Event) []*rpc.FilesystemEvent {
	if w.opts.recursive && w.isEcho(e) {
		return nil
	}
	var out []*rpc.FilesystemEvent
	translate := func() error {
		var found []string
		if w.opts.recursive {
			switch {
			case e.Has(fsnotify.Rename) && w.subdirs[e.Name]:
				w.forget(e.Name)
				w.moved[e.Name] = true
			case e.Has(fsnotify.Remove) && w.subdirs[e.Name]:
				w.forget(e.Name)
			case e.Has(fsnotify.Create):
				if info, err := os.Lstat(e.Name); err == nil && info.IsDir() {
					found = w.watchTree(e.Name, true)
				}
			}
		}
		// Several operations can arrive in one event; E2B reports each.
		for _, m := range []struct {
			op  fsnotify.Op
			typ rpc.EventType
		}{
			{fsnotify.Create, rpc.EventType_EVENT_TYPE_CREATE},
			{fsnotify.Rename, rpc.EventType_EVENT_TYPE_RENAME},
			{fsnotify.Chmod, rpc.EventType_EVENT_TYPE_CHMOD},
			{fsnotify.Write, rpc.EventType_EVENT_TYPE_WRITE},
			{fsnotify.Remove, rpc.EventType_EVENT_TYPE_REMOVE},
		} {
			if e.Has(m.op) {
				out = append(out, w.event(e.Name, m.typ))
			}
		}
		for _, p := range found {
			out = append(out, w.event(p, rpc.EventType_EVENT_TYPE_CREATE))
		}
		return nil
	}
	// User.Do costs an OS thread, so only events that touch files pay for it.
	if w.opts.includeEntry || (w.opts.recursive && e.Has(fsnotify.Create)) {
		w.user.Do(translate)
	} else {
		translate()
	}
	return out
}

// isEcho reports whether e repeats, from a watched subdirectory's own watch,
// what its parent's watch already reported: an attribute change right after
// the same one, or the IN_MOVE_SELF after the parent's rename.
func (w *dirWatch) isEcho(e fsnotify.Event) bool {
	if e.Has(fsnotify.Rename) && w.moved[e.Name] {
		delete(w.moved, e.Name)
		return true
	}
	if e.Op == fsnotify.Chmod && w.subdirs[e.Name] && e == w.last {
		w.last = fsnotify.Event{}
		return true
	}
	w.last = e
	return false
}

// event builds the E2B event for path; the entry is only added for events
// after which the path exists. With include_entry it runs inside User.Do.
func (w *dirWatch) event(path string, typ rpc.EventType) *rpc.FilesystemEvent {
	name, err := filepath.Rel(w.root, path)
	if err != nil {
		name = path
	}
	ev := &rpc.FilesystemEvent{Name: name, Type: typ}
	if w.opts.includeEntry && (typ == rpc.EventType_EVENT_TYPE_CREATE || typ == rpc.EventType_EVENT_TYPE_WRITE || typ == rpc.EventType_EVENT_TYPE_CHMOD) {
		// Gone again already: the event goes out without an entry.
		ev.Entry, _ = newInspector().entry(path)
	}
	return ev
}

// watchTree adds a watch to dir and every directory below it (links are not
// followed) and, when announce is set, returns the paths found below dir.
// It runs inside User.Do. Directories that vanish or that the user may not
// read are skipped: the rest of the tree is still watched.
func (w *dirWatch) watchTree(dir string, announce bool) []string {
	var found []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if announce && p != dir {
			found = append(found, p)
		}
		if !d.IsDir() || p == w.root {
			return nil
		}
		if err := w.notify.Add(p); err != nil {
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, fs.ErrPermission) {
				w.log.Warn("cannot watch subdirectory", "path", p, "err", err)
			}
			return fs.SkipDir
		}
		w.subdirs[p] = true
		return nil
	})
	return found
}

// forget drops dir and the directories below it from the watch after dir was
// removed or renamed away. The kernel already dropped dir's own watch (or
// will, with IN_MOVE_SELF); those below a renamed dir would go on reporting
// under their old names.
func (w *dirWatch) forget(dir string) {
	prefix := dir + string(filepath.Separator)
	for p := range w.subdirs {
		if p == dir || strings.HasPrefix(p, prefix) {
			delete(w.subdirs, p)
			if p != dir {
				// Already gone after a removal; nothing to do then.
				_ = w.notify.Remove(p)
			}
		}
	}
}
