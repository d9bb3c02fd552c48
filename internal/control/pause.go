package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/warren-sh/warren/internal/catalog"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// Pausing and resuming (REST.md §6, PROXY.md §5).
//
// Pause marks the row pausing, unroutes the sandbox (open streams end), has
// the node save it and records what was saved: paused. A resume marks the row
// resuming, has the node start the sandbox again from the saved state (same
// ID, token and env) and records it running with a new deadline. Concurrent
// connects, resumes and proxied requests share one resume per sandbox (a
// resumeFlight); other processes see the resuming row and wait for it.

// transitionWait is how long a connect or auto-resume waits for a pause or
// resume in progress (PROXY.md §5: about a minute).
const transitionWait = time.Minute

// transitionPoll is how often a waiting caller looks at the row again.
const transitionPoll = 50 * time.Millisecond

// Auto-resume grants the create-time timeout within these bounds (PROXY.md §5).
const minAutoResumeTimeout = 300 * time.Second

// defaultResumeTimeout is the lifetime a resume grants when the caller asked
// for none (a connect with timeout 0 would otherwise expire at once).
const defaultResumeTimeout = 300 * time.Second

var (
	errNotRunning = errors.New("sandbox not running")
	errBusy       = errors.New("sandbox in transition")
	errGone       = errors.New("sandbox changed state")
)

// Pause saves one of the team's running sandboxes and stops it. It keeps its
// ID, metadata, template and token; Connect brings it back. Without memory
// only the disk is saved and a resume cold boots.
func (c *Controller) Pause(ctx context.Context, team *store.Team, id string, memory bool) error {
	sb, err := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		// busyWith under the row lock: a snapshot claims the sandbox, then
		// checks that it runs, so one of the two always sees the other.
		op := c.busyWith(id)
		switch {
		case s.TeamID != team.ID || s.State == store.StateKilling || expired(s):
			return sandboxNotFound(id)
		case op != "" && s.State == store.StateRunning:
			return errorf(Conflict, "Sandbox %q is being %s; try again when that is done", id, op)
		case s.State == store.StatePaused:
			return errorf(Conflict, "Sandbox %q is already paused", id)
		case s.State == store.StatePausing:
			return errorf(Conflict, "Sandbox %q is already being paused", id)
		case s.State == store.StateResuming:
			return errorf(Conflict, "Sandbox %q is being resumed", id)
		}
		s.State = store.StatePausing
		return nil
	})
	if errors.Is(err, store.ErrNotFound) {
		return sandboxNotFound(id)
	}
	if err != nil {
		return err
	}
	return c.finishPause(context.WithoutCancel(ctx), sb, memory)
}

// finishPause has the node save a sandbox marked pausing and records it
// paused. If the node fails (or ctx ends first), a sandbox it still runs goes
// back to running; one it lost is forgotten.
func (c *Controller) finishPause(ctx context.Context, sb *store.Sandbox, memory bool) error {
	route, routed := c.catalog.Get(sb.ID)
	// Unroute first: from here the proxy answers 502 (or auto-resumes) and
	// open streams end, as after a kill.
	c.catalog.Delete(sb.ID)
	c.cfg.OnGone(sb.ID)
	c.metrics.forget(sb.ID)

	saved, err := c.node.Pause(ctx, sb.ID, memory)
	// ctx bounds the node's work only: what happened is recorded even when
	// it ended meanwhile (a shutdown's deadline), or the row would stay
	// pausing.
	ctx = context.WithoutCancel(ctx)
	if err != nil {
		c.undoPause(ctx, sb, route, routed, err)
		if errors.Is(err, node.ErrBusy) {
			return errorf(Conflict, "Sandbox %q is busy (starting, pausing or being killed); try again", sb.ID)
		}
		return fmt.Errorf("pause sandbox %s: %w", sb.ID, err)
	}
	_, err = c.store.UpdateSandbox(ctx, sb.ID, func(s *store.Sandbox) error {
		if s.State != store.StatePausing {
			return errGone // killed meanwhile
		}
		s.State = store.StatePaused
		s.Paused = &store.PausedState{Key: saved.Key, Memory: saved.Memory, Bytes: saved.Bytes, At: time.Now()}
		return nil
	})
	switch {
	case errors.Is(err, errGone) || errors.Is(err, store.ErrNotFound):
		// Its kill found no VM and no saved state to remove: remove it here.
		if derr := c.node.DeletePaused(ctx, saved.Key); derr != nil {
			c.log.Error("delete saved state of a sandbox killed while pausing", "sandbox", sb.ID, "err", derr)
		}
		return sandboxNotFound(sb.ID)
	case err != nil:
		return fmt.Errorf("record paused sandbox %s (saved as %s): %w", sb.ID, saved.Key, err)
	}
	c.log.Info("sandbox paused", "sandbox", sb.ID, "memory", saved.Memory, "bytes", saved.Bytes)
	return nil
}

