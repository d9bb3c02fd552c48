package storetest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// sec is t0 plus n seconds.
func sec(n int) time.Time { return t0.Add(time.Duration(n) * time.Second) }

// listFixture is a small fleet whose every filter case below is worked out by
// hand. a3 and a5 start at the same instant, so order falls to the ID.
//
//	id  team state   template node started end  metadata
//	a1  a    running tpl1     n1   1       100  env=prod, a=b&c=d, "q"='x' "y"
//	a2  a    paused  tpl1     n2   2       200  env=dev
//	a3  a    running tpl2     n1   3       300  env=prod, ünï=çødé ✓
//	a4  a    killing tpl2     n2   4       50   -
//	a5  a    pausing tpl1     n1   3       400  -
//	b1  b    running tpl1     n1   1       500  env=prod
func listFixture(t *testing.T, s store.Store) {
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	rows := []struct {
		id, team   string
		state      store.SandboxState
		tpl, node  string
		start, end int
		metadata   map[string]string
	}{
		{"a1", "a", store.StateRunning, "tpl1", "n1", 1, 100,
			map[string]string{"env": "prod", "a=b&c": "d", `"q"`: `'x' "y"`}},
		{"a2", "a", store.StatePaused, "tpl1", "n2", 2, 200, map[string]string{"env": "dev"}},
		{"a3", "a", store.StateRunning, "tpl2", "n1", 3, 300, map[string]string{"env": "prod", "ünï": "çødé ✓"}},
		{"a4", "a", store.StateKilling, "tpl2", "n2", 4, 50, nil},
		{"a5", "a", store.StatePausing, "tpl1", "n1", 3, 400, nil},
		{"b1", "b", store.StateRunning, "tpl1", "n1", 1, 500, map[string]string{"env": "prod"}},
	}
	for _, r := range rows {
		sb := newSandbox(r.id, r.team)
		sb.State, sb.TemplateID, sb.NodeID = r.state, r.tpl, r.node
		sb.StartedAt, sb.EndAt, sb.Metadata = sec(r.start), sec(r.end), r.metadata
		must(t, "insert sandbox "+r.id, s.InsertSandbox(context.Background(), sb))
	}
}

func states(s ...store.SandboxState) []store.SandboxState { return s }

