// Package storetest is the conformance suite every store.Store passes: the
// same behaviour, case by case, on SQLite and on Postgres.
//
// A backend's test calls Run with a function that opens a fresh, empty store
// for one test (and registers its cleanup); its benchmark calls
// BenchmarkListSandboxes1000 with one fresh store.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/warren-sh/warren/internal/store"
)

// Open returns a fresh, empty store for t, closed when t ends.
type Open func(t *testing.T) store.Store

// Run runs every conformance test against stores from open.
func Run(t *testing.T, open Open) {
	tests := []struct {
		name string
		run  func(*testing.T, store.Store)
	}{
		{"Teams", testTeams},
		{"APIKeys", testAPIKeys},
		{"Templates", testTemplates},
		{"RecordSpawnConcurrent", testRecordSpawnConcurrent},
		{"Aliases", testAliases},
		{"Builds", testBuilds},
		{"BuildsByStatus", testBuildsByStatus},
		{"Tags", testTags},
		{"DeleteTemplateCascades", testDeleteTemplateCascades},
		{"DeleteBuild", testDeleteBuild},
		{"Sandboxes", testSandboxes},
		{"SandboxMaps", testSandboxMaps},
		{"Times", testTimes},
		{"UpdateSandbox", testUpdateSandbox},
		{"UpdateSandboxConcurrent", testUpdateSandboxConcurrent},
		{"ListSandboxesFilters", testListFilters},
		{"ListSandboxesMetadataCharacters", testListMetadataCharacters},
		{"ListSandboxesPaging", testListPaging},
		{"PausedSandbox", testPausedSandbox},
		{"Snapshots", testSnapshots},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, open(t))
		})
	}
}

// t0 is the suite's reference time: not UTC and not on a microsecond, so
// every comparison also checks rounding and the zone.
var t0 = time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.FixedZone("UTC+2", 2*3600))

// us is t as a store keeps it.
func us(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

func ptr[T any](v T) *T { return &v }

// wantErr fails t unless err is (or wraps) want; want nil means no error.
func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Fatalf("%s: unexpected error %v", what, err)
	case want != nil && !errors.Is(err, want):
		t.Fatalf("%s: error %v, want %v", what, err, want)
	}
}

// must fails t on err.
func must(t *testing.T, what string, err error) {
	t.Helper()
	wantErr(t, what, err, nil)
}

// same fails t when got and want differ.
func same(t *testing.T, what string, got, want any) {
	t.Helper()
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("%s mismatch (-want +got):\n%s", what, d)
	}
}

func newTeam(t *testing.T, s store.Store, id string) *store.Team {
	t.Helper()
	team := &store.Team{ID: id, Name: "Team " + id, Slug: "slug-" + id, MaxSandboxes: 20,
		MaxLifetime: time.Hour + 1500*time.Millisecond, CreatedAt: t0}
	must(t, "create team "+id, s.CreateTeam(context.Background(), team))
	return team
}

func newTemplate(t *testing.T, s store.Store, id, teamID string) *store.Template {
	t.Helper()
	tpl := &store.Template{ID: id, TeamID: teamID, CreatedAt: t0, UpdatedAt: t0}
	must(t, "create template "+id, s.CreateTemplate(context.Background(), tpl))
	return tpl
}

func newBuild(t *testing.T, s store.Store, id, templateID string, at time.Time) *store.Build {
	t.Helper()
	b := &store.Build{ID: id, TemplateID: templateID, Status: store.BuildWaiting, CPUCount: 2, MemoryMB: 512,
		DiskSizeMB: 1024, EnvdVersion: "0.6.4", CreatedAt: at, UpdatedAt: at}
	must(t, "create build "+id, s.CreateBuild(context.Background(), b))
	return b
}

func newSandbox(id, teamID string) *store.Sandbox {
	return &store.Sandbox{
		ID: id, TeamID: teamID, TemplateID: "tpl1", BuildID: "b1", Alias: "base", NodeID: "n1",
		State: store.StateRunning, Metadata: map[string]string{"k": "v"}, EnvVars: map[string]string{"A": "1"},
		CPUCount: 2, MemoryMB: 512, DiskSizeMB: 1024, EnvdVersion: "0.6.4", EnvdAccessToken: "token-" + id,
		AllowInternet: true, AutoPause: true, AutoPauseMemory: true, AutoResume: false,
		Timeout: 5*time.Minute + 1500*time.Millisecond, StartedAt: t0, EndAt: t0.Add(5 * time.Minute),
	}
}