// undoPause puts a sandbox whose pause failed back to running when the node
// still runs it, and forgets it when the node lost it.
func (c *Controller) undoPause(ctx context.Context, sb *store.Sandbox, route catalog.Route, routed bool, cause error) {
	alive := false
	if list, err := c.node.List(ctx); err == nil {
		for _, info := range list {
			if info.ID == sb.ID {
				alive, route, routed = true, catalog.Route{NodeID: sb.NodeID, Host: info.Host}, true
			}
		}
	}
	if !alive {
		c.log.Error("sandbox lost: its pause failed and the node no longer runs it", "sandbox", sb.ID, "err", cause)
		_, err := c.store.UpdateSandbox(ctx, sb.ID, func(s *store.Sandbox) error {
			if s.State != store.StatePausing {
				return errGone
			}
			s.State = store.StateKilling
			return nil
		})
		if err == nil {
			if err := c.finishKill(ctx, sb); err != nil {
				c.log.Error("forget lost sandbox", "sandbox", sb.ID, "err", err)
			}
		}
		return
	}
	c.log.Error("pause failed; the sandbox keeps running", "sandbox", sb.ID, "err", cause)
	_, err := c.store.UpdateSandbox(ctx, sb.ID, func(s *store.Sandbox) error {
		if s.State != store.StatePausing {
			return errGone
		}
		s.State = store.StateRunning
		return nil
	})
	if err == nil && routed {
		c.catalog.Put(sb.ID, route)
	}
}

// Connect returns one of the team's sandboxes, running: a running one's
// deadline is extended (never shortened); a paused one is resumed first
// (resumed = true), with the same ID, token and env, and a deadline of now +
// timeout. A sandbox being paused is waited for, then resumed. Concurrent
// calls share one resume and none returns before the sandbox answers.
func (c *Controller) Connect(ctx context.Context, team *store.Team, id string, timeout time.Duration) (sb *store.Sandbox, resumed bool, err error) {
	if team.MaxLifetime > 0 && timeout > team.MaxLifetime {
		return nil, false, errorf(Invalid, "Timeout cannot be greater than %s", hours(team.MaxLifetime))
	}
	// A resume is followed by the extend; a sandbox paused again in between
	// (a deadline of 0) is resumed again, a few times at most.
	for range 3 {
		sb, err = c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
			switch {
			case s.TeamID != team.ID || expired(s):
				return sandboxNotFound(id)
			case s.State == store.StateKilling:
				return errorf(Conflict, "Sandbox %q is being killed", id)
			case s.State != store.StateRunning:
				return errNotRunning
			}
			s.EndAt = laterEnd(team, s, timeout)
			return nil
		})
		switch {
		case errors.Is(err, store.ErrNotFound):
			return nil, false, sandboxNotFound(id)
		case !errors.Is(err, errNotRunning):
			return sb, resumed, err
		}
		if err := c.resume(ctx, team, id, timeout, false); err != nil {
			return nil, false, err
		}
		resumed = true
	}
	return nil, false, errTransitioning(id)
}

// Resume is the deprecated POST /resume: Connect for a paused sandbox, a
// conflict for a running one.
func (c *Controller) Resume(ctx context.Context, team *store.Team, id string, timeout time.Duration) (*store.Sandbox, error) {
	sb, err := c.Get(ctx, team, id)
	if err != nil {
		return nil, err
	}
	if sb.State == store.StateRunning {
		return nil, errorf(Conflict, "Sandbox %q is already running", id)
	}
	sb, _, err = c.Connect(ctx, team, id, timeout)
	return sb, err
}

func errTransitioning(id string) *Error {
	return errorf(Conflict, "Sandbox %q is still being paused or resumed; try again in a moment", id)
}

