package control

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// errNoTime refuses a shutdown pause that could not begin before the
// shutdown's deadline.
var errNoTime = errors.New("the shutdown deadline passed before its pause began")

// Shutdown stops the sandboxes this node runs, for a process that is about
// to exit: a VM does not outlive it. A sandbox created with autoPause is
// paused as at its deadline (memory unless autoPauseMemory is false), so its
// owner finds it paused after the restart; the others are killed, first,
// since their VMs take CPU time the pauses need. At most parallel pauses and
// kills run at once.
//
// ctx's deadline bounds the pauses: a pause that fails, or that the deadline
// cuts short or finds not begun, ends in a kill, so every sandbox ends paused
// or gone, never pausing. Kills run to their end after the deadline.
// Sandboxes of other nodes that share the store are not touched.
//
// Call it once Run has returned and nothing else (the API) starts, pauses or
// resumes sandboxes: a sandbox started meanwhile would be missed.
func (c *Controller) Shutdown(ctx context.Context, parallel int) {
	began := time.Now()
	list, err := c.store.ListSandboxes(context.WithoutCancel(ctx), store.SandboxFilter{
		NodeID: c.node.ID(), States: []store.SandboxState{store.StateRunning},
	})
	if err != nil {
		c.log.Error("list the sandboxes to stop at shutdown", "err", err)
		return
	}
	var pause, kill []*store.Sandbox
	for _, sb := range list {
		if sb.AutoPause {
			pause = append(pause, sb)
		} else {
			kill = append(kill, sb)
		}
	}
	if len(list) == 0 {
		return
	}
	left := "no deadline"
	if d, ok := ctx.Deadline(); ok {
		left = time.Until(d).Round(time.Millisecond).String()
	}
	c.log.Info(fmt.Sprintf("stopping sandboxes: pausing %d with autoPause, killing %d without", len(pause), len(kill)),
		"parallel", parallel, "time_left", left)

	var paused, killed atomic.Int32
	jobs := make(chan func())
	var wg sync.WaitGroup
	for range max(parallel, 1) {
		wg.Go(func() {
			for job := range jobs {
				job()
			}
		})
	}
	for _, sb := range kill {
		jobs <- func() {
			if c.shutdownKill(ctx, sb.ID, "it has no autoPause") {
				killed.Add(1)
			}
		}
	}
	for _, sb := range pause {
		jobs <- func() {
			err := c.shutdownPause(ctx, sb)
			switch {
			case err == nil:
				paused.Add(1)
			case errors.Is(err, errSkip):
			default:
				if c.shutdownKill(ctx, sb.ID, "its pause did not finish: "+err.Error()) {
					killed.Add(1)
				}
			}
		}
	}
	close(jobs)
	wg.Wait()
	c.log.Info("sandboxes stopped", "paused", paused.Load(), "killed", killed.Load(),
		"took", time.Since(began).Round(time.Millisecond))
}

// shutdownPause pauses a running autoPause sandbox at shutdown, within ctx.
// errSkip when it is no longer running (something else stopped it).
func (c *Controller) shutdownPause(ctx context.Context, sb *store.Sandbox) error {
	began := time.Now()
	// A snapshot or fork that outlived the API's shutdown holds the sandbox
	// for a second or so: wait for it rather than kill.
	for c.busyWith(sb.ID) != "" && ctx.Err() == nil {
		select {
		case <-time.After(transitionPoll):
		case <-ctx.Done():
		}
	}
	marked, err := c.store.UpdateSandbox(context.WithoutCancel(ctx), sb.ID, func(s *store.Sandbox) error {
		op := c.busyWith(s.ID)
		switch {
		case s.State != store.StateRunning:
			return errSkip
		case ctx.Err() != nil:
			return errNoTime
		case op != "":
			return fmt.Errorf("it is still being %s", op)
		}
		s.State = store.StatePausing
		return nil
	})
	switch {
	case errors.Is(err, errSkip) || errors.Is(err, store.ErrNotFound):
		return errSkip
	case err != nil:
		return err
	}
	c.log.Info("pausing sandbox at shutdown", "sandbox", sb.ID, "memory", marked.AutoPauseMemory)
	// finishPause records the outcome even when ctx ends during the pause:
	// paused, running again (then killed by the caller), or gone.
	if err := c.finishPause(ctx, marked, marked.AutoPauseMemory); err != nil {
		return err
	}
	c.log.Info("sandbox paused at shutdown", "sandbox", sb.ID, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// shutdownKill kills a running sandbox at shutdown and says why; it reports
// whether it killed it. The kill is not bounded by ctx: a VM left running
// would die with the process anyway, but its row would stay for the next
// start to settle.
func (c *Controller) shutdownKill(ctx context.Context, id, why string) bool {
	ctx = context.WithoutCancel(ctx)
	marked, err := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		if s.State != store.StateRunning {
			return errSkip
		}
		s.State = store.StateKilling
		return nil
	})
	switch {
	case errors.Is(err, errSkip) || errors.Is(err, store.ErrNotFound):
		return false // a failed pause that lost the VM has forgotten it already
	case err != nil:
		c.log.Error("kill sandbox at shutdown", "sandbox", id, "err", err)
		return false
	}
	if err := c.finishKill(ctx, marked); err != nil {
		c.log.Error("kill sandbox at shutdown", "sandbox", id, "err", err)
		return false
	}
	c.log.Info("sandbox killed at shutdown", "sandbox", id, "reason", why)
	return true
}