func testTeams(t *testing.T, s store.Store) {
	ctx := context.Background()
	a := newTeam(t, s, "team-a")
	same(t, "normalized CreatedAt", a.CreatedAt, us(t0))

	got, err := s.GetTeam(ctx, "team-a")
	must(t, "get team", err)
	same(t, "team", got, a)

	_, err = s.GetTeam(ctx, "nope")
	wantErr(t, "get missing team", err, store.ErrNotFound)

	dupID := &store.Team{ID: "team-a", Name: "x", Slug: "other", CreatedAt: t0}
	wantErr(t, "create team with taken ID", s.CreateTeam(ctx, dupID), store.ErrConflict)
	dupSlug := &store.Team{ID: "team-x", Name: "x", Slug: a.Slug, CreatedAt: t0}
	wantErr(t, "create team with taken slug", s.CreateTeam(ctx, dupSlug), store.ErrConflict)

	b := &store.Team{ID: "team-b", Name: "B", Slug: "b", CreatedAt: t0.Add(time.Second)}
	must(t, "create team b", s.CreateTeam(ctx, b))
	teams, err := s.ListTeams(ctx)
	must(t, "list teams", err)
	same(t, "teams, oldest first", teams, []*store.Team{a, b})

	must(t, "update limits", s.UpdateTeamLimits(ctx, "team-b", 7, 90*time.Minute))
	got, err = s.GetTeam(ctx, "team-b")
	must(t, "get team b", err)
	b.MaxSandboxes, b.MaxLifetime = 7, 90*time.Minute
	same(t, "team b after UpdateTeamLimits", got, b)
	wantErr(t, "update limits of a missing team", s.UpdateTeamLimits(ctx, "nope", 1, time.Hour), store.ErrNotFound)
}

func testAPIKeys(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	k1 := &store.APIKey{ID: "k1", TeamID: "a", Name: "default", Hash: "hash1", Mask: "e2b_12...ab", CreatedAt: t0}
	k2 := &store.APIKey{ID: "k2", TeamID: "a", Name: "ci", Hash: "hash2", Mask: "e2b_34...cd", CreatedAt: t0.Add(time.Second)}
	k3 := &store.APIKey{ID: "k3", TeamID: "b", Name: "other", Hash: "hash3", Mask: "e2b_56...ef", CreatedAt: t0}
	for _, k := range []*store.APIKey{k2, k1, k3} {
		must(t, "create key "+k.ID, s.CreateAPIKey(ctx, k))
	}

	got, err := s.APIKeyByHash(ctx, "hash1")
	must(t, "key by hash", err)
	same(t, "key", got, k1)
	if got.LastUsedAt != nil {
		t.Fatalf("new key LastUsedAt = %v, want nil", got.LastUsedAt)
	}
	_, err = s.APIKeyByHash(ctx, "nope")
	wantErr(t, "key by unknown hash", err, store.ErrNotFound)

	for _, tc := range []struct {
		name string
		key  *store.APIKey
		want error
	}{
		{"taken ID", &store.APIKey{ID: "k1", TeamID: "a", Hash: "fresh", CreatedAt: t0}, store.ErrConflict},
		{"taken hash", &store.APIKey{ID: "k9", TeamID: "a", Hash: "hash2", CreatedAt: t0}, store.ErrConflict},
		{"unknown team", &store.APIKey{ID: "k9", TeamID: "nope", Hash: "fresh", CreatedAt: t0}, store.ErrNotFound},
	} {
		wantErr(t, "create key with "+tc.name, s.CreateAPIKey(ctx, tc.key), tc.want)
	}

	keys, err := s.ListAPIKeys(ctx, "a")
	must(t, "list keys", err)
	same(t, "team a's keys, oldest first", keys, []*store.APIKey{k1, k2})

	used := t0.Add(time.Minute + 123456789*time.Nanosecond)
	must(t, "touch key", s.TouchAPIKey(ctx, "k1", used))
	got, err = s.APIKeyByHash(ctx, "hash1")
	must(t, "key by hash after touch", err)
	same(t, "LastUsedAt", got.LastUsedAt, ptr(us(used)))
	wantErr(t, "touch missing key", s.TouchAPIKey(ctx, "nope", used), store.ErrNotFound)

	wantErr(t, "delete another team's key", s.DeleteAPIKey(ctx, "b", "k1"), store.ErrNotFound)
	must(t, "delete key", s.DeleteAPIKey(ctx, "a", "k1"))
	wantErr(t, "delete deleted key", s.DeleteAPIKey(ctx, "a", "k1"), store.ErrNotFound)
	_, err = s.APIKeyByHash(ctx, "hash1")
	wantErr(t, "key by hash after delete", err, store.ErrNotFound)
	keys, err = s.ListAPIKeys(ctx, "a")
	must(t, "list keys after delete", err)
	same(t, "team a's keys after delete", keys, []*store.APIKey{k2})
}

