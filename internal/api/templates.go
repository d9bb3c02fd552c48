package api

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// templateResponse is the Template schema (template lists).
type templateResponse struct {
	TemplateID    string     `json:"templateID"`
	BuildID       string     `json:"buildID"`
	CPUCount      int        `json:"cpuCount"`
	MemoryMB      int        `json:"memoryMB"`
	DiskSizeMB    int        `json:"diskSizeMB"`
	Public        bool       `json:"public"`
	Aliases       []string   `json:"aliases"`
	Names         []string   `json:"names"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`
	CreatedBy     *struct{}  `json:"createdBy"` // warren has teams, not users: always null
	LastSpawnedAt *time.Time `json:"lastSpawnedAt"`
	SpawnCount    int64      `json:"spawnCount"`
	BuildCount    int        `json:"buildCount"`
	EnvdVersion   string     `json:"envdVersion"`
	BuildStatus   string     `json:"buildStatus"`
}

// templateWithBuilds is the TemplateWithBuilds schema.
type templateWithBuilds struct {
	TemplateID    string          `json:"templateID"`
	Public        bool            `json:"public"`
	Aliases       []string        `json:"aliases"`
	Names         []string        `json:"names"`
	CreatedAt     time.Time       `json:"createdAt"`
	UpdatedAt     time.Time       `json:"updatedAt"`
	LastSpawnedAt *time.Time      `json:"lastSpawnedAt"`
	SpawnCount    int64           `json:"spawnCount"`
	Builds        []templateBuild `json:"builds"`
}

// templateBuild is the TemplateBuild schema.
type templateBuild struct {
	BuildID     string     `json:"buildID"`
	Status      string     `json:"status"`
	CreatedAt   time.Time  `json:"createdAt"`
	UpdatedAt   time.Time  `json:"updatedAt"`
	FinishedAt  *time.Time `json:"finishedAt,omitempty"`
	CPUCount    int        `json:"cpuCount"`
	MemoryMB    int        `json:"memoryMB"`
	DiskSizeMB  int        `json:"diskSizeMB"`
	EnvdVersion string     `json:"envdVersion,omitempty"`
}

// templateTag is the TemplateTag schema.
type templateTag struct {
	Tag       string    `json:"tag"`
	BuildID   string    `json:"buildID"`
	CreatedAt time.Time `json:"createdAt"`
}

// aliasName is the alias and namespace syntax of REST.md §2.
var aliasName = regexp.MustCompile(`^[a-z0-9_-]+$`)

func templateNotFound(ref string) error {
	return &apiError{status: http.StatusNotFound, message: fmt.Sprintf("template '%s' not found", ref)}
}

func forbidden(format string, args ...any) error {
	return &apiError{status: http.StatusForbidden, message: fmt.Sprintf(format, args...)}
}

// findTemplate looks a template up by reference the way create does (REST.md
// §2, without the tag): "ns/alias" in that namespace only; a bare name as an
// alias of the caller's namespace, then a global alias, then a template ID.
// It does not check visibility; store.ErrNotFound when nothing matches.
func (s *server) findTemplate(ctx context.Context, team *store.Team, ref string) (*store.Template, error) {
	name, _, _ := strings.Cut(strings.ToLower(strings.TrimSpace(ref)), ":")
	id := ""
	a, err := s.lookupAlias(ctx, team, name)
	switch {
	case err == nil:
		id = a.TemplateID
	case errors.Is(err, store.ErrNotFound) && !strings.Contains(name, "/"):
		id = name
	default:
		return nil, err
	}
	return s.store.GetTemplate(ctx, id)
}

// lookupAlias finds "ns/alias" in ns, or a bare alias in the caller's
// namespace and then the global one.
func (s *server) lookupAlias(ctx context.Context, team *store.Team, name string) (*store.Alias, error) {
	if ns, alias, ok := strings.Cut(name, "/"); ok {
		return s.store.GetAlias(ctx, ns, alias)
	}
	a, err := s.store.GetAlias(ctx, team.Slug, name)
	if errors.Is(err, store.ErrNotFound) {
		return s.store.GetAlias(ctx, "", name)
	}
	return a, err
}

// templateFilter is the template ID a list's template=<ID or alias> means; an
// unknown name stays as given and matches nothing.
func (s *server) templateFilter(r *http.Request, team *store.Team, ref string) (string, error) {
	t, err := s.findTemplate(r.Context(), team, ref)
	if errors.Is(err, store.ErrNotFound) {
		return ref, nil
	}
	if err != nil {
		return "", err
	}
	return t.ID, nil
}

// checkTeamParam refuses a teamID query parameter naming another team.
func checkTeamParam(r *http.Request, team *store.Team) error {
	if id := r.URL.Query().Get("teamID"); id != "" && id != team.ID {
		return forbidden("The API key belongs to team %s, not to team %s", team.ID, id)
	}
	return nil
}

