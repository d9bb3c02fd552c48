// Package control is the sandbox lifecycle: it creates sandboxes on a node,
// keeps their deadlines, kills or pauses them on time or on request, resumes
// them, takes snapshots and forks, and reconciles what the store says with
// what the node runs.
//
// A sandbox row is inserted only once its node reports it ready (so every
// listed sandbox is usable) and moves running → killing → deleted, or running
// → pausing → paused → resuming → running. Every state change goes through
// store.UpdateSandbox, so concurrent kills, timeouts, pauses and connects, even
// from several processes, see one consistent row; the transitional states
// (pausing, resuming, killing) tell everyone else to wait or refuse.
package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/catalog"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// Config wires a Controller.
type Config struct {
	Store   store.Store
	Node    node.Node
	Catalog *catalog.Memory
	Log     *slog.Logger
	// EvictInterval is how often expired sandboxes are looked for; the SDK
	// expects a sandbox gone within about a second of its deadline.
	EvictInterval time.Duration
	// MetricsInterval is how often running sandboxes' resource use is sampled.
	MetricsInterval time.Duration
	// OnGone is called when a sandbox stops being reachable (the proxy aborts
	// its in-flight streams).
	OnGone func(sandboxID string)
}

// Controller runs the sandbox lifecycle.
type Controller struct {
	cfg     Config
	store   store.Store
	node    node.Node
	catalog *catalog.Memory
	log     *slog.Logger
	metrics *metricsRing

	mu       sync.Mutex
	creating map[string]int           // team ID → creates in flight, for the concurrency limit
	resuming map[string]*resumeFlight // sandbox ID → the one resume in flight

	// busyMu guards busy. It is read inside store transactions, so it is
	// never held across a store call (mu is, in reserve).
	busyMu sync.Mutex
	busy   map[string]string // sandbox ID → snapshot or fork in progress ("snapshotted", "forked")

	// work tracks the goroutines the controller starts (evictor pauses,
	// resumes that outlive the request that asked); Run waits for them.
	work sync.WaitGroup

	lastKillRetry time.Time // owned by the Run goroutine
}

// New returns a Controller; Run starts its background work.
func New(cfg Config) *Controller {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Catalog == nil {
		cfg.Catalog = catalog.NewMemory()
	}
	if cfg.EvictInterval <= 0 {
		cfg.EvictInterval = 250 * time.Millisecond
	}
	if cfg.MetricsInterval <= 0 {
		cfg.MetricsInterval = 5 * time.Second
	}
	if cfg.OnGone == nil {
		cfg.OnGone = func(string) {}
	}
	return &Controller{
		cfg: cfg, store: cfg.Store, node: cfg.Node, catalog: cfg.Catalog, log: cfg.Log,
		metrics:  newMetricsRing(time.Hour),
		creating: map[string]int{}, resuming: map[string]*resumeFlight{}, busy: map[string]string{},
	}
}

// CreateRequest is what a client asks for when creating a sandbox.
type CreateRequest struct {
	TemplateRef   string
	Timeout       time.Duration
	Metadata      map[string]string
	EnvVars       map[string]string
	AllowInternet bool
	// AutoPause pauses instead of killing at the deadline; the pause saves
	// memory too when AutoPauseMemory.
	AutoPause       bool
	AutoPauseMemory bool
	AutoResume      bool
}

// Create starts a sandbox and returns it once its agent is ready.
func (c *Controller) Create(ctx context.Context, team *store.Team, req CreateRequest) (*store.Sandbox, error) {
	if err := checkTimeout(team, req.Timeout); err != nil {
		return nil, err
	}
	resolved, err := c.ResolveTemplate(ctx, team, req.TemplateRef)
	if err != nil {
		return nil, err
	}
	return c.start(ctx, team, origin{templateID: resolved.Template.ID, alias: resolved.Alias, build: resolved.Build}, req)
}

