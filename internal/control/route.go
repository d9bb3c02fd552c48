package control

import (
	"context"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// Route is where the proxy sends a running sandbox's traffic.
type Route struct {
	SandboxID string
	Host      string
	EnvdToken string
}

// ErrNoRoute is returned by Lookup for sandboxes that are not running here.
var ErrNoRoute = errorf(NotFound, "The sandbox was not found")

// Lookup returns the route of a running sandbox. A sandbox past its deadline
// is already unreachable, even before the evictor has killed it.
func (c *Controller) Lookup(ctx context.Context, id string) (*Route, error) {
	r, ok := c.catalog.Get(id)
	if !ok {
		return nil, ErrNoRoute
	}
	sb, err := c.store.GetSandbox(ctx, id)
	if err != nil || sb.State != store.StateRunning || expired(sb) {
		return nil, ErrNoRoute
	}
	return &Route{SandboxID: id, Host: r.Host, EnvdToken: sb.EnvdAccessToken}, nil
}

// Running returns the routes of every running sandbox (signed-URL routing
// tries each one's token).
func (c *Controller) Running(ctx context.Context) ([]*Route, error) {
	list, err := c.store.ListSandboxes(ctx, store.SandboxFilter{States: []store.SandboxState{store.StateRunning}})
	if err != nil {
		return nil, err
	}
	var out []*Route
	now := time.Now()
	for _, sb := range list {
		if r, ok := c.catalog.Get(sb.ID); ok && sb.EndAt.After(now) {
			out = append(out, &Route{SandboxID: sb.ID, Host: r.Host, EnvdToken: sb.EnvdAccessToken})
		}
	}
	return out, nil
}
