package control

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// Snapshots and forks copy a running sandbox, which keeps running (REST.md
// §6). A snapshot is a template (store.Template.SourceSandboxID set) with one
// ready build per snapshot taken, whose artifact is what node.Snapshot wrote
// under snapshotKey; its optional name is an alias in the team's namespace.
// A fork copies the sandbox under a temporary key, starts count sandboxes
// from it and deletes the copy.

// Fork bounds (SandboxForkRequest).
const (
	MaxForks = 100
	// forkParallelism bounds the forks booting at once.
	forkParallelism = 4
)

// snapshotKey is where a snapshot build's artifact lives in blob storage.
func snapshotKey(templateID, buildID string) string {
	return "snapshots/" + templateID + "/" + buildID
}

// Snapshot is a snapshot template as clients name it (SnapshotInfo).
type Snapshot struct {
	Template *store.Template
	// ID is what a client passes as templateID to start from it:
	// "namespace/name:default" when named, else "templateID:default".
	ID string
	// Names are its full names, "namespace/name:default".
	Names []string
}

// CreateSnapshot copies one of the team's running sandboxes into a snapshot.
// A name the team already gave a snapshot gets a new build of that snapshot;
// a name of one of its built templates is a conflict.
func (c *Controller) CreateSnapshot(ctx context.Context, team *store.Team, id, name string) (*Snapshot, error) {
	alias := ""
	if name != "" {
		var err error
		if alias, err = snapshotName(team, name); err != nil {
			return nil, err
		}
	}
	release, err := c.claim(id, "snapshotted")
	if err != nil {
		return nil, err
	}
	defer release()
	sb, err := c.runningForCopy(ctx, team, id, "taking a snapshot")
	if err != nil {
		return nil, err
	}

	var tmpl *store.Template
	if alias != "" {
		a, err := c.store.GetAlias(ctx, team.Slug, alias)
		switch {
		case errors.Is(err, store.ErrNotFound):
		case err != nil:
			return nil, err
		default:
			if tmpl, err = c.store.GetTemplate(ctx, a.TemplateID); err != nil {
				return nil, err
			}
			if tmpl.SourceSandboxID == "" {
				return nil, errorf(Conflict, "The name %q belongs to a template that is not a snapshot; choose another name", name)
			}
		}
	}
	now := time.Now().UTC()
	isNew := tmpl == nil
	if isNew {
		tid, err := newTemplateID()
		if err != nil {
			return nil, err
		}
		tmpl = &store.Template{ID: tid, TeamID: team.ID, SourceSandboxID: sb.ID, CreatedAt: now, UpdatedAt: now}
	}
	buildID, err := newBuildID()
	if err != nil {
		return nil, err
	}
	key := snapshotKey(tmpl.ID, buildID)
	artifact, err := c.node.Snapshot(ctx, sb.ID, key)
	if errors.Is(err, node.ErrNotFound) {
		return nil, sandboxNotFound(id)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot sandbox %s: %w", id, err)
	}

	// Record it; on any failure remove what was made, the copy included.
	err = func() error {
		if isNew {
			if err := c.store.CreateTemplate(ctx, tmpl); err != nil {
				return err
			}
		}
		if err := c.store.CreateBuild(ctx, &store.Build{
			ID: buildID, TemplateID: tmpl.ID, Status: store.BuildReady,
			CPUCount: sb.CPUCount, MemoryMB: sb.MemoryMB, DiskSizeMB: sb.DiskSizeMB, EnvdVersion: sb.EnvdVersion,
			Artifact: artifact, CreatedAt: now, UpdatedAt: now, FinishedAt: &now,
		}); err != nil {
			return err
		}
		if isNew && alias != "" {
			err := c.store.SetAlias(ctx, &store.Alias{Namespace: team.Slug, Alias: alias, TemplateID: tmpl.ID})
			if errors.Is(err, store.ErrConflict) {
				return errorf(Conflict, "The name %q was just taken; choose another name", name)
			}
			return err
		}
		return nil
	}()
	if err != nil {
		cleanup := context.WithoutCancel(ctx)
		if isNew {
			if derr := c.store.DeleteTemplate(cleanup, tmpl.ID); derr != nil && !errors.Is(derr, store.ErrNotFound) {
				c.log.Error("delete half-made snapshot template", "template", tmpl.ID, "err", derr)
			}
		}
		if derr := c.node.DeleteSnapshot(cleanup, key); derr != nil {
			c.log.Error("delete unrecorded snapshot", "key", key, "err", derr)
		}
		return nil, fmt.Errorf("record snapshot of sandbox %s: %w", id, err)
	}
	return c.describeSnapshot(ctx, tmpl)
}