func testTemplates(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	mine := newTemplate(t, s, "t-mine", "a")
	theirsPrivate := newTemplate(t, s, "t-private", "b")
	theirsPublic := &store.Template{ID: "t-public", TeamID: "b", Public: true,
		CreatedAt: t0.Add(time.Second), UpdatedAt: t0.Add(time.Second)}
	must(t, "create public template", s.CreateTemplate(ctx, theirsPublic))

	got, err := s.GetTemplate(ctx, "t-mine")
	must(t, "get template", err)
	same(t, "template", got, mine)
	_, err = s.GetTemplate(ctx, "nope")
	wantErr(t, "get missing template", err, store.ErrNotFound)
	wantErr(t, "create template with taken ID", s.CreateTemplate(ctx,
		&store.Template{ID: "t-mine", TeamID: "a", CreatedAt: t0, UpdatedAt: t0}), store.ErrConflict)
	wantErr(t, "create template of unknown team", s.CreateTemplate(ctx,
		&store.Template{ID: "t-new", TeamID: "nope", CreatedAt: t0, UpdatedAt: t0}), store.ErrNotFound)

	for _, tc := range []struct {
		team   string
		public bool
		want   []*store.Template
	}{
		{"a", false, []*store.Template{mine}},
		{"a", true, []*store.Template{mine, theirsPublic}},
		{"b", false, []*store.Template{theirsPrivate, theirsPublic}},
		{"b", true, []*store.Template{theirsPrivate, theirsPublic}},
		{"nobody", true, []*store.Template{theirsPublic}},
	} {
		list, err := s.ListTemplates(ctx, tc.team, tc.public)
		must(t, "list templates", err)
		same(t, fmt.Sprintf("templates of %s (public %v)", tc.team, tc.public), list, tc.want)
	}

	// UpdateTemplate writes Public and UpdatedAt, never the spawn fields
	// (RecordSpawn's) or the owner.
	must(t, "record spawn", s.RecordSpawn(ctx, "t-mine", t0.Add(time.Hour)))
	upd := *mine
	upd.Public = true
	upd.UpdatedAt = t0.Add(2 * time.Hour)
	upd.SpawnCount = 99
	upd.TeamID = "b"
	must(t, "update template", s.UpdateTemplate(ctx, &upd))
	got, err = s.GetTemplate(ctx, "t-mine")
	must(t, "get updated template", err)
	want := *mine
	want.Public = true
	want.UpdatedAt = us(t0.Add(2 * time.Hour))
	want.SpawnCount = 1
	want.LastSpawnedAt = ptr(us(t0.Add(time.Hour)))
	same(t, "updated template", got, &want)

	wantErr(t, "update missing template", s.UpdateTemplate(ctx, &store.Template{ID: "nope"}), store.ErrNotFound)
	wantErr(t, "record spawn of missing template", s.RecordSpawn(ctx, "nope", t0), store.ErrNotFound)
	wantErr(t, "delete missing template", s.DeleteTemplate(ctx, "nope"), store.ErrNotFound)
	must(t, "delete template", s.DeleteTemplate(ctx, "t-private"))
	_, err = s.GetTemplate(ctx, "t-private")
	wantErr(t, "get deleted template", err, store.ErrNotFound)
}

func testRecordSpawnConcurrent(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "tpl", "a")
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() { errs <- s.RecordSpawn(ctx, "tpl", t0.Add(time.Duration(i)*time.Second)) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must(t, "record spawn", err)
	}
	got, err := s.GetTemplate(ctx, "tpl")
	must(t, "get template", err)
	if got.SpawnCount != n {
		t.Fatalf("SpawnCount = %d after %d concurrent spawns", got.SpawnCount, n)
	}
}

func testAliases(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "t1", "a")
	newTemplate(t, s, "t2", "a")

	global := &store.Alias{Namespace: "", Alias: "base", TemplateID: "t1"}
	scoped := &store.Alias{Namespace: "team-a", Alias: "base", TemplateID: "t2"}
	second := &store.Alias{Namespace: "team-a", Alias: "another", TemplateID: "t1"}
	for _, a := range []*store.Alias{global, scoped, second} {
		must(t, "set alias "+a.Namespace+"/"+a.Alias, s.SetAlias(ctx, a))
	}
	must(t, "set alias again for the same template", s.SetAlias(ctx, global))
	wantErr(t, "set alias held by another template",
		s.SetAlias(ctx, &store.Alias{Namespace: "", Alias: "base", TemplateID: "t2"}), store.ErrConflict)
	wantErr(t, "set alias to unknown template",
		s.SetAlias(ctx, &store.Alias{Namespace: "team-a", Alias: "new", TemplateID: "nope"}), store.ErrNotFound)

	for _, want := range []*store.Alias{global, scoped} {
		got, err := s.GetAlias(ctx, want.Namespace, want.Alias)
		must(t, "get alias", err)
		same(t, "alias "+want.Namespace+"/"+want.Alias, got, want)
	}
	_, err := s.GetAlias(ctx, "other", "base")
	wantErr(t, "get alias in another namespace", err, store.ErrNotFound)

	list, err := s.ListAliases(ctx, "t1")
	must(t, "list aliases", err)
	same(t, "aliases of t1", list, []*store.Alias{global, second})

	must(t, "delete alias", s.DeleteAlias(ctx, "", "base"))
	wantErr(t, "delete deleted alias", s.DeleteAlias(ctx, "", "base"), store.ErrNotFound)
	_, err = s.GetAlias(ctx, "", "base")
	wantErr(t, "get deleted alias", err, store.ErrNotFound)
	must(t, "the freed alias goes to another template",
		s.SetAlias(ctx, &store.Alias{Namespace: "", Alias: "base", TemplateID: "t2"}))
}