// checkTimeout refuses a lifetime that is not positive or beyond the team's maximum.
func checkTimeout(team *store.Team, d time.Duration) error {
	if d <= 0 {
		return errorf(Invalid, "Timeout must be greater than 0")
	}
	if team.MaxLifetime > 0 && d > team.MaxLifetime {
		return errorf(Invalid, "Timeout cannot be greater than %s", hours(team.MaxLifetime))
	}
	return nil
}

// origin is what a new sandbox starts from: a template's build, or (fork) a
// copy of a running sandbox recorded as its template's build.
type origin struct {
	templateID string
	alias      string
	build      *store.Build // Artifact is what the node restores
}

// start boots a sandbox from o and records it.
func (c *Controller) start(ctx context.Context, team *store.Team, o origin, req CreateRequest) (*store.Sandbox, error) {
	release, err := c.reserve(ctx, team)
	if err != nil {
		return nil, err
	}
	defer release()

	id, err := newSandboxID()
	if err != nil {
		return nil, err
	}
	token, err := randomHex(32)
	if err != nil {
		return nil, err
	}
	b := o.build
	info, err := c.node.Create(ctx, node.SandboxSpec{
		ID: id, TemplateID: o.templateID, BuildID: b.ID, Artifact: b.Artifact,
		CPUCount: b.CPUCount, MemoryMB: b.MemoryMB,
		EnvVars: sandboxEnv(req.EnvVars, id, o.templateID), AccessToken: token, AllowInternet: req.AllowInternet,
	})
	switch {
	case errors.Is(err, node.ErrFull):
		return nil, &Error{Kind: Unavailable, Message: "no capacity left for a new sandbox on this node; try again later"}
	case err != nil:
		return nil, fmt.Errorf("create sandbox %s: %w", id, err)
	}
	now := time.Now().UTC()
	sb := &store.Sandbox{
		ID: id, TeamID: team.ID, TemplateID: o.templateID, BuildID: b.ID, Alias: o.alias,
		NodeID: c.node.ID(), State: store.StateRunning,
		Metadata: req.Metadata, EnvVars: req.EnvVars,
		CPUCount: b.CPUCount, MemoryMB: b.MemoryMB, DiskSizeMB: b.DiskSizeMB,
		EnvdVersion: info.EnvdVersion, EnvdAccessToken: token,
		AllowInternet: req.AllowInternet, AutoPause: req.AutoPause, AutoPauseMemory: req.AutoPauseMemory,
		AutoResume: req.AutoResume, Timeout: req.Timeout, StartedAt: now, EndAt: now.Add(req.Timeout),
	}
	if sb.EnvdVersion == "" {
		sb.EnvdVersion = b.EnvdVersion
	}
	if err := c.store.InsertSandbox(ctx, sb); err != nil {
		// Never leave a VM the store does not know about.
		if kerr := c.node.Kill(context.WithoutCancel(ctx), id); kerr != nil {
			c.log.Error("kill sandbox after failed insert", "sandbox", id, "err", kerr)
		}
		return nil, fmt.Errorf("record sandbox %s: %w", id, err)
	}
	c.catalog.Put(id, catalog.Route{NodeID: sb.NodeID, Host: info.Host})
	if err := c.store.RecordSpawn(ctx, o.templateID, now); err != nil {
		c.log.Warn("record template spawn", "template", o.templateID, "err", err)
	}
	return sb, nil
}

// sandboxEnv is the environment envd's /init gives every process: the
// user's variables and where it runs, as under E2B (ENVD.md §12).
func sandboxEnv(user map[string]string, id, templateID string) map[string]string {
	env := make(map[string]string, len(user)+3)
	for k, v := range user {
		env[k] = v
	}
	env["E2B_SANDBOX"] = "true"
	env["E2B_SANDBOX_ID"] = id
	env["E2B_TEMPLATE_ID"] = templateID
	return env
}

