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
	return resolveTemplate(ctx, c.store, team, ref)
}

// templateRef is a parsed template reference.
type templateRef struct {
	ref       string // as the client wrote it
	name      string // [namespace/]alias or template ID, lower-cased
	namespace string // set when the reference names one
	alias     string
	tag       string // "" when none
}

// parseTemplateRef checks a "[namespace/]alias[:tag]" or "templateID[:tag]"
// reference.
func parseTemplateRef(ref string) (templateRef, error) {
	r := templateRef{ref: ref}
	r.name, r.tag, _ = strings.Cut(strings.ToLower(strings.TrimSpace(ref)), ":")
	var namespaced bool
	r.namespace, r.alias, namespaced = strings.Cut(r.name, "/")
	if !namespaced {
		r.alias, r.namespace = r.name, ""
	}
	if !namePattern.MatchString(r.alias) || (namespaced && !namePattern.MatchString(r.namespace)) ||
		(r.tag != "" && !tagPattern.MatchString(r.tag)) {
		return r, errorf(Invalid, "Invalid template reference: %q (want [namespace/]alias[:tag] or templateID[:tag], lower-case letters, digits, '-' and '_')", ref)
	}
	return r, nil
}

// resolveTemplate is ResolveTemplate on st (template builds resolve
// fromTemplate and tag targets the same way).
func resolveTemplate(ctx context.Context, st store.Store, team *store.Team, ref string) (*Resolved, error) {
	r, err := parseTemplateRef(ref)
	if err != nil {
		return nil, err
	}
	tmpl, usedAlias, err := findTemplate(ctx, st, team, r)
	if err != nil {
		return nil, err
	}
	build, err := taggedBuild(ctx, st, tmpl, r)
	if err != nil {
		return nil, err
	}
	return &Resolved{Template: tmpl, Build: build, Alias: usedAlias}, nil
}

// findTemplate finds the template r names that team may use: "ns/alias" in
// that namespace only; a bare name as an alias of the team's namespace, then a
// global alias, then a template ID. usedAlias is the alias when r named one.
func findTemplate(ctx context.Context, st store.Store, team *store.Team, r templateRef) (tmpl *store.Template, usedAlias string, err error) {
	notFound := errorf(NotFound, "template '%s' not found", r.ref)
	var tmplID string
	lookup := func(ns string) (bool, error) {
		a, err := st.GetAlias(ctx, ns, r.alias)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		tmplID, usedAlias = a.TemplateID, r.alias
		return true, nil
	}
	var found bool
	if r.namespace != "" {
		found, err = lookup(r.namespace)
	} else {
		if found, err = lookup(team.Slug); err == nil && !found {
			found, err = lookup("")
		}
		if err == nil && !found {
			tmplID, found = r.alias, true // a bare template ID
		}
	}
	if err != nil {
		return nil, "", err
	}
	if !found {
		return nil, "", notFound
	}
	tmpl, err = st.GetTemplate(ctx, tmplID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", notFound
	}
	if err != nil {
		return nil, "", err
	}
	if tmpl.TeamID != team.ID && !tmpl.Public {
		return nil, "", notFound
	}
	return tmpl, usedAlias, nil
}

// taggedBuild is the successful build of tmpl that r's tag names; no tag or
// "default" is the latest successful build.
func taggedBuild(ctx context.Context, st store.Store, tmpl *store.Template, r templateRef) (*store.Build, error) {
	var build *store.Build
	if r.tag != "" && r.tag != defaultTag {
		t, err := st.GetTag(ctx, tmpl.ID, r.tag)
		if errors.Is(err, store.ErrNotFound) {
			return nil, errorf(NotFound, "tag '%s' does not exist for template '%s'", r.tag, r.name)
		}
		if err != nil {
			return nil, err
		}
		if build, err = st.GetBuild(ctx, t.BuildID); err != nil {
			return nil, err
		}
	} else {
		builds, err := st.ListBuilds(ctx, tmpl.ID)
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
		return nil, errorf(NotFound, "template '%s' has no successful build", r.ref)
	}
	return build, nil
}