func testBuilds(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "t1", "a")
	newTemplate(t, s, "t2", "a")
	old := newBuild(t, s, "b-old", "t1", t0)
	recent := newBuild(t, s, "b-new", "t1", t0.Add(time.Minute))
	newBuild(t, s, "b-other", "t2", t0)

	got, err := s.GetBuild(ctx, "b-old")
	must(t, "get build", err)
	same(t, "build", got, old)
	_, err = s.GetBuild(ctx, "nope")
	wantErr(t, "get missing build", err, store.ErrNotFound)
	wantErr(t, "create build with taken ID",
		s.CreateBuild(ctx, &store.Build{ID: "b-old", TemplateID: "t1", Status: store.BuildWaiting}), store.ErrConflict)
	wantErr(t, "create build of unknown template",
		s.CreateBuild(ctx, &store.Build{ID: "b-x", TemplateID: "nope", Status: store.BuildWaiting}), store.ErrNotFound)

	list, err := s.ListBuilds(ctx, "t1")
	must(t, "list builds", err)
	same(t, "builds of t1, newest first", list, []*store.Build{recent, old})

	done := *old
	done.Status = store.BuildReady
	done.Artifact = "builds/b-old"
	done.EnvdVersion = "0.7.0"
	done.CPUCount = 4
	done.UpdatedAt = t0.Add(time.Hour)
	done.FinishedAt = ptr(t0.Add(time.Hour))
	done.TemplateID = "t2" // ignored
	must(t, "update build", s.UpdateBuild(ctx, &done))
	got, err = s.GetBuild(ctx, "b-old")
	must(t, "get updated build", err)
	done.TemplateID = "t1"
	same(t, "updated build", got, &done)

	failed := *recent
	failed.Status = store.BuildError
	failed.Reason = "step 3: exit status 1"
	failed.ReasonStep = "3"
	failed.Spec = `{"steps":[{"type":"RUN","args":["false"]}]}`
	must(t, "update build to error", s.UpdateBuild(ctx, &failed))
	got, err = s.GetBuild(ctx, "b-new")
	must(t, "get failed build", err)
	same(t, "failed build", got, &failed)

	wantErr(t, "update missing build", s.UpdateBuild(ctx, &store.Build{ID: "nope", Status: store.BuildReady}),
		store.ErrNotFound)
}

func testBuildsByStatus(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "t1", "a")
	newTemplate(t, s, "t2", "a")
	waiting := newBuild(t, s, "b-waiting", "t2", t0.Add(time.Second))
	building := newBuild(t, s, "b-building", "t1", t0.Add(2*time.Second))
	building.Status = store.BuildBuilding
	building.Spec = `{"fromTemplate":"base"}`
	must(t, "update build", s.UpdateBuild(ctx, building))
	ready := newBuild(t, s, "b-ready", "t1", t0)
	ready.Status = store.BuildReady
	must(t, "update build", s.UpdateBuild(ctx, ready))

	list, err := s.ListBuildsByStatus(ctx, store.BuildWaiting, store.BuildBuilding)
	must(t, "list unfinished builds", err)
	same(t, "unfinished builds, oldest first", list, []*store.Build{waiting, building})
	list, err = s.ListBuildsByStatus(ctx, store.BuildReady)
	must(t, "list ready builds", err)
	same(t, "ready builds", list, []*store.Build{ready})
	list, err = s.ListBuildsByStatus(ctx, store.BuildError)
	must(t, "list failed builds", err)
	same(t, "failed builds", len(list), 0)
}

