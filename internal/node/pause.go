package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/warren-sh/warren/internal/blob"
	"github.com/warren-sh/warren/internal/durable"
	"github.com/warren-sh/warren/internal/template"
)

// Saved state in the node's blob storage (Config.Blobs):
//
//	paused/<sandboxID>/      a paused sandbox (Pause), consumed by its resume
//	  sandbox.json           pausedRecord: what the resume needs besides the VM
//	  vm/                    the runtime's snapshot of the VM (runtime.Snapshot
//	                         with memory, runtime.SaveDisk without)
//	<key>/                   a snapshot (Snapshot): a template artifact
//	  artifact.json          template.Artifact: the source's kernel, initramfs
//	                         and root image, Snapshot = <key>/snapshot
//	  init-secret            the source's envd init secret
//	  snapshot/              the runtime's checkpoint of the VM
//
// Entries appear complete or not at all: each is written in a temporary
// directory beside it (".<name>.tmp-*") and renamed; NewManager removes
// those that an earlier node process left unfinished. Snapshots are synced
// to the disk before the rename, paused sandboxes after it, then marked
// (paused/<sandboxID>/synced, see syncs.go).
const (
	pausedPrefix     = "paused/"
	pausedRecordFile = "sandbox.json"
	pausedVMDir      = "vm"
	snapshotVMDir    = "snapshot"
	artifactFile     = "artifact.json" // template's
	initSecretFile   = "init-secret"   // template's
)

// pausedRecord is a paused sandbox's sandbox.json.
type pausedRecord struct {
	ID         string    `json:"id"`
	TemplateID string    `json:"templateId"`
	Memory     bool      `json:"memory"`
	PausedAt   time.Time `json:"pausedAt"`
	// Artifact is what the sandbox started from (its template build, or a
	// snapshot, which may be deleted meanwhile: the files it names are the
	// template build's); a resume needs its init secret, and later
	// Snapshots of the sandbox its boot files.
	Artifact   *template.Artifact `json:"artifact"`
	InitSecret string             `json:"initSecret"`
	// BootID is the host's boot the pause ran in (syncs.go): a state from
	// another boot must be marked synced to be resumed. Empty in records of
	// older warren versions, which are trusted.
	BootID string `json:"bootId,omitempty"`
}

// PausedKey is the blob key Pause saves the sandbox id under.
func PausedKey(id string) string { return pausedPrefix + id }

// Pause saves the running sandbox id into the blob entry PausedKey(id), then
// stops its VM and frees its slot: it leaves List, and Create with
// SandboxSpec.Resume = the key brings it back.
//
// With memory the VM's RAM, device state and disk are saved: its vCPUs stop
// for milliseconds when its RAM is a file of its own (a resumed sandbox), or
// for as long as its non-zero RAM takes to copy (a sandbox restored from a
// template: hundreds of milliseconds per 256 MiB here). Without memory the
// guest syncs its file systems (envd runs sync), then QEMU quits and only the
// disk is kept: a resume cold boots on it, the sandbox's processes and /tmp
// (a tmpfs) are gone.
//
// On error the sandbox runs on, unless the error says it was stopped. A
// sandbox that is still starting, or being killed or paused, cannot be
// paused (ErrBusy); an unknown one is ErrNotFound. A Kill that comes during a
// Pause waits for it: it finds the sandbox gone (ErrNotFound) when the Pause
// succeeded, and kills it when the Pause failed.
func (m *Manager) Pause(ctx context.Context, id string, memory bool) (_ *PausedSandbox, err error) {
	key := PausedKey(id)
	if err := blob.CheckKey(key); err != nil {
		return nil, fmt.Errorf("node: pause %s: %w", id, err)
	}
	m.mu.Lock()
	sb := m.sandboxes[id]
	switch {
	case sb == nil:
		m.mu.Unlock()
		return nil, fmt.Errorf("node: pause %s: %w", id, ErrNotFound)
	case sb.killing || !isClosed(sb.ready):
		m.mu.Unlock()
		return nil, fmt.Errorf("node: pause %s: %w", id, ErrBusy)
	case !sb.running():
		m.mu.Unlock()
		return nil, fmt.Errorf("node: pause %s: %w", id, ErrNotFound)
	}
	sb.killing, sb.pausing = true, true
	m.mu.Unlock()

	began := time.Now()
	saved, err := m.pause(ctx, sb, key, memory)
	select {
	case <-sb.vm.Done():
	default:
		if err != nil {
			// The runtime left the VM running: so is the sandbox.
			m.mu.Lock()
			sb.killing, sb.pausing = false, false
			close(sb.gone)
			sb.gone = make(chan struct{})
			m.mu.Unlock()
			return nil, fmt.Errorf("node: pause %s: %w", id, err)
		}
	}
	// The VM is stopped for good (saved, or lost): free what it held.
	terr := m.teardown(ctx, sb)
	m.finishKill(sb, terr)
	if err != nil {
		m.log.Error("sandbox stopped by a failed pause", "sandbox", id, "err", err)
		return nil, fmt.Errorf("node: pause %s: %w (the sandbox was stopped)", id, errors.Join(err, terr))
	}
	if terr != nil {
		m.log.Error("free a paused sandbox's VM", "sandbox", id, "err", terr)
	}
	saved.Bytes, _ = m.blobs.Size(ctx, key)
	m.log.Info("sandbox paused", "sandbox", id, "memory", memory, "key", key, "bytes", saved.Bytes, "took", time.Since(began).Round(time.Millisecond))
	return saved, nil
}

