package api_test

import (
	"context"
	"errors"
	"fmt"
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
}

func newFakeNode() *fakeNode {
	return &fakeNode{running: map[string]*node.SandboxInfo{}, kills: map[string]int{}, logs: map[string][]node.LogLine{}}
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

func (n *fakeNode) Pause(ctx context.Context, id string, memory bool) (*node.PausedSandbox, error) {
	return nil, errors.New("fake node: no pause")
}

func (n *fakeNode) DeletePaused(ctx context.Context, key string) error { return nil }

func (n *fakeNode) Snapshot(ctx context.Context, id, key string) (string, error) {
	return "", errors.New("fake node: no snapshots")
}

func (n *fakeNode) DeleteSnapshot(ctx context.Context, key string) error { return nil }