func testTags(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "t1", "a")
	newTemplate(t, s, "t2", "a")
	newBuild(t, s, "b1", "t1", t0)
	newBuild(t, s, "b2", "t1", t0.Add(time.Second))
	newBuild(t, s, "b-t2", "t2", t0)

	def := &store.Tag{TemplateID: "t1", Tag: "default", BuildID: "b1", CreatedAt: t0}
	v1 := &store.Tag{TemplateID: "t1", Tag: "v1.0", BuildID: "b1", CreatedAt: t0}
	must(t, "set tag", s.SetTag(ctx, def))
	must(t, "set tag", s.SetTag(ctx, v1))
	got, err := s.GetTag(ctx, "t1", "default")
	must(t, "get tag", err)
	same(t, "tag", got, def)

	// Pointing a tag again replaces its target and time.
	moved := &store.Tag{TemplateID: "t1", Tag: "default", BuildID: "b2", CreatedAt: t0.Add(time.Minute)}
	must(t, "move tag", s.SetTag(ctx, moved))
	got, err = s.GetTag(ctx, "t1", "default")
	must(t, "get moved tag", err)
	same(t, "moved tag", got, moved)

	wantErr(t, "tag a build of another template",
		s.SetTag(ctx, &store.Tag{TemplateID: "t1", Tag: "x", BuildID: "b-t2", CreatedAt: t0}), store.ErrNotFound)
	wantErr(t, "tag an unknown build",
		s.SetTag(ctx, &store.Tag{TemplateID: "t1", Tag: "x", BuildID: "nope", CreatedAt: t0}), store.ErrNotFound)
	wantErr(t, "tag on an unknown template",
		s.SetTag(ctx, &store.Tag{TemplateID: "nope", Tag: "x", BuildID: "b1", CreatedAt: t0}), store.ErrNotFound)
	_, err = s.GetTag(ctx, "t1", "x")
	wantErr(t, "get missing tag", err, store.ErrNotFound)

	list, err := s.ListTags(ctx, "t1")
	must(t, "list tags", err)
	same(t, "tags of t1 by name", list, []*store.Tag{moved, v1})

	must(t, "delete tag", s.DeleteTag(ctx, "t1", "v1.0"))
	wantErr(t, "delete deleted tag", s.DeleteTag(ctx, "t1", "v1.0"), store.ErrNotFound)
	list, err = s.ListTags(ctx, "t1")
	must(t, "list tags after delete", err)
	same(t, "tags of t1 after delete", list, []*store.Tag{moved})
}

func testDeleteTemplateCascades(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	for _, id := range []string{"doomed", "kept"} {
		newTemplate(t, s, id, "a")
		newBuild(t, s, "build-"+id, id, t0)
		must(t, "set alias", s.SetAlias(ctx, &store.Alias{Namespace: "a", Alias: "alias-" + id, TemplateID: id}))
		must(t, "set tag", s.SetTag(ctx, &store.Tag{TemplateID: id, Tag: "default", BuildID: "build-" + id, CreatedAt: t0}))
	}
	// A sandbox started from the template keeps its row.
	sb := newSandbox("sb", "a")
	sb.TemplateID, sb.BuildID = "doomed", "build-doomed"
	must(t, "insert sandbox", s.InsertSandbox(ctx, sb))

	must(t, "delete template", s.DeleteTemplate(ctx, "doomed"))

	_, err := s.GetAlias(ctx, "a", "alias-doomed")
	wantErr(t, "alias of deleted template", err, store.ErrNotFound)
	_, err = s.GetBuild(ctx, "build-doomed")
	wantErr(t, "build of deleted template", err, store.ErrNotFound)
	_, err = s.GetTag(ctx, "doomed", "default")
	wantErr(t, "tag of deleted template", err, store.ErrNotFound)
	aliases, err := s.ListAliases(ctx, "doomed")
	must(t, "list aliases", err)
	builds, err := s.ListBuilds(ctx, "doomed")
	must(t, "list builds", err)
	tags, err := s.ListTags(ctx, "doomed")
	must(t, "list tags", err)
	if len(aliases)+len(builds)+len(tags) != 0 {
		t.Fatalf("deleted template left %d aliases, %d builds, %d tags", len(aliases), len(builds), len(tags))
	}
	if _, err := s.GetSandbox(ctx, "sb"); err != nil {
		t.Fatalf("sandbox of deleted template: %v", err)
	}

	_, err = s.GetAlias(ctx, "a", "alias-kept")
	must(t, "other template's alias", err)
	_, err = s.GetBuild(ctx, "build-kept")
	must(t, "other template's build", err)
	_, err = s.GetTag(ctx, "kept", "default")
	must(t, "other template's tag", err)
}

