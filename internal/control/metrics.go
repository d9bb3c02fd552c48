package control

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// metricsRing keeps each running sandbox's recent resource samples.
type metricsRing struct {
	keep    time.Duration
	mu      sync.Mutex
	samples map[string][]node.Stats
}

func newMetricsRing(keep time.Duration) *metricsRing {
	return &metricsRing{keep: keep, samples: map[string][]node.Stats{}}
}

func (r *metricsRing) add(id string, s node.Stats) {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := append(r.samples[id], s)
	cut := 0
	for cut < len(list) && s.Timestamp.Sub(list[cut].Timestamp) > r.keep {
		cut++
	}
	r.samples[id] = list[cut:]
}

func (r *metricsRing) between(id string, start, end time.Time) []node.Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []node.Stats
	for _, s := range r.samples[id] {
		if !s.Timestamp.Before(start) && !s.Timestamp.After(end) {
			out = append(out, s)
		}
	}
	return out
}

func (r *metricsRing) forget(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.samples, id)
}

// sampleMetrics records one sample of every running sandbox on the node.
func (c *Controller) sampleMetrics(ctx context.Context) {
	running, err := c.store.ListSandboxes(ctx, store.SandboxFilter{
		NodeID: c.node.ID(), States: []store.SandboxState{store.StateRunning},
	})
	if err != nil {
		c.log.Error("list sandboxes for metrics", "err", err)
		return
	}
	for _, sb := range running {
		c.sample(ctx, sb.ID)
	}
}

func (c *Controller) sample(ctx context.Context, id string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := c.node.Stats(ctx, id)
	if err != nil {
		if !errors.Is(err, node.ErrNotFound) {
			c.log.Debug("sample sandbox metrics", "sandbox", id, "err", err)
		}
		return
	}
	c.metrics.add(id, *st)
}

// Metrics returns a sandbox's resource samples between start and end
// (inclusive). A window that reaches the present and has no sample yet gets a
// fresh one, so a just-created sandbox reports its use at once.
func (c *Controller) Metrics(ctx context.Context, team *store.Team, id string, start, end time.Time) ([]node.Stats, error) {
	sb, err := c.Get(ctx, team, id)
	if err != nil {
		return nil, err
	}
	out := c.metrics.between(id, start, end)
	if len(out) == 0 && sb.State == store.StateRunning && !end.Before(time.Now().Add(-c.cfg.MetricsInterval)) {
		c.sample(ctx, id)
		out = c.metrics.between(id, start, time.Now())
	}
	return out, nil
}

// Logs returns a sandbox's log lines.
func (c *Controller) Logs(ctx context.Context, team *store.Team, id string) ([]node.LogLine, error) {
	if _, err := c.Get(ctx, team, id); err != nil {
		return nil, err
	}
	lines, err := c.node.Logs(ctx, id)
	if errors.Is(err, node.ErrNotFound) {
		return nil, nil
	}
	return lines, err
}