// templateNames returns a template's bare aliases and its full names
// ("namespace/alias" when namespaced).
func (s *server) templateNames(ctx context.Context, id string) (aliases, names []string, err error) {
	list, err := s.store.ListAliases(ctx, id)
	if err != nil {
		return nil, nil, fmt.Errorf("list aliases of template %s: %w", id, err)
	}
	aliases, names = []string{}, []string{}
	for _, a := range list {
		aliases = append(aliases, a.Alias)
		if a.Namespace != "" {
			names = append(names, a.Namespace+"/"+a.Alias)
		} else {
			names = append(names, a.Alias)
		}
	}
	return aliases, names, nil
}

// describeTemplate fills the Template schema: resources and buildID of the
// latest successful build (else the latest build), status of the latest.
func (s *server) describeTemplate(ctx context.Context, t *store.Template) (templateResponse, error) {
	out := templateResponse{
		TemplateID: t.ID, Public: t.Public, CreatedAt: t.CreatedAt.UTC(), UpdatedAt: t.UpdatedAt.UTC(),
		LastSpawnedAt: utcPtr(t.LastSpawnedAt), SpawnCount: t.SpawnCount,
	}
	var err error
	if out.Aliases, out.Names, err = s.templateNames(ctx, t.ID); err != nil {
		return out, err
	}
	builds, err := s.store.ListBuilds(ctx, t.ID)
	if err != nil {
		return out, fmt.Errorf("list builds of template %s: %w", t.ID, err)
	}
	out.BuildCount = len(builds)
	if len(builds) == 0 {
		out.BuildStatus = string(store.BuildWaiting)
		return out, nil
	}
	out.BuildStatus = string(builds[0].Status)
	b := builds[0]
	for _, cand := range builds {
		if cand.Status == store.BuildReady {
			b = cand
			break
		}
	}
	out.BuildID, out.CPUCount, out.MemoryMB, out.DiskSizeMB, out.EnvdVersion = b.ID, b.CPUCount, b.MemoryMB, b.DiskSizeMB, b.EnvdVersion
	return out, nil
}

func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

// teamTemplates returns the team's own templates, oldest first. Snapshots
// are left out: GET /snapshots lists them (a snapshot is a template for
// create, get and delete, not in template lists).
func (s *server) teamTemplates(ctx context.Context, team *store.Team) ([]*store.Template, error) {
	list, err := s.store.ListTemplates(ctx, team.ID, false)
	if err != nil {
		return nil, fmt.Errorf("list templates of team %s: %w", team.ID, err)
	}
	list = slices.DeleteFunc(list, func(t *store.Template) bool { return t.SourceSandboxID != "" })
	slices.SortFunc(list, func(a, b *store.Template) int {
		return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), strings.Compare(a.ID, b.ID))
	})
	return list, nil
}

// listTemplatesV1 is the deprecated unpaged list of the team's templates.
func (s *server) listTemplatesV1(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	if err := checkTeamParam(r, team); err != nil {
		return err
	}
	list, err := s.teamTemplates(r.Context(), team)
	if err != nil {
		return err
	}
	return s.writeTemplates(w, r, list)
}

// listTemplatesV2 pages the team's templates, oldest first.
func (s *server) listTemplatesV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	if err := checkTeamParam(r, team); err != nil {
		return err
	}
	q := r.URL.Query()
	limit, err := pageLimit(q)
	if err != nil {
		return err
	}
	c, err := decodeCursor(q.Get("nextToken"))
	if err != nil {
		return err
	}
	list, err := s.teamTemplates(r.Context(), team)
	if err != nil {
		return err
	}
	if c != nil {
		list = slices.DeleteFunc(list, func(t *store.Template) bool {
			return cmp.Or(t.CreatedAt.Compare(c.at), strings.Compare(t.ID, c.id)) <= 0
		})
	}
	if len(list) > limit {
		list = list[:limit]
		last := list[limit-1]
		w.Header().Set("X-Next-Token", encodeCursor(last.CreatedAt, last.ID))
	}
	return s.writeTemplates(w, r, list)
}