// testDeleteBuild drops one build of a template (a superseded base build):
// its tags go, the template, its other builds and tags stay, and so do the
// sandboxes started from it.
func testDeleteBuild(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTemplate(t, s, "t1", "a")
	newBuild(t, s, "b-old", "t1", t0)
	current := newBuild(t, s, "b-new", "t1", t0.Add(time.Minute))
	must(t, "set tag", s.SetTag(ctx, &store.Tag{TemplateID: "t1", Tag: "pinned", BuildID: "b-old", CreatedAt: t0}))
	def := &store.Tag{TemplateID: "t1", Tag: "default", BuildID: "b-new", CreatedAt: t0}
	must(t, "set tag", s.SetTag(ctx, def))
	sb := newSandbox("sb", "a")
	sb.TemplateID, sb.BuildID = "t1", "b-old"
	must(t, "insert sandbox", s.InsertSandbox(ctx, sb))

	must(t, "delete build", s.DeleteBuild(ctx, "b-old"))
	wantErr(t, "delete deleted build", s.DeleteBuild(ctx, "b-old"), store.ErrNotFound)
	_, err := s.GetBuild(ctx, "b-old")
	wantErr(t, "get deleted build", err, store.ErrNotFound)
	_, err = s.GetTag(ctx, "t1", "pinned")
	wantErr(t, "tag of the deleted build", err, store.ErrNotFound)
	builds, err := s.ListBuilds(ctx, "t1")
	must(t, "list builds", err)
	same(t, "builds left", builds, []*store.Build{current})
	tags, err := s.ListTags(ctx, "t1")
	must(t, "list tags", err)
	same(t, "tags left", tags, []*store.Tag{def})
	if _, err := s.GetTemplate(ctx, "t1"); err != nil {
		t.Fatalf("template of the deleted build: %v", err)
	}
	if got, err := s.GetSandbox(ctx, "sb"); err != nil || got.BuildID != "b-old" {
		t.Fatalf("sandbox of the deleted build: %+v, %v", got, err)
	}
}

func testSandboxes(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	sb := newSandbox("i0123456789abcdefghij", "a")
	must(t, "insert sandbox", s.InsertSandbox(ctx, sb))

	got, err := s.GetSandbox(ctx, sb.ID)
	must(t, "get sandbox", err)
	same(t, "sandbox", got, sb)

	wantErr(t, "insert sandbox with taken ID", s.InsertSandbox(ctx, newSandbox(sb.ID, "a")), store.ErrConflict)
	wantErr(t, "insert sandbox of unknown team", s.InsertSandbox(ctx, newSandbox("other", "nope")), store.ErrNotFound)
	_, err = s.GetSandbox(ctx, "nope")
	wantErr(t, "get missing sandbox", err, store.ErrNotFound)

	must(t, "delete sandbox", s.DeleteSandbox(ctx, sb.ID))
	wantErr(t, "delete deleted sandbox", s.DeleteSandbox(ctx, sb.ID), store.ErrNotFound)
	_, err = s.GetSandbox(ctx, sb.ID)
	wantErr(t, "get deleted sandbox", err, store.ErrNotFound)
}

func testSandboxMaps(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	for _, tc := range []struct {
		name string
		in   map[string]string
		want map[string]string
	}{
		{"nil comes back empty", nil, map[string]string{}},
		{"empty", map[string]string{}, map[string]string{}},
		{"special characters", map[string]string{
			"a=b&c":       "x=1&y=2",
			`say "hi"`:    `it's "quoted"`,
			"ünïcødé ✓ 🚀": "日本語",
			`back\slash`:  `C:\path`,
			"dots.and[0]": "$.not.a.path",
			"html <&>":    "<b>&amp;</b>",
			"line\nbreak": "tab\there",
			"":            "empty key",
			"empty value": "",
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.want
			if want == nil {
				want = tc.in
			}
			sb := newSandbox("sb-"+tc.name, "a")
			sb.Metadata, sb.EnvVars = tc.in, tc.in
			must(t, "insert sandbox", s.InsertSandbox(ctx, sb))
			same(t, "Metadata written back", sb.Metadata, want)
			got, err := s.GetSandbox(ctx, sb.ID)
			must(t, "get sandbox", err)
			same(t, "Metadata", got.Metadata, want)
			same(t, "EnvVars", got.EnvVars, want)
			if got.Metadata == nil || got.EnvVars == nil {
				t.Fatalf("maps come back nil: Metadata %#v, EnvVars %#v", got.Metadata, got.EnvVars)
			}
		})
	}
}

func testTimes(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	for _, tc := range []struct {
		name string
		in   time.Time
	}{
		{"nanoseconds in another zone", t0},
		{"microseconds", time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)},
		{"whole seconds", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)},
		{"one microsecond", time.Date(2026, 1, 2, 3, 4, 5, 1000, time.Local)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb := newSandbox("sb-"+tc.name, "a")
			sb.StartedAt, sb.EndAt = tc.in, tc.in.Add(time.Millisecond)
			must(t, "insert sandbox", s.InsertSandbox(ctx, sb))
			got, err := s.GetSandbox(ctx, sb.ID)
			must(t, "get sandbox", err)
			want := tc.in.UTC().Truncate(time.Microsecond)
			if !got.StartedAt.Equal(want) || !got.EndAt.Equal(want.Add(time.Millisecond)) {
				t.Fatalf("StartedAt, EndAt = %v, %v, want %v, %v", got.StartedAt, got.EndAt, want, want.Add(time.Millisecond))
			}
			if got.StartedAt.Location() != time.UTC || got.EndAt.Location() != time.UTC {
				t.Fatalf("times come back in %v and %v, want UTC", got.StartedAt.Location(), got.EndAt.Location())
			}
			if !sb.StartedAt.Equal(want) || sb.StartedAt.Location() != time.UTC {
				t.Fatalf("InsertSandbox left StartedAt %v in its argument, want %v", sb.StartedAt, want)
			}
		})
	}
}