func testListFilters(t *testing.T, s store.Store) {
	ctx := context.Background()
	listFixture(t, s)
	cursor := func(start int, id string) *store.SandboxCursor {
		return &store.SandboxCursor{StartedAt: sec(start), ID: id}
	}
	for _, tc := range []struct {
		name string
		f    store.SandboxFilter
		want []string
	}{
		{"no filter, newest first", store.SandboxFilter{}, []string{"a4", "a5", "a3", "a2", "b1", "a1"}},
		{"team", store.SandboxFilter{TeamID: "a"}, []string{"a4", "a5", "a3", "a2", "a1"}},
		{"team ascending", store.SandboxFilter{TeamID: "a", Ascending: true}, []string{"a1", "a2", "a3", "a5", "a4"}},
		{"unknown team", store.SandboxFilter{TeamID: "nope"}, nil},
		{"one state", store.SandboxFilter{States: states(store.StateRunning)}, []string{"a3", "b1", "a1"}},
		{"two states", store.SandboxFilter{TeamID: "a", States: states(store.StateRunning, store.StatePaused)},
			[]string{"a3", "a2", "a1"}},
		{"metadata pair", store.SandboxFilter{Metadata: map[string]string{"env": "prod"}}, []string{"a3", "b1", "a1"}},
		{"metadata pairs all match", store.SandboxFilter{Metadata: map[string]string{"env": "prod", "ünï": "çødé ✓"}},
			[]string{"a3"}},
		{"metadata with = and &", store.SandboxFilter{Metadata: map[string]string{"a=b&c": "d"}}, []string{"a1"}},
		{"metadata with quotes", store.SandboxFilter{Metadata: map[string]string{`"q"`: `'x' "y"`}}, []string{"a1"}},
		{"metadata value is exact, not a prefix", store.SandboxFilter{Metadata: map[string]string{"env": "pro"}}, nil},
		{"metadata value is case-sensitive", store.SandboxFilter{Metadata: map[string]string{"env": "Prod"}}, nil},
		{"metadata missing key", store.SandboxFilter{Metadata: map[string]string{"nope": ""}}, nil},
		{"metadata one pair of two misses", store.SandboxFilter{Metadata: map[string]string{"env": "prod", "x": "y"}}, nil},
		{"template", store.SandboxFilter{TemplateID: "tpl2"}, []string{"a4", "a3"}},
		{"started after is inclusive", store.SandboxFilter{StartedAfter: sec(3)}, []string{"a4", "a5", "a3"}},
		{"end before is exclusive", store.SandboxFilter{EndBefore: sec(200)}, []string{"a4", "a1"}},
		{"node", store.SandboxFilter{NodeID: "n2"}, []string{"a4", "a2"}},
		{"combined", store.SandboxFilter{TeamID: "a", States: states(store.StateRunning, store.StatePausing),
			TemplateID: "tpl1", NodeID: "n1"}, []string{"a5", "a1"}},
		{"combined with metadata", store.SandboxFilter{TeamID: "a", States: states(store.StateRunning, store.StatePausing),
			TemplateID: "tpl1", NodeID: "n1", Metadata: map[string]string{"env": "prod"}}, []string{"a1"}},
		{"combined with times", store.SandboxFilter{TeamID: "a", StartedAfter: sec(2), EndBefore: sec(300)},
			[]string{"a4", "a2"}},
		{"evictor: running and ended", store.SandboxFilter{States: states(store.StateRunning), EndBefore: sec(301)},
			[]string{"a3", "a1"}},
		{"limit", store.SandboxFilter{TeamID: "a", Limit: 2}, []string{"a4", "a5"}},
		{"limit ascending", store.SandboxFilter{TeamID: "a", Limit: 2, Ascending: true}, []string{"a1", "a2"}},
		{"after a tie, newest first", store.SandboxFilter{TeamID: "a", After: cursor(3, "a5")}, []string{"a3", "a2", "a1"}},
		{"after a tie, ascending", store.SandboxFilter{TeamID: "a", Ascending: true, After: cursor(3, "a3")},
			[]string{"a5", "a4"}},
		{"after with limit", store.SandboxFilter{TeamID: "a", After: cursor(4, "a4"), Limit: 2}, []string{"a5", "a3"}},
		{"after the last", store.SandboxFilter{TeamID: "a", After: cursor(1, "a1")}, nil},
		{"after a deleted position", store.SandboxFilter{After: cursor(2, "zz")}, []string{"a2", "b1", "a1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			list, err := s.ListSandboxes(ctx, tc.f)
			must(t, "list sandboxes", err)
			same(t, "listed IDs", ids(list), tc.want)

			// Count selects the same rows before paging.
			unpaged := tc.f
			unpaged.After, unpaged.Limit = nil, 0
			all, err := s.ListSandboxes(ctx, unpaged)
			must(t, "list sandboxes unpaged", err)
			n, err := s.CountSandboxes(ctx, tc.f)
			must(t, "count sandboxes", err)
			if n != len(all) {
				t.Fatalf("CountSandboxes = %d, want %d (the unpaged listing)", n, len(all))
			}
		})
	}
}

func ids(list []*store.Sandbox) []string {
	var out []string
	for _, sb := range list {
		out = append(out, sb.ID)
	}
	return out
}

func testListMetadataCharacters(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	// Each sandbox holds one awkward pair and a common one; filtering on the
	// awkward pair must find exactly its sandbox.
	pairs := [][2]string{
		{"k=v", "a=b"},
		{"a&b", "c&d=e"},
		{`"quoted"`, `"value"`},
		{"it's", "o'clock"},
		{`back\slash`, `\\`},
		{"dot.key", "v"},
		{"$", "$.x"},
		{"[0]", "[1]"},
		{"ünïcødé", "✓ 🚀 日本"},
		{"space key", " padded "},
		{"%3D", "%26"},
		{"line\nbreak", "tab\t"},
		{"<html>", "&amp;"},
	}
	for i, p := range pairs {
		sb := newSandbox(fmt.Sprintf("sb%02d", i), "a")
		sb.StartedAt = sec(i)
		sb.Metadata = map[string]string{p[0]: p[1], "common": "yes"}
		must(t, "insert sandbox", s.InsertSandbox(ctx, sb))
	}
	for i, p := range pairs {
		t.Run(fmt.Sprintf("%q=%q", p[0], p[1]), func(t *testing.T) {
			list, err := s.ListSandboxes(ctx, store.SandboxFilter{TeamID: "a",
				Metadata: map[string]string{p[0]: p[1], "common": "yes"}})
			must(t, "list sandboxes", err)
			same(t, "listed IDs", ids(list), []string{fmt.Sprintf("sb%02d", i)})
			same(t, "metadata", list[0].Metadata, map[string]string{p[0]: p[1], "common": "yes"})
		})
	}
}