// runningForCopy returns a running sandbox of the team to snapshot or fork.
func (c *Controller) runningForCopy(ctx context.Context, team *store.Team, id, what string) (*store.Sandbox, error) {
	sb, err := c.Get(ctx, team, id)
	if err != nil {
		return nil, err
	}
	switch sb.State {
	case store.StateRunning:
		return sb, nil
	case store.StatePaused:
		return nil, errorf(Conflict, "Sandbox %q is paused; connect to it before %s", id, what)
	default:
		return nil, errTransitioning(id)
	}
}

// snapshotName checks a snapshot name, "name" or "<team namespace>/name"
// (REST.md §2 alias syntax), and returns the alias.
func snapshotName(team *store.Team, name string) (string, error) {
	n := strings.ToLower(strings.TrimSpace(name))
	if ns, alias, ok := strings.Cut(n, "/"); ok {
		if ns != team.Slug {
			return "", errorf(Invalid, "Invalid snapshot name %q: the namespace must be your team's, %q", name, team.Slug)
		}
		n = alias
	}
	if !namePattern.MatchString(n) {
		return "", errorf(Invalid, "Invalid snapshot name %q: want lower-case letters, digits, '-' and '_' (no tag)", name)
	}
	return n, nil
}

// describeSnapshot names a snapshot template the way clients see it.
func (c *Controller) describeSnapshot(ctx context.Context, t *store.Template) (*Snapshot, error) {
	aliases, err := c.store.ListAliases(ctx, t.ID)
	if err != nil {
		return nil, err
	}
	s := &Snapshot{Template: t, ID: t.ID + ":default", Names: []string{}}
	for _, a := range aliases {
		name := a.Alias + ":default"
		if a.Namespace != "" {
			name = a.Namespace + "/" + name
		}
		s.Names = append(s.Names, name)
	}
	if len(s.Names) > 0 {
		s.ID = s.Names[0]
	}
	return s, nil
}

