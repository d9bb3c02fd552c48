package control

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// AssignTags points tags at the build target ("name:tag", a build of one of
// the team's templates) resolves to; the newest assignment of a tag wins.
func (t *Templates) AssignTags(ctx context.Context, team *store.Team, target string, tags []string) (buildID string, assigned []string, err error) {
	tags, err = t.checkTagList(tags, "assigned")
	if err != nil {
		return "", nil, err
	}
	res, err := resolveTemplate(ctx, t.store, team, target)
	if err != nil {
		return "", nil, err
	}
	if res.Template.TeamID != team.ID {
		return "", nil, errorf(NotFound, "template '%s' not found", target)
	}
	now := time.Now().UTC()
	for _, tag := range tags {
		if err := t.store.SetTag(ctx, &store.Tag{TemplateID: res.Template.ID, Tag: tag, BuildID: res.Build.ID, CreatedAt: now}); err != nil {
			return "", nil, fmt.Errorf("tag build %s as %s: %w", res.Build.ID, tag, err)
		}
	}
	return res.Build.ID, tags, nil
}

// RemoveTags removes tags from one of the team's templates (name may carry a
// tag, which is ignored). Every tag must exist; none is removed otherwise.
func (t *Templates) RemoveTags(ctx context.Context, team *store.Team, name string, tags []string) error {
	tags, err := t.checkTagList(tags, "removed")
	if err != nil {
		return err
	}
	base, _, _ := strings.Cut(name, ":")
	tmpl, err := t.ownTemplate(ctx, team, base)
	if err != nil {
		return err
	}
	for _, tag := range tags {
		_, err := t.store.GetTag(ctx, tmpl.ID, tag)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(NotFound, "tag '%s' does not exist for template '%s'", tag, base)
		}
		if err != nil {
			return err
		}
	}
	for _, tag := range tags {
		if err := t.store.DeleteTag(ctx, tmpl.ID, tag); err != nil && !errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("remove tag %s of template %s: %w", tag, tmpl.ID, err)
		}
	}
	return nil
}

// checkTagList cleans the tags of an assign or remove; "default" is the
// latest successful build and is neither assigned nor removed by hand.
func (t *Templates) checkTagList(tags []string, verb string) ([]string, error) {
	tags, err := cleanTags(tags)
	if err != nil {
		return nil, err
	}
	if len(tags) == 0 {
		return nil, errorf(Invalid, "No tags given: want at least one tag")
	}
	for _, tag := range tags {
		if tag == defaultTag {
			return nil, errorf(Invalid, "Tag 'default' cannot be %s: it always names the latest successful build", verb)
		}
	}
	return tags, nil
}

// SetPublic makes one of the team's templates public or private and returns
// its names.
func (t *Templates) SetPublic(ctx context.Context, team *store.Team, ref string, public bool) ([]string, error) {
	tmpl, err := t.ownTemplate(ctx, team, ref)
	if err != nil {
		return nil, err
	}
	tmpl.Public, tmpl.UpdatedAt = public, time.Now().UTC()
	if err := t.store.UpdateTemplate(ctx, tmpl); err != nil {
		return nil, fmt.Errorf("update template %s: %w", tmpl.ID, err)
	}
	aliases, err := t.store.ListAliases(ctx, tmpl.ID)
	if err != nil {
		return nil, err
	}
	names := []string{}
	for _, a := range aliases {
		if a.Namespace != "" {
			names = append(names, a.Namespace+"/"+a.Alias)
		} else {
			names = append(names, a.Alias)
		}
	}
	return names, nil
}

// DeleteTemplate deletes one of the team's templates with its builds, tags,
// names and build logs; the next collection of template storage removes its
// artifacts, but for what other templates, snapshots or sandboxes still
// build on. It refuses while sandboxes (running or paused) use the template
// or one of its builds runs.
func (t *Templates) DeleteTemplate(ctx context.Context, team *store.Team, ref string) error {
	tmpl, err := t.ownTemplate(ctx, team, ref)
	if err != nil {
		return err
	}
	if tmpl.ID == BaseTemplateID {
		return errorf(Conflict, "Template '%s' is warren's base template and cannot be deleted", ref)
	}
	n, err := t.store.CountSandboxes(ctx, store.SandboxFilter{
		TemplateID: tmpl.ID, States: []store.SandboxState{store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming},
	})
	if err != nil {
		return err
	}
	if n > 0 {
		return errorf(Conflict, "Template '%s' is used by %d sandbox(es), running or paused; kill them first", ref, n)
	}
	builds, err := t.store.ListBuilds(ctx, tmpl.ID)
	if err != nil {
		return err
	}
	for _, b := range builds {
		if b.Status == store.BuildBuilding {
			return errorf(Conflict, "Template '%s' has a build in progress (%s); wait for it to finish", ref, b.ID)
		}
	}
	if err := t.store.DeleteTemplate(ctx, tmpl.ID); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return errorf(NotFound, "template '%s' not found", ref)
		}
		return fmt.Errorf("delete template %s: %w", tmpl.ID, err)
	}
	for _, b := range builds {
		if err := os.Remove(t.logPath(b.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.log.Warn("delete template: remove build log", "build", b.ID, "err", err)
		}
	}
	t.log.Info("template deleted", "template", tmpl.ID, "builds", len(builds))
	t.collectSoon()
	return nil
}