// reserve counts a create in flight against the team's concurrency limit.
func (c *Controller) reserve(ctx context.Context, team *store.Team) (release func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if team.MaxSandboxes > 0 {
		running, err := c.store.CountSandboxes(ctx, store.SandboxFilter{
			TeamID: team.ID, States: []store.SandboxState{store.StateRunning, store.StatePausing, store.StateResuming, store.StateKilling},
		})
		if err != nil {
			return nil, err
		}
		if running+c.creating[team.ID] >= team.MaxSandboxes {
			return nil, &Error{
				Kind:       LimitReached,
				Message:    fmt.Sprintf("you have reached the maximum number of concurrent E2B sandboxes (%d)", team.MaxSandboxes),
				RetryAfter: 5 * time.Second,
			}
		}
	}
	c.creating[team.ID]++
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.creating[team.ID]--; c.creating[team.ID] <= 0 {
			delete(c.creating, team.ID)
		}
	}, nil
}

// Get returns one of the team's sandboxes.
func (c *Controller) Get(ctx context.Context, team *store.Team, id string) (*store.Sandbox, error) {
	sb, err := c.store.GetSandbox(ctx, id)
	if errors.Is(err, store.ErrNotFound) || (err == nil && (sb.TeamID != team.ID || sb.State == store.StateKilling || expired(sb))) {
		return nil, sandboxNotFound(id)
	}
	return sb, err
}

// expired reports whether a running sandbox is past its deadline: it is gone
// for clients (the proxy stops routing to it at once) even before the evictor
// has killed it. A sandbox with autoPause does not expire: at its deadline
// the evictor pauses it, and until then clients see it running.
func expired(sb *store.Sandbox) bool {
	return sb.State == store.StateRunning && !sb.AutoPause && !sb.EndAt.After(time.Now())
}

// List returns the team's sandboxes that match f (f.TeamID is set here).
func (c *Controller) List(ctx context.Context, team *store.Team, f store.SandboxFilter) ([]*store.Sandbox, error) {
	f.TeamID = team.ID
	if len(f.States) == 0 {
		f.States = []store.SandboxState{store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming}
	}
	return c.store.ListSandboxes(ctx, f)
}

// Count returns how many of the team's sandboxes match f.
func (c *Controller) Count(ctx context.Context, team *store.Team, f store.SandboxFilter) (int, error) {
	f.TeamID = team.ID
	return c.store.CountSandboxes(ctx, f)
}

// Kill stops one of the team's sandboxes, or removes a paused one's saved
// state, and forgets it.
func (c *Controller) Kill(ctx context.Context, team *store.Team, id string) error {
	// A sandbox past its deadline is gone for clients (Get answers 404 at
	// once) before the evictor has killed it: this kill does the evictor's
	// work and answers as Get does.
	var wasExpired bool
	sb, err := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		if s.TeamID != team.ID || s.State == store.StateKilling {
			return sandboxNotFound(id)
		}
		wasExpired = expired(s)
		s.State = store.StateKilling
		return nil
	})
	if errors.Is(err, store.ErrNotFound) {
		return sandboxNotFound(id)
	}
	if err != nil {
		return err
	}
	if err := c.finishKill(context.WithoutCancel(ctx), sb); err != nil {
		return err
	}
	if wasExpired {
		return sandboxNotFound(id)
	}
	return nil
}

// finishKill makes a sandbox that is marked killing unreachable, stops its VM,
// removes what a pause saved and deletes its row. A failure leaves the row
// killing; the evictor retries.
func (c *Controller) finishKill(ctx context.Context, sb *store.Sandbox) error {
	// Unroute first: from here on the proxy answers 502 and open streams end.
	c.catalog.Delete(sb.ID)
	c.cfg.OnGone(sb.ID)
	c.metrics.forget(sb.ID)
	if err := c.node.Kill(ctx, sb.ID); err != nil && !errors.Is(err, node.ErrNotFound) {
		return fmt.Errorf("kill sandbox %s on node %s: %w", sb.ID, sb.NodeID, err)
	}
	if sb.Paused != nil {
		if err := c.node.DeletePaused(ctx, sb.Paused.Key); err != nil {
			return fmt.Errorf("delete saved state %s of sandbox %s: %w", sb.Paused.Key, sb.ID, err)
		}
	}
	if err := c.store.DeleteSandbox(ctx, sb.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("delete sandbox %s: %w", sb.ID, err)
	}
	return nil
}