// resumeFlight is one resume in progress; every caller for the sandbox waits
// on it.
type resumeFlight struct {
	done chan struct{}
	err  error
}

// resume brings a paused sandbox back, or waits for the resume in progress.
// The resume runs on the controller's own goroutine: a caller that gives up
// does not abort it for the others. needMemory refuses a disk-only pause
// (auto-resume never cold boots).
func (c *Controller) resume(ctx context.Context, team *store.Team, id string, timeout time.Duration, needMemory bool) error {
	c.mu.Lock()
	f, ok := c.resuming[id]
	if !ok {
		f = &resumeFlight{done: make(chan struct{})}
		c.resuming[id] = f
		c.work.Add(1)
		go func() {
			defer c.work.Done()
			f.err = c.doResume(context.WithoutCancel(ctx), team, id, timeout, needMemory)
			c.mu.Lock()
			delete(c.resuming, id)
			c.mu.Unlock()
			close(f.done)
		}()
	}
	c.mu.Unlock()
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// doResume waits out a pause in progress, then starts the paused sandbox on
// the node from its saved state. A sandbox found running is left alone.
func (c *Controller) doResume(ctx context.Context, team *store.Team, id string, timeout time.Duration, needMemory bool) error {
	if timeout <= 0 {
		timeout = defaultResumeTimeout
	}
	deadline := time.Now().Add(transitionWait)
	var sb *store.Sandbox
	for {
		var err error
		sb, err = c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
			switch {
			case s.TeamID != team.ID:
				return sandboxNotFound(id)
			case s.State == store.StateKilling:
				return errorf(Conflict, "Sandbox %q is being killed", id)
			case s.State == store.StateRunning:
				return errSkip
			case s.State == store.StatePausing || s.State == store.StateResuming:
				return errBusy
			case s.Paused == nil:
				return fmt.Errorf("paused sandbox %s has no saved state", id)
			case needMemory && !s.Paused.Memory:
				return ErrNoRoute
			}
			s.State = store.StateResuming
			return nil
		})
		switch {
		case errors.Is(err, errSkip):
			return nil
		case errors.Is(err, store.ErrNotFound):
			return sandboxNotFound(id)
		case errors.Is(err, errBusy):
			if time.Now().After(deadline) {
				return errTransitioning(id)
			}
			select {
			case <-time.After(transitionPoll):
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		case err != nil:
			return err
		}
		break
	}

	info, err := c.startPaused(ctx, team, sb)
	if err != nil {
		// Back to paused: the saved state is still there to try again.
		if _, uerr := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
			if s.State != store.StateResuming {
				return errGone
			}
			s.State = store.StatePaused
			return nil
		}); uerr != nil && !errors.Is(uerr, errGone) && !errors.Is(uerr, store.ErrNotFound) {
			c.log.Error("put sandbox back to paused after a failed resume", "sandbox", id, "err", uerr)
		}
		return err
	}
	now := time.Now().UTC()
	sb, err = c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		if s.State != store.StateResuming {
			return errGone // killed while resuming
		}
		s.State, s.Paused, s.NodeID = store.StateRunning, nil, c.node.ID()
		// A resumed sandbox starts a new life: the team's maximum lifetime
		// counts from now.
		s.StartedAt = now
		s.EndAt = clampEnd(team, s, now.Add(timeout))
		if info.EnvdVersion != "" {
			s.EnvdVersion = info.EnvdVersion
		}
		return nil
	})
	if err != nil {
		// Never leave a VM the store does not count as running.
		if kerr := c.node.Kill(ctx, id); kerr != nil && !errors.Is(kerr, node.ErrNotFound) {
			c.log.Error("kill sandbox after a resume that could not be recorded", "sandbox", id, "err", kerr)
		}
		if errors.Is(err, errGone) || errors.Is(err, store.ErrNotFound) {
			return sandboxNotFound(id)
		}
		return fmt.Errorf("record resumed sandbox %s: %w", id, err)
	}
	c.catalog.Put(id, catalog.Route{NodeID: sb.NodeID, Host: info.Host})
	c.log.Info("sandbox resumed", "sandbox", id)
	return nil
}