func (s *server) writeTemplates(w http.ResponseWriter, r *http.Request, list []*store.Template) error {
	out := make([]templateResponse, 0, len(list))
	for _, t := range list {
		d, err := s.describeTemplate(r.Context(), t)
		if err != nil {
			return err
		}
		out = append(out, d)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// ownTemplate finds a template of the caller's team by ID or name; other
// teams' templates are not found.
func (s *server) ownTemplate(ctx context.Context, team *store.Team, ref string) (*store.Template, error) {
	t, err := s.findTemplate(ctx, team, ref)
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.TeamID != team.ID) {
		return nil, templateNotFound(ref)
	}
	return t, err
}

// getTemplate returns a template of the team with its builds, newest first,
// paged by nextToken/limit.
func (s *server) getTemplate(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	limit, err := pageLimit(q)
	if err != nil {
		return err
	}
	c, err := decodeCursor(q.Get("nextToken"))
	if err != nil {
		return err
	}
	ctx := r.Context()
	t, err := s.ownTemplate(ctx, team, r.PathValue("templateID"))
	if err != nil {
		return err
	}
	out := templateWithBuilds{
		TemplateID: t.ID, Public: t.Public, CreatedAt: t.CreatedAt.UTC(), UpdatedAt: t.UpdatedAt.UTC(),
		LastSpawnedAt: utcPtr(t.LastSpawnedAt), SpawnCount: t.SpawnCount, Builds: []templateBuild{},
	}
	if out.Aliases, out.Names, err = s.templateNames(ctx, t.ID); err != nil {
		return err
	}
	builds, err := s.store.ListBuilds(ctx, t.ID)
	if err != nil {
		return fmt.Errorf("list builds of template %s: %w", t.ID, err)
	}
	newestFirst := func(a, b *store.Build) int {
		return cmp.Or(b.CreatedAt.Compare(a.CreatedAt), strings.Compare(b.ID, a.ID))
	}
	slices.SortFunc(builds, newestFirst)
	if c != nil {
		builds = slices.DeleteFunc(builds, func(b *store.Build) bool {
			return newestFirst(b, &store.Build{CreatedAt: c.at, ID: c.id}) <= 0
		})
	}
	if len(builds) > limit {
		builds = builds[:limit]
		last := builds[limit-1]
		w.Header().Set("X-Next-Token", encodeCursor(last.CreatedAt, last.ID))
	}
	for _, b := range builds {
		out.Builds = append(out.Builds, templateBuild{
			BuildID: b.ID, Status: string(b.Status), CreatedAt: b.CreatedAt.UTC(), UpdatedAt: b.UpdatedAt.UTC(),
			FinishedAt: utcPtr(b.FinishedAt), CPUCount: b.CPUCount, MemoryMB: b.MemoryMB,
			DiskSizeMB: b.DiskSizeMB, EnvdVersion: b.EnvdVersion,
		})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// templateByAlias answers Template.exists: 200 for the caller's and public
// templates, 403 for another team's private one (the SDK reads 403 as "the
// name is taken"), 404 when no template has the name.
func (s *server) templateByAlias(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	ref := r.PathValue("alias")
	name := strings.ToLower(strings.TrimSpace(ref))
	ns, alias, namespaced := strings.Cut(name, "/")
	if !namespaced {
		ns, alias = "", name
	}
	if !aliasName.MatchString(alias) || (namespaced && !aliasName.MatchString(ns)) {
		return badRequest("Invalid template alias %q: want [namespace/]alias of lower-case letters, digits, '-' and '_'", ref)
	}
	ctx := r.Context()
	a, err := s.lookupAlias(ctx, team, name)
	if errors.Is(err, store.ErrNotFound) {
		return templateNotFound(ref)
	}
	if err != nil {
		return err
	}
	t, err := s.store.GetTemplate(ctx, a.TemplateID)
	if errors.Is(err, store.ErrNotFound) {
		return templateNotFound(ref)
	}
	if err != nil {
		return err
	}
	if t.TeamID != team.ID && !t.Public {
		return forbidden("Template '%s' belongs to another team", ref)
	}
	writeJSON(w, http.StatusOK, struct {
		TemplateID string `json:"templateID"`
		Public     bool   `json:"public"`
	}{t.ID, t.Public})
	return nil
}

// templateTags lists a template's tags: the caller's templates only; another
// team's public template is 403, a private one 404.
func (s *server) templateTags(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	if r.PathValue("sub") != "tags" {
		return &apiError{status: http.StatusNotFound, message: "Not found: " + r.Method + " " + r.URL.Path}
	}
	ctx := r.Context()
	ref := r.PathValue("templateID")
	t, err := s.findTemplate(ctx, team, ref)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return templateNotFound(ref)
	case err != nil:
		return err
	case t.TeamID != team.ID && t.Public:
		return forbidden("Template '%s' belongs to another team", ref)
	case t.TeamID != team.ID:
		return templateNotFound(ref)
	}
	tags, err := s.store.ListTags(ctx, t.ID)
	if err != nil {
		return fmt.Errorf("list tags of template %s: %w", t.ID, err)
	}
	out := make([]templateTag, 0, len(tags))
	for _, tg := range tags {
		out = append(out, templateTag{Tag: tg.Tag, BuildID: tg.BuildID, CreatedAt: tg.CreatedAt.UTC()})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}