// SetTimeout moves a running sandbox's deadline to now + d; it may shorten it,
// and d ≤ 0 expires it at once.
func (c *Controller) SetTimeout(ctx context.Context, team *store.Team, id string, d time.Duration) error {
	_, err := c.update(ctx, team, id, func(s *store.Sandbox) error {
		s.EndAt = clampEnd(team, s, time.Now().Add(max(d, 0)))
		return nil
	})
	return err
}

// Refresh extends a running sandbox's deadline to at least now + d.
func (c *Controller) Refresh(ctx context.Context, team *store.Team, id string, d time.Duration) error {
	_, err := c.update(ctx, team, id, func(s *store.Sandbox) error {
		s.EndAt = laterEnd(team, s, d)
		return nil
	})
	return err
}

// update changes a running sandbox of the team under the row lock.
func (c *Controller) update(ctx context.Context, team *store.Team, id string, fn func(*store.Sandbox) error) (*store.Sandbox, error) {
	sb, err := c.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error {
		switch {
		case s.TeamID != team.ID || expired(s):
			return sandboxNotFound(id)
		case s.State == store.StateKilling:
			return errorf(Conflict, "Sandbox %q is being killed", id)
		case s.State == store.StatePausing:
			return errorf(Conflict, "Sandbox %q is being paused", id)
		case s.State == store.StatePaused:
			return errorf(Conflict, "Sandbox %q is paused", id)
		case s.State == store.StateResuming:
			return errorf(Conflict, "Sandbox %q is being resumed", id)
		}
		return fn(s)
	})
	if errors.Is(err, store.ErrNotFound) {
		return nil, sandboxNotFound(id)
	}
	return sb, err
}

// laterEnd is the later of the current deadline and now + d, within the team's maximum lifetime.
func laterEnd(team *store.Team, s *store.Sandbox, d time.Duration) time.Time {
	end := time.Now().Add(d)
	if s.EndAt.After(end) {
		end = s.EndAt
	}
	return clampEnd(team, s, end)
}

// clampEnd keeps a deadline within the team's maximum lifetime, counted from the start.
func clampEnd(team *store.Team, s *store.Sandbox, end time.Time) time.Time {
	if team.MaxLifetime > 0 {
		if limit := s.StartedAt.Add(team.MaxLifetime); end.After(limit) {
			end = limit
		}
	}
	return end.UTC()
}

func hours(d time.Duration) string {
	if h := d.Hours(); h == float64(int(h)) {
		return fmt.Sprintf("%d hours", int(h))
	}
	return d.String()
}

// newSandboxID returns "i" + 20 characters [a-z0-9]: DNS-label safe for host routing.
func newSandboxID() (string, error) {
	id, err := randomName(20)
	return "i" + id, err
}

// newTemplateID returns 20 characters [a-z0-9] (REST.md §2).
func newTemplateID() (string, error) { return randomName(20) }

// newBuildID returns a random (version 4) UUID.
func newBuildID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}

// randomName returns n random characters [a-z0-9].
func randomName(n int) (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	id := make([]byte, 0, n)
	buf := make([]byte, 32)
	for len(id) < cap(id) {
		if _, err := rand.Read(buf); err != nil {
			return "", err
		}
		for _, b := range buf {
			// 252 = 7*36: rejecting the rest keeps every character equally likely.
			if b < 252 && len(id) < cap(id) {
				id = append(id, alphabet[b%36])
			}
		}
	}
	return string(id), nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