// startPaused has the node start a sandbox marked resuming from its saved
// state, within the team's concurrency limit.
func (c *Controller) startPaused(ctx context.Context, team *store.Team, sb *store.Sandbox) (*node.SandboxInfo, error) {
	release, err := c.reserve(ctx, team)
	if err != nil {
		return nil, err
	}
	defer release()
	// The build's artifact is the template the saved disk sits on (and, for
	// a disk-only pause, the kernel that boots it).
	artifact := ""
	if b, err := c.store.GetBuild(ctx, sb.BuildID); err == nil {
		artifact = b.Artifact
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	info, err := c.node.Create(ctx, node.SandboxSpec{
		ID: sb.ID, TemplateID: sb.TemplateID, BuildID: sb.BuildID, Artifact: artifact,
		CPUCount: sb.CPUCount, MemoryMB: sb.MemoryMB,
		EnvVars: sandboxEnv(sb.EnvVars, sb.ID, sb.TemplateID), AccessToken: sb.EnvdAccessToken,
		AllowInternet: sb.AllowInternet, Resume: sb.Paused.Key,
	})
	switch {
	case errors.Is(err, node.ErrFull):
		return nil, &Error{Kind: Unavailable, Message: "no capacity left to resume the sandbox on this node; try again later"}
	case errors.Is(err, node.ErrUnsynced):
		// Resuming it would fail the same way every time: say what to do.
		return nil, errorf(Internal, "Sandbox %q cannot be resumed: %v; kill it to remove it", sb.ID, node.ErrUnsynced)
	case err != nil:
		return nil, fmt.Errorf("resume sandbox %s from %s: %w", sb.ID, sb.Paused.Key, err)
	}
	return info, nil
}

// Resumable returns the route of a paused sandbox that traffic may resume
// (PROXY.md §5: auto-resume on, memory saved), with Host empty, so the proxy
// can check the request's tokens before it asks for AutoResume; ErrNoRoute
// for any other sandbox. A sandbox being paused or resumed counts: the resume
// waits for it.
func (c *Controller) Resumable(ctx context.Context, id string) (*Route, error) {
	sb, err := c.store.GetSandbox(ctx, id)
	if err != nil || !sb.AutoResume {
		return nil, ErrNoRoute
	}
	switch sb.State {
	case store.StatePaused, store.StateResuming:
		if sb.Paused == nil || !sb.Paused.Memory {
			return nil, ErrNoRoute
		}
	case store.StatePausing:
	default:
		return nil, ErrNoRoute
	}
	return &Route{SandboxID: id, EnvdToken: sb.EnvdAccessToken}, nil
}

// AutoResume resumes a paused sandbox for a request that reached it through
// the proxy and returns its route. The sandbox gets its create-time timeout
// again, within [5 min, the team's maximum lifetime]. ErrNoRoute when it may
// not be resumed by traffic (or is gone); Conflict while it stays in
// transition; LimitReached at the team's concurrency limit.
func (c *Controller) AutoResume(ctx context.Context, id string) (*Route, error) {
	sb, err := c.store.GetSandbox(ctx, id)
	if err != nil || !sb.AutoResume {
		return nil, ErrNoRoute
	}
	team, err := c.store.GetTeam(ctx, sb.TeamID)
	if err != nil {
		return nil, fmt.Errorf("team of sandbox %s: %w", id, err)
	}
	timeout := max(sb.Timeout, minAutoResumeTimeout)
	if team.MaxLifetime > 0 {
		timeout = min(timeout, team.MaxLifetime)
	}
	if err := c.resume(ctx, team, id, timeout, true); err != nil {
		var ce *Error
		if errors.As(err, &ce) && ce.Kind == NotFound {
			return nil, ErrNoRoute
		}
		return nil, err
	}
	return c.Lookup(ctx, id)
}

// busyWith names the snapshot or fork in progress on a sandbox, if any.
func (c *Controller) busyWith(id string) string {
	c.busyMu.Lock()
	defer c.busyMu.Unlock()
	return c.busy[id]
}

// claim marks a sandbox busy with op (a snapshot or fork, which copy it
// while it runs) until release; a pause or another copy meanwhile is refused.
func (c *Controller) claim(id, op string) (release func(), err error) {
	c.busyMu.Lock()
	defer c.busyMu.Unlock()
	if cur := c.busy[id]; cur != "" {
		return nil, errorf(Conflict, "Sandbox %q is being %s; try again when that is done", id, cur)
	}
	c.busy[id] = op
	return func() {
		c.busyMu.Lock()
		defer c.busyMu.Unlock()
		delete(c.busy, id)
	}, nil
}