func testUpdateSandbox(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	sb := newSandbox("sb", "a")
	must(t, "insert sandbox", s.InsertSandbox(ctx, sb))

	t.Run("writes what fn leaves", func(t *testing.T) {
		end := t0.Add(time.Hour + 250*time.Microsecond)
		got, err := s.UpdateSandbox(ctx, "sb", func(x *store.Sandbox) error {
			x.State = store.StatePaused
			x.EndAt = end
			x.NodeID = "n2"
			x.Metadata["added"] = "yes"
			x.EnvVars = nil
			x.ID = "renamed" // ignored: the ID is the row's
			return nil
		})
		must(t, "update sandbox", err)
		want := *sb
		want.State, want.EndAt, want.NodeID = store.StatePaused, us(end), "n2"
		want.Metadata = map[string]string{"k": "v", "added": "yes"}
		want.EnvVars = map[string]string{}
		same(t, "returned sandbox", got, &want)
		stored, err := s.GetSandbox(ctx, "sb")
		must(t, "get sandbox", err)
		same(t, "stored sandbox", stored, &want)
		_, err = s.GetSandbox(ctx, "renamed")
		wantErr(t, "get by the ID fn set", err, store.ErrNotFound)
	})

	t.Run("fn error aborts", func(t *testing.T) {
		before, err := s.GetSandbox(ctx, "sb")
		must(t, "get sandbox", err)
		errVeto := errors.New("veto")
		_, err = s.UpdateSandbox(ctx, "sb", func(x *store.Sandbox) error {
			x.State = store.StateKilling
			x.Metadata["vetoed"] = "yes"
			return errVeto
		})
		if err != errVeto {
			t.Fatalf("UpdateSandbox returned %v, want fn's error as is", err)
		}
		after, err := s.GetSandbox(ctx, "sb")
		must(t, "get sandbox", err)
		same(t, "sandbox after aborted update", after, before)
	})

	t.Run("missing sandbox", func(t *testing.T) {
		called := false
		_, err := s.UpdateSandbox(ctx, "nope", func(*store.Sandbox) error { called = true; return nil })
		wantErr(t, "update missing sandbox", err, store.ErrNotFound)
		if called {
			t.Fatal("fn ran for a missing sandbox")
		}
	})

	t.Run("unknown team", func(t *testing.T) {
		_, err := s.UpdateSandbox(ctx, "sb", func(x *store.Sandbox) error { x.TeamID = "nope"; return nil })
		wantErr(t, "move sandbox to unknown team", err, store.ErrNotFound)
		got, err := s.GetSandbox(ctx, "sb")
		must(t, "get sandbox", err)
		same(t, "TeamID", got.TeamID, "a")
	})

	t.Run("usable after an error", func(t *testing.T) {
		got, err := s.UpdateSandbox(ctx, "sb", func(x *store.Sandbox) error { x.TeamID = "b"; return nil })
		must(t, "update sandbox", err)
		same(t, "TeamID", got.TeamID, "b")
	})
}

func testUpdateSandboxConcurrent(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	sb := newSandbox("sb", "a")
	must(t, "insert sandbox", s.InsertSandbox(ctx, sb))

	// Each update reads the row, then adds a key and a second: any update
	// that ran on a stale row would lose another's key and second.
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			_, err := s.UpdateSandbox(ctx, "sb", func(x *store.Sandbox) error {
				x.Metadata[fmt.Sprintf("w%02d", i)] = "done"
				x.EndAt = x.EndAt.Add(time.Second)
				return nil
			})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must(t, "concurrent update", err)
	}
	got, err := s.GetSandbox(ctx, "sb")
	must(t, "get sandbox", err)
	if len(got.Metadata) != n+1 {
		t.Fatalf("%d metadata keys after %d concurrent updates, want %d: %v", len(got.Metadata), n, n+1, got.Metadata)
	}
	if want := sb.EndAt.Add(n * time.Second); !got.EndAt.Equal(want) {
		t.Fatalf("EndAt = %v after %d concurrent +1s updates, want %v", got.EndAt, n, want)
	}
}

