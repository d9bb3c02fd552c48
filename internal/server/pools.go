package server

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
)

// templatePoolInterval is how often the warm pools of Config.WarmPools
// follow their templates: a rebuilt template's pool moves to the new build
// within it.
const templatePoolInterval = 15 * time.Second

// ParseWarmPools reads --warm-pool-templates: comma-separated name=size
// pairs, where name is a template as a client names it (alias, ID,
// namespace/alias, with an optional :tag).
func ParseWarmPools(s string) (map[string]int, error) {
	out := map[string]int{}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		name, n, ok := strings.Cut(f, "=")
		size, err := strconv.Atoi(strings.TrimSpace(n))
		name = strings.TrimSpace(name)
		if !ok || err != nil || size < 0 || name == "" {
			return nil, fmt.Errorf("--warm-pool-templates %q: want template=size pairs separated by commas, such as code-interpreter-v1=2,my-template=1", f)
		}
		if name == "base" {
			return nil, fmt.Errorf("--warm-pool-templates %q: base has its own flag, --warm-pool", f)
		}
		out[name] = size
	}
	return out, nil
}

// templatePools keeps a warm pool for each template of Config.WarmPools on
// the build its name resolves to now, and empties the pool of a build the
// name no longer resolves to (a rebuild, a deleted template).
type templatePools struct {
	sizes   map[string]int
	resolve func(ctx context.Context, name string) (artifact string, err error)
	set     func(artifact string, size int) error
	log     *slog.Logger

	applied map[string]int    // artifact → pool size set on the node
	failing map[string]string // name → the last resolve error logged
}

// sync resolves every name once and resizes the pools that changed.
func (p *templatePools) sync(ctx context.Context) {
	if p.applied == nil {
		p.applied, p.failing = map[string]int{}, map[string]string{}
	}
	want := map[string]int{}
	for _, name := range slices.Sorted(maps.Keys(p.sizes)) {
		art, err := p.resolve(ctx, name)
		if err != nil {
			if msg := err.Error(); p.failing[name] != msg {
				p.log.Warn("warm pool: the template cannot be resolved; no warm VMs for it until it can", "template", name, "err", err)
				p.failing[name] = msg
			}
			continue
		}
		if p.failing[name] != "" {
			p.log.Info("warm pool: the template resolves again", "template", name)
			delete(p.failing, name)
		}
		want[art] = max(want[art], p.sizes[name])
	}
	for art := range p.applied {
		if _, ok := want[art]; !ok {
			if err := p.set(art, 0); err != nil {
				p.log.Warn("warm pool: empty the pool of a former build", "artifact", art, "err", err)
				continue
			}
			delete(p.applied, art)
		}
	}
	for art, size := range want {
		if cur, ok := p.applied[art]; ok && cur == size {
			continue
		}
		if err := p.set(art, size); err != nil {
			p.log.Warn("warm pool: set the pool of a template", "artifact", art, "size", size, "err", err)
			continue
		}
		p.applied[art] = size
	}
}

// run syncs at once and then every templatePoolInterval until ctx ends.
func (p *templatePools) run(ctx context.Context) {
	for {
		p.sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(templatePoolInterval):
		}
	}
}
