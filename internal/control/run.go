package control

import (
	"cmp"
	"context"
	"errors"
	"time"

	"github.com/warren-sh/warren/internal/catalog"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// Run reconciles the store with the node, then evicts (kills or pauses)
// expired sandboxes and samples metrics until ctx is done. Before it returns
// it waits for the pauses and resumes it started.
func (c *Controller) Run(ctx context.Context) error {
	if err := c.Reconcile(ctx); err != nil {
		return err
	}
	defer c.work.Wait()
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
// Paused sandboxes have no VM by design and stay paused; a pause or resume
// cut short by a restart is settled by whether the node still runs the VM.
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
		case sb.State == store.StatePaused && alive:
			// The saved state is the sandbox; a VM beside it is a leftover.
			c.log.Warn("stopping a VM of a paused sandbox", "sandbox", sb.ID)
			if err := c.node.Kill(ctx, sb.ID); err != nil && !errors.Is(err, node.ErrNotFound) {
				c.log.Error("kill VM of paused sandbox", "sandbox", sb.ID, "err", err)
			}
		case sb.State == store.StatePaused:
		case sb.State == store.StatePausing && !alive && c.recordPause(ctx, sb.ID):
			// The node saved it; the restart came before the store knew.
		case (sb.State == store.StateRunning || sb.State == store.StatePausing) && !alive:
			// A pause cut short left nothing recorded to resume from.
			c.log.Warn("sandbox lost: the node no longer runs it", "sandbox", sb.ID, "state", sb.State)
			if err := c.store.DeleteSandbox(ctx, sb.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
				c.log.Error("forget lost sandbox", "sandbox", sb.ID, "err", err)
			}
		case sb.State == store.StateResuming && !alive:
			// The resume never finished: the saved state is still the sandbox.
			c.settle(ctx, sb.ID, store.StatePaused, nil)
		case sb.State == store.StatePausing || sb.State == store.StateResuming:
			// The VM runs: the pause never happened, or the resume did.
			c.settle(ctx, sb.ID, store.StateRunning, &catalog.Route{NodeID: sb.NodeID, Host: info.Host})
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

// recordPause records as paused a sandbox whose pause the node finished but
// a restart kept from being recorded (warren stopped between the two); it
// reports whether the node had the saved state.
func (c *Controller) recordPause(ctx context.Context, id string) bool {
	saved, err := c.node.Paused(ctx, id)
	if err != nil {
		if !errors.Is(err, node.ErrNotFound) {
			c.log.Error("look for the saved state of a sandbox caught pausing", "sandbox", id, "err", err)
		}
		return false
	}
	c.log.Warn("recording the pause a restart cut short: the node had saved the sandbox", "sandbox", id, "key", saved.Key)
	_, err = c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		if s.State != store.StatePausing {
			return errGone
		}
		s.State = store.StatePaused
		s.Paused = &store.PausedState{Key: saved.Key, Memory: saved.Memory, Bytes: saved.Bytes, At: time.Now()}
		return nil
	})
	if err != nil {
		c.log.Error("record a sandbox's pause", "sandbox", id, "err", err)
	}
	return true
}

// settle moves a sandbox that a restart caught in transition to state (and
// routes it, when running again).
func (c *Controller) settle(ctx context.Context, id string, state store.SandboxState, route *catalog.Route) {
	c.log.Warn("settling a sandbox caught in transition by a restart", "sandbox", id, "state", state)
	_, err := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		if state == store.StateRunning && s.State == store.StateResuming {
			// The resume happened but was not recorded: record it now, with
			// the lifetime the sandbox was created with.
			now := time.Now().UTC()
			s.Paused, s.StartedAt, s.EndAt = nil, now, now.Add(cmp.Or(s.Timeout, defaultResumeTimeout))
		}
		s.State = state
		return nil
	})
	if err != nil {
		c.log.Error("settle sandbox", "sandbox", id, "err", err)
		return
	}
	if route != nil {
		c.catalog.Put(id, *route)
	}
}

// evict kills or, with auto-pause, pauses running sandboxes past their
// deadline, and retries stuck kills.
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
			if s.AutoPause {
				if c.busyWith(s.ID) != "" {
					return errSkip // a snapshot or fork first; the next round pauses it
				}
				s.State = store.StatePausing
			} else {
				s.State = store.StateKilling
			}
			return nil
		})
		if errors.Is(err, errSkip) || errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			c.log.Error("mark expired sandbox", "sandbox", candidate.ID, "err", err)
			continue
		}
		c.log.Info("sandbox reached its end time", "sandbox", sb.ID, "state", sb.State)
		if sb.State == store.StatePausing {
			// Saving memory takes a while; other sandboxes' deadlines do not wait.
			c.work.Add(1)
			go func() {
				defer c.work.Done()
				if err := c.finishPause(context.WithoutCancel(ctx), sb, sb.AutoPauseMemory); err != nil {
					c.log.Error("auto-pause expired sandbox", "sandbox", sb.ID, "err", err)
				}
			}()
			continue
		}
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