// A paused sandbox's saved state round-trips through every write path and
// goes away when cleared; the lifecycle fields auto-pause and auto-resume
// read are kept exactly.
func testPausedSandbox(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	running := newSandbox("run", "a")
	running.AutoPauseMemory = false
	running.Timeout = 0
	must(t, "insert running sandbox", s.InsertSandbox(ctx, running))
	got, err := s.GetSandbox(ctx, "run")
	must(t, "get running sandbox", err)
	same(t, "running sandbox", got, running)
	if got.Paused != nil {
		t.Fatalf("a running sandbox has saved state %+v", got.Paused)
	}

	// Inserted paused (a restore of a backup, say): every field kept.
	paused := newSandbox("paused", "a")
	paused.State = store.StatePaused
	paused.Paused = &store.PausedState{Key: "paused/paused", Memory: true, Bytes: 5 << 30, At: t0.Add(time.Second)}
	must(t, "insert paused sandbox", s.InsertSandbox(ctx, paused))
	if paused.Paused.At != us(t0.Add(time.Second)) {
		t.Errorf("InsertSandbox left Paused.At = %v, want it rounded in place", paused.Paused.At)
	}
	got, err = s.GetSandbox(ctx, "paused")
	must(t, "get paused sandbox", err)
	same(t, "paused sandbox", got, paused)

	// Pause, then resume, through UpdateSandbox.
	saved := &store.PausedState{Key: "paused/run", Memory: false, Bytes: 123, At: t0.Add(time.Minute + 7*time.Nanosecond)}
	got, err = s.UpdateSandbox(ctx, "run", func(x *store.Sandbox) error {
		x.State, x.Paused = store.StatePaused, saved
		return nil
	})
	must(t, "pause", err)
	want := *running
	want.State = store.StatePaused
	want.Paused = &store.PausedState{Key: "paused/run", Bytes: 123, At: us(t0.Add(time.Minute))}
	same(t, "paused by update", got, &want)
	stored, err := s.GetSandbox(ctx, "run")
	must(t, "get after pause", err)
	same(t, "stored after pause", stored, &want)
	list, err := s.ListSandboxes(ctx, store.SandboxFilter{TeamID: "a", States: states(store.StatePaused)})
	must(t, "list paused", err)
	same(t, "paused sandboxes", ids(list), []string{"run", "paused"})

	got, err = s.UpdateSandbox(ctx, "run", func(x *store.Sandbox) error {
		x.State, x.Paused = store.StateRunning, nil
		return nil
	})
	must(t, "resume", err)
	same(t, "resumed by update", got, running)
	stored, err = s.GetSandbox(ctx, "run")
	must(t, "get after resume", err)
	same(t, "stored after resume", stored, running)
}

// Snapshots are templates with a source sandbox: ListSnapshots finds a
// team's, optionally of one sandbox; other calls see them as templates.
func testSnapshots(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	built := newTemplate(t, s, "t-built", "a")
	snap := func(id, team, sandbox string, at time.Time) *store.Template {
		tpl := &store.Template{ID: id, TeamID: team, SourceSandboxID: sandbox, CreatedAt: at, UpdatedAt: at}
		must(t, "create snapshot "+id, s.CreateTemplate(ctx, tpl))
		return tpl
	}
	s1 := snap("s1", "a", "sb1", t0.Add(2*time.Second))
	s2 := snap("s2", "a", "sb2", t0.Add(time.Second))
	s3 := snap("s3", "a", "sb1", t0.Add(3*time.Second))
	snap("s4", "b", "sb1", t0) // another team's, of a sandbox with the same ID

	got, err := s.GetTemplate(ctx, "s1")
	must(t, "get snapshot", err)
	same(t, "snapshot", got, s1)
	for _, tc := range []struct {
		team, sandbox string
		want          []*store.Template
	}{
		{"a", "", []*store.Template{s2, s1, s3}},
		{"a", "sb1", []*store.Template{s1, s3}},
		{"a", "sb2", []*store.Template{s2}},
		{"a", "nope", []*store.Template{}},
		{"nobody", "", []*store.Template{}},
	} {
		list, err := s.ListSnapshots(ctx, tc.team, tc.sandbox)
		must(t, "list snapshots", err)
		if list == nil {
			list = []*store.Template{}
		}
		same(t, fmt.Sprintf("snapshots of team %s sandbox %q", tc.team, tc.sandbox), list, tc.want)
	}
	all, err := s.ListTemplates(ctx, "a", false)
	must(t, "list templates", err)
	same(t, "templates of a, snapshots included", all, []*store.Template{built, s2, s1, s3})
	must(t, "delete snapshot", s.DeleteTemplate(ctx, "s1"))
	list, err := s.ListSnapshots(ctx, "a", "sb1")
	must(t, "list after delete", err)
	same(t, "snapshots of sb1 after delete", list, []*store.Template{s3})
}
