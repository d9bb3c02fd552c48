package node

import (
	"context"
	"errors"
)

// errNoPause is what the pause family answers until the runtime can save a
// restored VM (issue 6 work in progress).
var errNoPause = errors.New("node: pause and snapshots are not implemented yet")

// Pause is not implemented yet.
func (m *Manager) Pause(ctx context.Context, id string, memory bool) (*PausedSandbox, error) {
	return nil, errNoPause
}

// DeletePaused is not implemented yet.
func (m *Manager) DeletePaused(ctx context.Context, key string) error { return errNoPause }

// Snapshot is not implemented yet.
func (m *Manager) Snapshot(ctx context.Context, id, key string) (string, error) {
	return "", errNoPause
}

// DeleteSnapshot is not implemented yet.
func (m *Manager) DeleteSnapshot(ctx context.Context, key string) error { return errNoPause }
