package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/durable"
)

// A pause answers before its saved state is on the disk: syncing a few
// hundred MiB here takes ~0.3-0.6 s, more than the pause itself. The state is
// synced soon after (syncLater, syncDelay), and then marked so (syncedFile).
// A resume in the same boot of the host reads the page cache and needs no
// sync; a resume after the host restarted trusts only a marked state
// (checkSynced), since a crash can leave the renamed entry with files the
// disk never received.

// syncedFile marks a paused sandbox's entry whose files are on the disk.
const syncedFile = "synced"

// syncDelay is how long after a pause its sync starts: a resume that comes
// sooner (a client that pauses and reconnects at once) finds no sync writing
// the files it reads. The host's own writeback starts after 30 s; Close
// starts the syncs waiting at once.
const syncDelay = 2 * time.Second

// ErrUnsynced: a paused sandbox was saved in an earlier boot of the host and
// its state had not reached the disk when that boot ended.
var ErrUnsynced = errors.New("the paused state did not reach the disk before the host restarted, so it may be incomplete")

// syncs tracks the syncs of paused sandboxes' entries in progress, by key.
type syncs struct {
	bootID string // the host's current boot; "" where unknown

	mu      sync.Mutex
	pending map[string]*pendingSync
	wg      sync.WaitGroup
}

type pendingSync struct{ cancel context.CancelFunc }

func newSyncs() *syncs {
	id, _ := durable.BootID() // without it every state counts as another boot's
	return &syncs{bootID: id, pending: map[string]*pendingSync{}}
}

// syncLater syncs the entry key in dir in the background, then marks it,
// unless stopSync(key) comes first. A sync of key in progress is replaced.
func (m *Manager) syncLater(key, dir string) {
	s := m.syncs
	ctx, cancel := context.WithCancel(context.Background())
	p := &pendingSync{cancel: cancel}
	s.mu.Lock()
	if old := s.pending[key]; old != nil {
		old.cancel()
	}
	s.pending[key] = p
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer cancel()
		select {
		case <-time.After(syncDelay):
		case <-m.closing:
		case <-ctx.Done():
		}
		err := durable.SyncTree(ctx, dir)
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.pending[key] == p {
			delete(s.pending, key)
		}
		if ctx.Err() != nil {
			return // a resume or delete took the entry
		}
		if err == nil {
			err = durable.WriteFile(filepath.Join(dir, syncedFile), nil, 0o600)
			if errors.Is(err, os.ErrExist) {
				err = nil // marked by an earlier sync of the same files
			}
		}
		if err != nil {
			m.log.Error("sync a paused sandbox's state to the disk; it is lost if the host restarts before it is resumed", "key", key, "err", err)
		}
	}()
}

// stopSync cancels the sync of key in progress, if any: the entry is about
// to be consumed or removed. A file being synced finishes its fsync in the
// background; the entry is not marked.
func (m *Manager) stopSync(key string) {
	s := m.syncs
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.pending[key]; p != nil {
		p.cancel()
		delete(s.pending, key)
	}
}

// unmark stops the sync of key and removes its mark: its files are about to
// change.
func (m *Manager) unmark(key string) error {
	m.stopSync(key)
	if err := os.Remove(filepath.Join(m.blobs.Path(key), syncedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unmark the paused state %s: %w", key, err)
	}
	return nil
}

// waitSyncs waits for the syncs in progress to end (Close).
func (m *Manager) waitSyncs() { m.syncs.wg.Wait() }

// checkSynced refuses a paused entry in dir saved in another boot of the host
// and never marked synced. Entries from before boot IDs were recorded pass.
func (m *Manager) checkSynced(rec *pausedRecord, dir string) error {
	if rec.BootID == "" || (rec.BootID == m.syncs.bootID && m.syncs.bootID != "") {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, syncedFile)); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return fmt.Errorf("%w (paused at %s)", ErrUnsynced, rec.PausedAt.Format("2006-01-02 15:04:05 MST"))
}

// resumeSyncs syncs the paused entries that an earlier node process of this
// boot left unmarked (it stopped before their sync ended).
func (m *Manager) resumeSyncs() error {
	root := m.blobs.Path(pausedPrefix[:len(pausedPrefix)-1])
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		key := pausedPrefix + e.Name()
		dir := m.blobs.Path(key)
		if _, err := os.Stat(filepath.Join(dir, syncedFile)); err == nil {
			continue
		}
		rec, _, err := m.readPaused(key, e.Name())
		if err != nil || rec.BootID == "" || rec.BootID != m.syncs.bootID {
			continue // not ours to vouch for: readPaused says why at resume
		}
		m.syncLater(key, dir)
	}
	return nil
}