// pause saves sb into the blob entry key. The VM is stopped for good when it
// succeeds, and runs on after most errors (the runtime's guarantee).
func (m *Manager) pause(ctx context.Context, sb *sandbox, key string, memory bool) (*PausedSandbox, error) {
	dir := m.blobs.Path(key)
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("%s already holds a saved state of this sandbox: resume it or DeletePaused it first", key)
	}
	tmp, err := tempEntry(dir)
	if err != nil {
		return nil, err
	}
	done := false
	defer func() {
		if !done {
			os.RemoveAll(tmp)
		}
	}()
	rec := pausedRecord{
		ID: sb.info.ID, TemplateID: sb.info.TemplateID, Memory: memory, PausedAt: time.Now().UTC(),
		Artifact: sb.artifact, InitSecret: sb.artifact.InitSecret, BootID: m.syncs.bootID,
	}
	if err := writeJSON(filepath.Join(tmp, pausedRecordFile), rec, 0o600); err != nil {
		return nil, err
	}
	vmDir := filepath.Join(tmp, pausedVMDir)
	if memory {
		if err := m.rt.Snapshot(ctx, sb.vm, vmDir); err != nil {
			return nil, err
		}
	} else {
		if err := m.syncGuest(ctx, sb); err != nil {
			return nil, err
		}
		if err := m.rt.SaveDisk(ctx, sb.vm, vmDir); err != nil {
			return nil, err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		// The VM is saved, but not where a resume looks: keep the files for
		// whoever can move them (NewManager would remove them).
		done = true
		return nil, fmt.Errorf("the sandbox is saved in %s, but not in place: %w", tmp, err)
	}
	done = true
	m.syncLater(key, dir)
	return &PausedSandbox{Key: key, Memory: memory}, nil
}

// syncGuest has the guest write its page cache to its disk: envd runs sync.
func (m *Manager) syncGuest(ctx context.Context, sb *sandbox) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := m.runGuest(ctx, sb.agent, sb.token, "", "/bin/sh", "-c", "sync"); err != nil {
		return fmt.Errorf("sync the guest's file systems: %w", err)
	}
	return nil
}

