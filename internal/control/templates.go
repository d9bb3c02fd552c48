package control

import (
	"context"
	"errors"
	"regexp"
	"strings"

	"github.com/warren-sh/warren/internal/store"
)

// Resolved is a template reference resolved to one build.
type Resolved struct {
	Template *store.Template
	Build    *store.Build
	// Alias is the name the client used, when it named an alias.
	Alias string
}

var (
	namePattern = regexp.MustCompile(`^[a-z0-9_-]+$`)
	tagPattern  = regexp.MustCompile(`^[a-z0-9_.-]+$`)
)

// ResolveTemplate finds the build a reference names (REST.md §2):
// "[namespace/]alias[:tag]" or "templateID[:tag]"; no tag or "default" means the
// latest successful build. Other teams' private templates are not found.
func (c *Controller) ResolveTemplate(ctx context.Context, team *store.Team, ref string) (*Resolved, error) {
	name, tag, _ := strings.Cut(strings.ToLower(strings.TrimSpace(ref)), ":")
	namespace, alias, namespaced := strings.Cut(name, "/")
	if !namespaced {
		alias, namespace = name, ""
	}
	if !namePattern.MatchString(alias) || (namespaced && !namePattern.MatchString(namespace)) ||
		(tag != "" && !tagPattern.MatchString(tag)) {
		return nil, errorf(Invalid, "Invalid template reference: %q (want [namespace/]alias[:tag] or templateID[:tag], lower-case letters, digits, '-' and '_')", ref)
	}
	notFound := errorf(NotFound, "template '%s' not found", ref)

	var tmplID, usedAlias string
	lookup := func(ns string) (bool, error) {
		a, err := c.store.GetAlias(ctx, ns, alias)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		tmplID, usedAlias = a.TemplateID, alias
		return true, nil
	}
	var found bool
	var err error
	if namespaced {
		found, err = lookup(namespace)
	} else {
		if found, err = lookup(team.Slug); err == nil && !found {
			found, err = lookup("")
		}
		if err == nil && !found {
			tmplID, found = alias, true // a bare template ID
		}
	}
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, notFound
	}
	tmpl, err := c.store.GetTemplate(ctx, tmplID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, notFound
	}
	if err != nil {
		return nil, err
	}
	if tmpl.TeamID != team.ID && !tmpl.Public {
		return nil, notFound
	}

	var build *store.Build
	if tag != "" && tag != "default" {
		t, err := c.store.GetTag(ctx, tmpl.ID, tag)
		if errors.Is(err, store.ErrNotFound) {
			return nil, errorf(NotFound, "tag '%s' does not exist for template '%s'", tag, name)
		}
		if err != nil {
			return nil, err
		}
		if build, err = c.store.GetBuild(ctx, t.BuildID); err != nil {
			return nil, err
		}
	} else {
		builds, err := c.store.ListBuilds(ctx, tmpl.ID)
		if err != nil {
			return nil, err
		}
		for _, b := range builds {
			if b.Status == store.BuildReady {
				build = b
				break
			}
		}
	}
	if build == nil || build.Status != store.BuildReady {
		return nil, errorf(NotFound, "template '%s' has no successful build", ref)
	}
	return &Resolved{Template: tmpl, Build: build, Alias: usedAlias}, nil
}
