// Package node runs sandboxes on one host: it takes a network slot, restores
// the template's snapshot (or boots it) in a microVM, hands the sandbox its
// configuration through envd's /init, and tracks what runs here.
//
// The control plane talks to a node through the Node interface: in `warren up`
// that is the in-process *Manager; with several hosts it is a node RPC client.
//
// # Restarts
//
// A VM outlives a crashed node process, but its network slot does not survive
// the next one: the slot pool rebuilds every slot namespace at start. So
// NewManager kills every VM it finds and removes its state, and a restarted
// node starts empty; the control plane's reconcile marks the sandboxes it
// stored for the node lost. What Pause and Snapshot saved in the node's blob
// storage survives a restart: paused sandboxes resume on the new node.
package node

import (
	"context"
	"errors"
	"time"
)

// ErrNotFound is returned for a sandbox this node does not run.
var ErrNotFound = errors.New("sandbox not found on this node")

// ErrFull is returned when the node has no room for another sandbox.
var ErrFull = errors.New("node full")

// ErrBusy is returned for a sandbox that is starting, being paused or being
// killed, when the operation needs it running.
var ErrBusy = errors.New("sandbox is starting, pausing or being killed")

// SandboxSpec is everything a node needs to start a sandbox.
type SandboxSpec struct {
	ID         string
	TemplateID string
	BuildID    string
	// Artifact locates the build's root image and snapshot (store.Build.Artifact).
	Artifact string
	CPUCount int
	MemoryMB int
	// EnvVars, AccessToken, DefaultUser and DefaultWorkdir go to envd's /init.
	EnvVars        map[string]string
	AccessToken    string
	DefaultUser    string
	DefaultWorkdir string
	AllowInternet  bool
	// Resume, when set, starts the sandbox from what Pause saved (the key
	// PausedSandbox.Key) instead of from the template's snapshot: the same
	// sandbox (ID must be the paused one's), its memory, disk and processes
	// (without memory: its disk, booted afresh). Artifact is not needed: the
	// saved state names what it needs. The saved state is consumed: the node
	// removes it once the sandbox runs again, and keeps it when the resume
	// fails (or is killed midway).
	Resume string
}

// SandboxInfo is a sandbox as the node sees it.
type SandboxInfo struct {
	ID         string
	TemplateID string
	// Host is the address at which the sandbox's ports are reachable from this
	// host (its network slot address); envd is Host:49983.
	Host        string
	EnvdVersion string
	StartedAt   time.Time
}

// Stats is a sandbox's resource use, sampled from its envd.
type Stats struct {
	Timestamp  time.Time
	CPUCount   int
	CPUUsedPct float64
	MemUsed    uint64
	MemTotal   uint64
	MemCache   uint64
	DiskUsed   uint64
	DiskTotal  uint64
}

// Node is the control plane's view of one host that runs sandboxes.
type Node interface {
	// ID names the node (stable across restarts).
	ID() string
	// Create starts a sandbox and returns once its envd answers and has
	// accepted /init.
	Create(ctx context.Context, spec SandboxSpec) (*SandboxInfo, error)
	// Kill stops a sandbox and frees everything it held; ErrNotFound if unknown.
	Kill(ctx context.Context, id string) error
	// List returns the sandboxes running on the node.
	List(ctx context.Context) ([]*SandboxInfo, error)
	// Stats samples a sandbox's resource use.
	Stats(ctx context.Context, id string) (*Stats, error)
	// Logs returns a sandbox's boot and agent log lines.
	Logs(ctx context.Context, id string) ([]LogLine, error)

	// Pause saves a running sandbox (with memory: its RAM, device state and
	// disk; without: its disk only, after the guest synced its file systems)
	// into the node's blob storage, then stops it and frees its slot and
	// memory: it leaves List. Create with SandboxSpec.Resume = the returned
	// Key (and the same sandbox ID) brings it back. ErrBusy while the sandbox
	// starts, pauses or is killed; on other errors it runs on unless the
	// error says it was stopped.
	Pause(ctx context.Context, id string, memory bool) (*PausedSandbox, error)
	// DeletePaused removes what Pause saved under key; no error if it is gone.
	DeletePaused(ctx context.Context, key string) error
	// Paused returns what a finished Pause of sandbox id saved, ErrNotFound
	// if there is none: a restart that cut short the recording of a pause
	// finds the saved sandbox here.
	Paused(ctx context.Context, id string) (*PausedSandbox, error)
	// Snapshot saves a copy of a running sandbox, which keeps running, as a
	// template artifact in the node's blob storage under key: a
	// SandboxSpec.Artifact that new sandboxes start from (named snapshots,
	// fork). It returns the artifact's location for SandboxSpec.Artifact.
	Snapshot(ctx context.Context, id, key string) (artifact string, err error)
	// DeleteSnapshot removes a snapshot Snapshot wrote; no error if it is gone.
	DeleteSnapshot(ctx context.Context, key string) error
}

// PausedSandbox is what Pause saved.
type PausedSandbox struct {
	// Key locates the saved state in the node's blob storage.
	Key string
	// Memory tells whether the RAM was saved (false: a resume boots the
	// template's kernel on the saved disk).
	Memory bool
	// Bytes is the disk the saved state takes.
	Bytes int64
}

// LogLine is one line of a sandbox's log.
type LogLine struct {
	Time    time.Time
	Source  string // "boot", "envd", "start"
	Message string
}