// readPaused reads the paused sandbox at key for a resume of id.
func (m *Manager) readPaused(key, id string) (*pausedRecord, string, error) {
	if err := blob.CheckKey(key); err != nil {
		return nil, "", err
	}
	dir := m.blobs.Path(key)
	b, err := os.ReadFile(filepath.Join(dir, pausedRecordFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", fmt.Errorf("no paused sandbox under %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, "", fmt.Errorf("paused sandbox %s: %w", key, err)
	}
	var rec pausedRecord
	if err := json.Unmarshal(b, &rec); err != nil || rec.Artifact == nil {
		return nil, "", fmt.Errorf("paused sandbox %s: %s is not valid (%v)", key, pausedRecordFile, err)
	}
	if rec.ID != id {
		return nil, "", fmt.Errorf("%s holds sandbox %s, not %s: a sandbox resumes with its own ID", key, rec.ID, id)
	}
	rec.Artifact.InitSecret = rec.InitSecret
	return &rec, filepath.Join(dir, pausedVMDir), nil
}

// Paused reads the record a finished Pause of id left (the save is moved
// into place by one rename, so a record means the whole saved state).
func (m *Manager) Paused(ctx context.Context, id string) (*PausedSandbox, error) {
	key := PausedKey(id)
	rec, _, err := m.readPaused(key, id)
	if err != nil {
		return nil, fmt.Errorf("node: paused %s: %w", id, err)
	}
	saved := &PausedSandbox{Key: key, Memory: rec.Memory}
	saved.Bytes, _ = m.blobs.Size(ctx, key)
	return saved, nil
}

// DeletePaused removes the paused sandbox saved under key; no error if it is
// gone.
func (m *Manager) DeletePaused(ctx context.Context, key string) error {
	m.stopSync(key)
	if err := m.blobs.Delete(ctx, key); err != nil {
		return fmt.Errorf("node: delete paused %s: %w", key, err)
	}
	return nil
}

// Snapshot checkpoints the running sandbox id into the blob entry key, as a
// template artifact, and returns its directory for SandboxSpec.Artifact. The
// sandbox pauses for the save (its non-zero RAM and disk overlay are
// copied) and runs on. The artifact's boot files, init secret, BuildID and
// Inputs are those of the artifact the sandbox started from.
//
// A sandbox created from the snapshot reads the snapshot's RAM into its own
// and copies its disk, so it does not depend on the snapshot afterwards:
// DeleteSnapshot while sandboxes of it run is fine (fork is Snapshot, Creates,
// DeleteSnapshot).
func (m *Manager) Snapshot(ctx context.Context, id, key string) (string, error) {
	if err := blob.CheckKey(key); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	sb, err := m.running(id)
	if err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	dir := m.blobs.Path(key)
	if _, err := os.Stat(dir); err == nil {
		return "", fmt.Errorf("node: snapshot %s: %s exists already", id, key)
	}
	tmp, err := tempEntry(dir)
	if err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	began := time.Now()
	if err := m.rt.Checkpoint(ctx, sb.vm, filepath.Join(tmp, snapshotVMDir)); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	took := time.Since(began)
	a := *sb.artifact
	a.Dir, a.Snapshot = dir, filepath.Join(dir, snapshotVMDir)
	a.BuiltAt, a.SnapshotTime, a.BootToHealth = time.Now().UTC(), took.Round(time.Microsecond).String(), ""
	if err := os.WriteFile(filepath.Join(tmp, initSecretFile), []byte(a.InitSecret+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	if err := writeJSON(filepath.Join(tmp, artifactFile), a, 0o644); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	// Unlike a pause, a snapshot is synced before it is published: sandboxes
	// start from it for as long as it exists, across host restarts.
	if err := durable.SyncTree(ctx, tmp); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", fmt.Errorf("node: snapshot %s: %w", id, err)
	}
	if err := durable.Sync(filepath.Dir(dir)); err != nil {
		m.log.Warn("sync the directory of a new snapshot", "key", key, "err", err)
	}
	ok = true
	m.log.Info("sandbox snapshotted", "sandbox", id, "key", key, "took", took.Round(time.Millisecond))
	return dir, nil
}

// DeleteSnapshot removes the snapshot saved under key; no error if it is
// gone. Sandboxes created from it run on.
func (m *Manager) DeleteSnapshot(ctx context.Context, key string) error {
	if err := m.blobs.Delete(ctx, key); err != nil {
		return fmt.Errorf("node: delete snapshot %s: %w", key, err)
	}
	m.mu.Lock()
	delete(m.artifacts, m.blobs.Path(key))
	m.mu.Unlock()
	return nil
}

// tempEntry makes the temporary directory an entry at dir is written in.
func tempEntry(dir string) (string, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", err
	}
	return os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+".tmp-")
}

// writeJSON writes v as indented JSON to p.
func writeJSON(p string, v any, mode os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", p, err)
	}
	if err := os.WriteFile(p, append(b, '\n'), mode); err != nil {
		return err
	}
	return nil
}
