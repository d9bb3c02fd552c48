// Package catalog records where each running sandbox is reachable: which node
// runs it and at which address. The proxy reads it on every request, so it
// lives in memory (one warren process) or in Redis (several; later).
package catalog

import "sync"

// Route is where a sandbox runs.
type Route struct {
	NodeID string
	// Host is the address at which the sandbox's ports are reachable.
	Host string
}

// Memory is an in-process catalog. It is safe for concurrent use.
type Memory struct {
	mu     sync.RWMutex
	routes map[string]Route
}

// NewMemory returns an empty in-process catalog.
func NewMemory() *Memory {
	return &Memory{routes: map[string]Route{}}
}

// Put records or replaces the route of a sandbox.
func (m *Memory) Put(sandboxID string, r Route) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.routes[sandboxID] = r
}

// Get returns the route of a sandbox.
func (m *Memory) Get(sandboxID string) (Route, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	r, ok := m.routes[sandboxID]
	return r, ok
}

// Delete forgets a sandbox.
func (m *Memory) Delete(sandboxID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.routes, sandboxID)
}