// ListSnapshots returns the team's snapshots, oldest first: of one sandbox
// when sandboxID is set, the one ref names ("name", "namespace/name" or an
// ID, with an optional tag) when ref is set.
func (c *Controller) ListSnapshots(ctx context.Context, team *store.Team, sandboxID, ref string) ([]*Snapshot, error) {
	list, err := c.store.ListSnapshots(ctx, team.ID, sandboxID)
	if err != nil {
		return nil, err
	}
	want := ""
	if ref != "" {
		if want, err = c.snapshotRef(ctx, team, ref); err != nil {
			return nil, err
		}
	}
	out := []*Snapshot{}
	for _, t := range list {
		if ref != "" && t.ID != want {
			continue
		}
		s, err := c.describeSnapshot(ctx, t)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// snapshotRef is the template ID a snapshot reference names: an alias in
// the given or the team's namespace, else the reference as an ID.
func (c *Controller) snapshotRef(ctx context.Context, team *store.Team, ref string) (string, error) {
	name, _, _ := strings.Cut(strings.ToLower(strings.TrimSpace(ref)), ":")
	ns, alias, namespaced := strings.Cut(name, "/")
	if !namespaced {
		ns, alias = team.Slug, name
	}
	a, err := c.store.GetAlias(ctx, ns, alias)
	switch {
	case err == nil:
		return a.TemplateID, nil
	case errors.Is(err, store.ErrNotFound):
		return name, nil
	}
	return "", err
}

// DeleteTemplate deletes a template or snapshot of the team with its builds
// and, for a snapshot, the copies in blob storage. A template that running or
// paused sandboxes were started from is kept (a paused one resumes on it).
func (c *Controller) DeleteTemplate(ctx context.Context, team *store.Team, t *store.Template) error {
	what := "Template"
	if t.SourceSandboxID != "" {
		what = "Snapshot"
	}
	if t.TeamID != team.ID {
		return errorf(NotFound, "template '%s' not found", t.ID)
	}
	n, err := c.store.CountSandboxes(ctx, store.SandboxFilter{TemplateID: t.ID, States: []store.SandboxState{
		store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming,
	}})
	if err != nil {
		return err
	}
	if n > 0 {
		return errorf(Conflict, "%s %q is used by %d running or paused sandbox(es); kill them before deleting it", what, t.ID, n)
	}
	builds, err := c.store.ListBuilds(ctx, t.ID)
	if err != nil {
		return err
	}
	if err := c.store.DeleteTemplate(ctx, t.ID); errors.Is(err, store.ErrNotFound) {
		return errorf(NotFound, "template '%s' not found", t.ID)
	} else if err != nil {
		return err
	}
	if t.SourceSandboxID != "" {
		for _, b := range builds {
			if err := c.node.DeleteSnapshot(context.WithoutCancel(ctx), snapshotKey(t.ID, b.ID)); err != nil {
				c.log.Error("delete snapshot copy", "template", t.ID, "build", b.ID, "err", err)
			}
		}
	}
	return nil
}

// ForkResult is one fork's outcome: the new sandbox, or why it did not start.
type ForkResult struct {
	Sandbox *store.Sandbox
	Err     error
}

// Fork copies one of the team's running sandboxes, which keeps running with
// its ID and deadline, and starts count sandboxes from the copy: each with its
// own ID and token, the source's template, metadata, env and lifecycle, and a
// deadline of now + timeout. Each fork succeeds or fails on its own.
func (c *Controller) Fork(ctx context.Context, team *store.Team, id string, timeout time.Duration, count int) ([]ForkResult, error) {
	if count < 1 || count > MaxForks {
		return nil, errorf(Invalid, "Field \"count\" must be from 1 to %d, not %d", MaxForks, count)
	}
	if err := checkTimeout(team, timeout); err != nil {
		return nil, err
	}
	release, err := c.claim(id, "forked")
	if err != nil {
		return nil, err
	}
	sb, err := c.runningForCopy(ctx, team, id, "forking it")
	if err != nil {
		release()
		return nil, err
	}
	suffix, err := randomName(12)
	if err != nil {
		release()
		return nil, err
	}
	key := "forks/" + id + "/" + suffix
	artifact, err := c.node.Snapshot(ctx, id, key)
	release()
	if errors.Is(err, node.ErrNotFound) {
		return nil, sandboxNotFound(id)
	}
	if err != nil {
		return nil, fmt.Errorf("copy sandbox %s to fork it: %w", id, err)
	}
	defer func() {
		// Started forks do not need the copy any more (the node keeps what they use).
		if err := c.node.DeleteSnapshot(context.WithoutCancel(ctx), key); err != nil {
			c.log.Error("delete fork copy", "sandbox", id, "key", key, "err", err)
		}
	}()

	from := origin{templateID: sb.TemplateID, alias: sb.Alias, build: &store.Build{
		ID: sb.BuildID, CPUCount: sb.CPUCount, MemoryMB: sb.MemoryMB, DiskSizeMB: sb.DiskSizeMB,
		EnvdVersion: sb.EnvdVersion, Artifact: artifact,
	}}
	results := make([]ForkResult, count)
	sem := make(chan struct{}, forkParallelism)
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			req := CreateRequest{
				Timeout: timeout, Metadata: maps.Clone(sb.Metadata), EnvVars: maps.Clone(sb.EnvVars),
				AllowInternet: sb.AllowInternet, AutoPause: sb.AutoPause, AutoPauseMemory: sb.AutoPauseMemory,
				AutoResume: sb.AutoResume,
			}
			results[i].Sandbox, results[i].Err = c.start(ctx, team, from, req)
		})
	}
	wg.Wait()
	return results, nil
}
