package control

import (
	"context"
	"errors"
	"time"

	"github.com/warren-sh/warren/internal/catalog"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// Run reconciles the store with the node, then evicts expired sandboxes and
// samples metrics until ctx is done.
func (c *Controller) Run(ctx context.Context) error {
	if err := c.Reconcile(ctx); err != nil {
		return err
	}
	evict := time.NewTicker(c.cfg.EvictInterval)
	defer evict.Stop()
	sample := time.NewTicker(c.cfg.MetricsInterval)
	defer sample.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-evict.C:
			c.evict(ctx)
		case <-sample.C:
			c.sampleMetrics(ctx)
		}
	}
}

// Reconcile makes the store and the node agree: sandboxes the node no longer
// runs are forgotten (lost), VMs the store does not know are killed
// (orphans), unfinished kills are finished, and the rest are routed again.
func (c *Controller) Reconcile(ctx context.Context) error {
	running, err := c.node.List(ctx)
	if err != nil {
		return err
	}
	onNode := map[string]*node.SandboxInfo{}
	for _, info := range running {
		onNode[info.ID] = info
	}
	stored, err := c.store.ListSandboxes(ctx, store.SandboxFilter{NodeID: c.node.ID()})
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, sb := range stored {
		known[sb.ID] = true
		info, alive := onNode[sb.ID]
		switch {
		case sb.State == store.StateKilling:
			if err := c.finishKill(ctx, sb); err != nil {
				c.log.Error("finish kill", "sandbox", sb.ID, "err", err)
			}
		case sb.State == store.StateRunning && !alive:
			c.log.Warn("sandbox lost: the node no longer runs it", "sandbox", sb.ID)
			if err := c.store.DeleteSandbox(ctx, sb.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
				c.log.Error("forget lost sandbox", "sandbox", sb.ID, "err", err)
			}
		case alive:
			c.catalog.Put(sb.ID, catalog.Route{NodeID: sb.NodeID, Host: info.Host})
		}
	}
	for id := range onNode {
		if !known[id] {
			c.log.Warn("killing orphan sandbox the store does not know", "sandbox", id)
			if err := c.node.Kill(ctx, id); err != nil && !errors.Is(err, node.ErrNotFound) {
				c.log.Error("kill orphan", "sandbox", id, "err", err)
			}
		}
	}
	return nil
}

// evict kills running sandboxes past their deadline and retries stuck kills.
func (c *Controller) evict(ctx context.Context) {
	now := time.Now()
	expired, err := c.store.ListSandboxes(ctx, store.SandboxFilter{
		NodeID: c.node.ID(), States: []store.SandboxState{store.StateRunning}, EndBefore: now,
	})
	if err != nil {
		c.log.Error("list expired sandboxes", "err", err)
		return
	}
	for _, candidate := range expired {
		// Recheck under the row lock: a concurrent setTimeout may have moved it.
		sb, err := c.store.UpdateSandbox(ctx, candidate.ID, func(s *store.Sandbox) error {
			if s.State != store.StateRunning || s.EndAt.After(time.Now()) {
				return errSkip
			}
			s.State = store.StateKilling
			return nil
		})
		if errors.Is(err, errSkip) || errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			c.log.Error("mark expired sandbox", "sandbox", candidate.ID, "err", err)
			continue
		}
		c.log.Info("sandbox reached its end time", "sandbox", sb.ID)
		if err := c.finishKill(ctx, sb); err != nil {
			c.log.Error("kill expired sandbox", "sandbox", sb.ID, "err", err)
		}
	}
	// Kills that failed half-way are retried now and then (finishKill is idempotent).
	if now.Sub(c.lastKillRetry) < killRetryInterval {
		return
	}
	c.lastKillRetry = now
	stuck, err := c.store.ListSandboxes(ctx, store.SandboxFilter{
		NodeID: c.node.ID(), States: []store.SandboxState{store.StateKilling},
	})
	if err != nil {
		return
	}
	for _, sb := range stuck {
		if err := c.finishKill(ctx, sb); err != nil {
			c.log.Error("retry kill", "sandbox", sb.ID, "err", err)
		}
	}
}

var errSkip = errors.New("skip")

// killRetryInterval spaces retries of kills that failed half-way.
const killRetryInterval = 10 * time.Second
