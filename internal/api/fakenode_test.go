package api_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/node"
)

// fakeNode is a node.Node that runs nothing: it records what the controller
// asks of it so tests can check the API's effect on the node. The real VM
// node has its own tests; these are about API semantics.
type fakeNode struct {
	mu      sync.Mutex
	running map[string]*node.SandboxInfo
	specs   []node.SandboxSpec
	kills   map[string]int
	logs    map[string][]node.LogLine

	// createErr, when set, is returned by every Create.
	createErr error
	// createGate, when set, holds every Create until it is closed (or the
	// request's context ends): a slow boot.
	createGate chan struct{}
	// createStarted receives a value when a Create begins waiting at the gate.
	createStarted chan struct{}

	// pauseGate and pauseStarted do the same for Pause: a slow save.
	pauseGate    chan struct{}
	pauseStarted chan struct{}

	pauses           []pauseCall
	saved            map[string]*node.SandboxInfo // by key: what Pause saved
	deletedPaused    []string
	snapshots        map[string]string // key → source sandbox
	deletedSnapshots []string
}

func newFakeNode() *fakeNode {
	return &fakeNode{
		running: map[string]*node.SandboxInfo{}, kills: map[string]int{}, logs: map[string][]node.LogLine{},
		saved: map[string]*node.SandboxInfo{}, snapshots: map[string]string{},
	}
}

func (n *fakeNode) ID() string { return "node-test" }

func (n *fakeNode) Create(ctx context.Context, spec node.SandboxSpec) (*node.SandboxInfo, error) {
	n.mu.Lock()
	gate, started, err := n.createGate, n.createStarted, n.createErr
	n.specs = append(n.specs, spec)
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if gate != nil {
		if started != nil {
			started <- struct{}{}
		}
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	info := &node.SandboxInfo{
		ID: spec.ID, TemplateID: spec.TemplateID, Host: "127.0.0.1", EnvdVersion: "0.6.5", StartedAt: time.Now(),
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if spec.Resume != "" {
		// A resume consumes what Pause saved, as the real node does.
		if _, ok := n.saved[spec.Resume]; !ok {
			return nil, fmt.Errorf("resume %s: no saved state %q", spec.ID, spec.Resume)
		}
		delete(n.saved, spec.Resume)
	}
	n.running[spec.ID] = info
	return info, nil
}

func (n *fakeNode) Kill(ctx context.Context, id string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.kills[id]++
	if _, ok := n.running[id]; !ok {
		return fmt.Errorf("kill %s: %w", id, node.ErrNotFound)
	}
	delete(n.running, id)
	return nil
}

func (n *fakeNode) List(ctx context.Context) ([]*node.SandboxInfo, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []*node.SandboxInfo
	for _, info := range n.running {
		out = append(out, info)
	}
	return out, nil
}

func (n *fakeNode) Stats(ctx context.Context, id string) (*node.Stats, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.running[id]; !ok {
		return nil, node.ErrNotFound
	}
	return &node.Stats{
		Timestamp: time.Now(), CPUCount: 2, CPUUsedPct: 12.5,
		MemUsed: 100 << 20, MemTotal: 512 << 20, MemCache: 10 << 20, DiskUsed: 1 << 30, DiskTotal: 4 << 30,
	}, nil
}

func (n *fakeNode) Logs(ctx context.Context, id string) ([]node.LogLine, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.running[id]; !ok {
		return nil, node.ErrNotFound
	}
	return append([]node.LogLine(nil), n.logs[id]...), nil
}

// killCount is how often Kill was called for id.
func (n *fakeNode) killCount(id string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.kills[id]
}

func (n *fakeNode) isRunning(id string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.running[id]
	return ok
}

func (n *fakeNode) lastSpec() node.SandboxSpec {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.specs[len(n.specs)-1]
}

func (n *fakeNode) specCount() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.specs)
}

func (n *fakeNode) setLogs(id string, lines []node.LogLine) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.logs[id] = lines
}

func (n *fakeNode) set(fn func(n *fakeNode)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	fn(n)
}

// Pause saves a running sandbox: it stops running and its spec is kept
// under a key until a Create with Resume = key brings it back.
func (n *fakeNode) Pause(ctx context.Context, id string, memory bool) (*node.PausedSandbox, error) {
	n.mu.Lock()
	gate, started := n.pauseGate, n.pauseStarted
	n.mu.Unlock()
	if gate != nil {
		if started != nil {
			started <- struct{}{}
		}
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	info, ok := n.running[id]
	if !ok {
		return nil, fmt.Errorf("pause %s: %w", id, node.ErrNotFound)
	}
	delete(n.running, id)
	n.pauses = append(n.pauses, pauseCall{id: id, memory: memory})
	key := fmt.Sprintf("paused/%s/%d", id, len(n.pauses))
	n.saved[key] = info
	return &node.PausedSandbox{Key: key, Memory: memory, Bytes: 4096}, nil
}

// Paused finds the latest state Pause saved for id.
func (n *fakeNode) Paused(ctx context.Context, id string) (*node.PausedSandbox, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i := len(n.pauses); i > 0; i-- {
		key := fmt.Sprintf("paused/%s/%d", id, i)
		if _, ok := n.saved[key]; ok {
			return &node.PausedSandbox{Key: key, Memory: n.pauses[i-1].memory, Bytes: 4096}, nil
		}
	}
	return nil, node.ErrNotFound
}

func (n *fakeNode) DeletePaused(ctx context.Context, key string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.saved, key)
	n.deletedPaused = append(n.deletedPaused, key)
	return nil
}

// Snapshot records a copy of a running sandbox under key; its artifact is
// "artifact:" + key.
func (n *fakeNode) Snapshot(ctx context.Context, id, key string) (string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.running[id]; !ok {
		return "", fmt.Errorf("snapshot %s: %w", id, node.ErrNotFound)
	}
	n.snapshots[key] = id
	return "artifact:" + key, nil
}

func (n *fakeNode) DeleteSnapshot(ctx context.Context, key string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.snapshots, key)
	n.deletedSnapshots = append(n.deletedSnapshots, key)
	return nil
}

// pauseCall is one Pause the node was asked for.
type pauseCall struct {
	id     string
	memory bool
}

// resumeCount is how many Creates resumed id from saved state.
func (n *fakeNode) resumeCount(id string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, sp := range n.specs {
		if sp.ID == id && sp.Resume != "" {
			c++
		}
	}
	return c
}

// savedKeys is the keys of what Pause saved and no one consumed or deleted.
func (n *fakeNode) savedKeys() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Sorted(maps.Keys(n.saved))
}

func (n *fakeNode) snapshotKeys() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Sorted(maps.Keys(n.snapshots))
}