func testListPaging(t *testing.T, s store.Store) {
	ctx := context.Background()
	newTeam(t, s, "a")
	newTeam(t, s, "b")
	// 250 sandboxes, three to a start time so pages split ties, inserted out
	// of order; the other team's rows must never show up.
	const n = 250
	var want []string
	for i := range n {
		j := (i * 7) % n // a permutation of 0..n-1, since 7 and 250 are coprime
		id := fmt.Sprintf("p%03d", j)
		sb := newSandbox(id, "a")
		sb.StartedAt = sec(j / 3).Add(123 * time.Microsecond)
		must(t, "insert sandbox", s.InsertSandbox(ctx, sb))
		want = append(want, id)
		if i%10 == 0 {
			must(t, "insert other team's sandbox", s.InsertSandbox(ctx, newSandbox(fmt.Sprintf("q%03d", j), "b")))
		}
	}
	slices.Sort(want) // by (start, ID), since the start grows with the ID

	for _, asc := range []bool{false, true} {
		t.Run(fmt.Sprintf("ascending %v", asc), func(t *testing.T) {
			wantOrder := slices.Clone(want)
			if !asc {
				slices.Reverse(wantOrder)
			}
			var got []string
			f := store.SandboxFilter{TeamID: "a", Ascending: asc, Limit: 7}
			for pages := 0; ; pages++ {
				if pages > n {
					t.Fatalf("paging does not end: %d pages", pages)
				}
				page, err := s.ListSandboxes(ctx, f)
				must(t, "list page", err)
				if len(page) > f.Limit {
					t.Fatalf("page of %d, limit %d", len(page), f.Limit)
				}
				if len(page) == 0 {
					break
				}
				got = append(got, ids(page)...)
				last := page[len(page)-1]
				f.After = &store.SandboxCursor{StartedAt: last.StartedAt, ID: last.ID}
			}
			same(t, "IDs over all pages", got, wantOrder)
		})
	}
}

// BenchmarkListSandboxes1000 measures what GET /v2/sandboxes asks of a store
// (a team, states, a metadata pair, a page of 100) over a team's 1,000
// sandboxes, a tenth of which match, so every page reads the whole team.
// s must be fresh and empty.
func BenchmarkListSandboxes1000(b *testing.B, s store.Store) {
	ctx := context.Background()
	if err := s.CreateTeam(ctx, &store.Team{ID: "bench", Name: "bench", Slug: "bench", CreatedAt: t0}); err != nil {
		b.Fatal(err)
	}
	for i := range 1000 {
		sb := newSandbox(fmt.Sprintf("i%020d", i), "bench")
		sb.StartedAt = t0.Add(time.Duration(i) * time.Millisecond)
		sb.State = []store.SandboxState{store.StateRunning, store.StatePaused}[i%2]
		sb.Metadata = map[string]string{"group": fmt.Sprint(i % 10), "sandboxTestId": fmt.Sprintf("test-%d", i),
			"owner": "someone@example.com"}
		if err := s.InsertSandbox(ctx, sb); err != nil {
			b.Fatal(err)
		}
	}
	f := store.SandboxFilter{TeamID: "bench", States: states(store.StateRunning, store.StatePaused),
		Metadata: map[string]string{"group": "3"}, Limit: 100}

	b.Run("list", func(b *testing.B) {
		for b.Loop() {
			list, err := s.ListSandboxes(ctx, f)
			if err != nil {
				b.Fatal(err)
			}
			if len(list) != 100 {
				b.Fatalf("listed %d, want 100", len(list))
			}
		}
	})
	b.Run("count", func(b *testing.B) {
		for b.Loop() {
			n, err := s.CountSandboxes(ctx, f)
			if err != nil {
				b.Fatal(err)
			}
			if n != 100 {
				b.Fatalf("counted %d, want 100", n)
			}
		}
	})
}
