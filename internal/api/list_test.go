package api_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// listPage fetches one page of GET /v2/sandboxes.
func (e *env) listPage(key, query string) ([]listedSandbox, *response) {
	e.t.Helper()
	res := e.do("GET", "/v2/sandboxes?"+query, key, "").wantStatus(e.t, http.StatusOK)
	var list []listedSandbox
	res.decode(e.t, &list)
	return list, res
}

// listAll follows X-Next-Token to the end and returns every sandbox in order.
func (e *env) listAll(t *testing.T, key, query string, limit int) []listedSandbox {
	t.Helper()
	var all []listedSandbox
	token := ""
	for pages := 0; ; pages++ {
		if pages > 1000 {
			t.Fatal("paging does not end")
		}
		q := fmt.Sprintf("%s&limit=%d", query, limit)
		if token != "" {
			q += "&nextToken=" + url.QueryEscape(token)
		}
		page, res := e.listPage(key, q)
		all = append(all, page...)
		token = res.header.Get("X-Next-Token")
		if _, present := res.header["X-Next-Token"]; present && token == "" {
			t.Error("X-Next-Token present but empty")
		}
		if token == "" {
			if len(page) > limit {
				t.Errorf("last page has %d items, limit %d", len(page), limit)
			}
			return all
		}
		if len(page) != limit {
			t.Errorf("page %d has %d items before the end, want %d", pages, len(page), limit)
		}
	}
}

func TestListV2PagesEverySandboxOnce(t *testing.T) {
	e := newEnv(t, envOptions{})
	start := time.Now().Add(-time.Hour).Truncate(time.Second)
	ids := e.insertSandboxes(t, e.teamA, 250, start, func(int) map[string]string { return nil })
	// Team B's sandboxes never show up in team A's list.
	for i := range 5 {
		must(t, e.store.InsertSandbox(context.Background(), &store.Sandbox{
			ID: fmt.Sprintf("ib%020d", i), TeamID: e.teamB.ID, TemplateID: baseID, NodeID: e.node.ID(),
			State: store.StateRunning, StartedAt: start.Add(time.Duration(i) * time.Second), EndAt: start.Add(2 * time.Hour),
		}))
	}

	for _, tt := range []struct {
		name, query string
		limit       int
		ascending   bool
	}{
		{"default order is newest first", "", 100, false},
		{"desc by 7", "order=desc", 7, false},
		{"asc by 100", "order=asc", 100, true},
		{"one per page", "state=running", 1, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			all := e.listAll(t, keyA, tt.query, tt.limit)
			if len(all) != len(ids) {
				t.Fatalf("listed %d sandboxes, want %d", len(all), len(ids))
			}
			seen := map[string]bool{}
			for i, sb := range all {
				if seen[sb.SandboxID] {
					t.Fatalf("%s listed twice", sb.SandboxID)
				}
				seen[sb.SandboxID] = true
				want := ids[len(ids)-1-i]
				if tt.ascending {
					want = ids[i]
				}
				if sb.SandboxID != want {
					t.Fatalf("item %d = %s, want %s", i, sb.SandboxID, want)
				}
			}
		})
	}

	_, res := e.listPage(keyA, "limit=100")
	if got := res.header.Get("X-Total-Running"); got != "250" {
		t.Errorf("X-Total-Running = %q, want 250 (before paging)", got)
	}
	if !strings.Contains(res.header.Get("Access-Control-Expose-Headers"), "X-Next-Token") {
		t.Errorf("Access-Control-Expose-Headers = %q, want X-Next-Token in it", res.header.Get("Access-Control-Expose-Headers"))
	}
	page, res := e.listPage(keyA, "")
	if len(page) != 100 || res.header.Get("X-Next-Token") == "" {
		t.Errorf("default page has %d items, next token %q; want 100 and a token", len(page), res.header.Get("X-Next-Token"))
	}
}

func TestListV2BadQueries(t *testing.T) {
	e := newEnv(t, envOptions{})
	tests := []struct{ query, msg string }{
		{"limit=0", `"limit" must be an integer from 1 to 100`},
		{"limit=101", `"limit" must be an integer from 1 to 100`},
		{"limit=ten", `"limit"`},
		{"nextToken=%21%21%21", "Invalid nextToken"},
		{"nextToken=bm9wZQ", "Invalid nextToken"}, // base64 of "nope"
		{"state=stopped", `"state" has "stopped"`},
		{"state=running,killing", `"state" has "killing"`},
		{"order=sideways", `"order" must be asc or desc`},
		{"startedAfter=yesterday", `"startedAfter" must be an RFC 3339 time`},
		{"metadata=%25zz", "Invalid metadata filter"},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			e.do("GET", "/v2/sandboxes?"+tt.query, keyA, "").wantError(t, http.StatusBadRequest, tt.msg)
		})
	}
}

// jsEncodeURIComponent is JavaScript's encodeURIComponent.
func jsEncodeURIComponent(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_.!~*'()", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// sdkMetadataQuery builds the metadata parameter exactly as npm e2b 2.51
// does: each key and value through encodeURIComponent, the pairs through
// URLSearchParams, and the result through encodeURIComponent once more as a
// query parameter.
func sdkMetadataQuery(md [][2]string) string {
	var pairs []string
	for _, kv := range md {
		// URLSearchParams form-encodes what encodeURIComponent left: '%' and
		// the few punctuation characters it keeps.
		form := func(s string) string {
			return url.QueryEscape(jsEncodeURIComponent(s))
		}
		pairs = append(pairs, form(kv[0])+"="+form(kv[1]))
	}
	return "metadata=" + jsEncodeURIComponent(strings.Join(pairs, "&"))
}

func TestListMetadataFilterDoubleEncoded(t *testing.T) {
	e := newEnv(t, envOptions{})
	special := "a b&c=d/é%+?#'(x)*~!"
	match := e.create(keyA, fmt.Sprintf(`{"templateID":"base","metadata":{"user":%q,"app":"x y","k&=":"v"}}`, special))
	e.create(keyA, `{"templateID":"base","metadata":{"user":"a b","app":"x y"}}`)
	e.create(keyA, `{"templateID":"base","metadata":{"app":"x y"}}`)
	e.create(keyA, `{"templateID":"base"}`)

	tests := []struct {
		name string
		md   [][2]string
		want int
	}{
		{"special characters in a value", [][2]string{{"user", special}}, 1},
		{"special characters in a key", [][2]string{{"k&=", "v"}}, 1},
		{"every pair must match", [][2]string{{"user", special}, {"app", "x y"}}, 1},
		{"one pair of several", [][2]string{{"app", "x y"}}, 3},
		{"a prefix does not match", [][2]string{{"user", "a"}}, 0},
		{"a mismatching second pair", [][2]string{{"user", special}, {"app", "other"}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := sdkMetadataQuery(tt.md)
			list, _ := e.listPage(keyA, q)
			if len(list) != tt.want {
				t.Fatalf("v2 ?%s listed %d, want %d", q, len(list), tt.want)
			}
			if tt.want == 1 && list[0].SandboxID != match.SandboxID {
				t.Errorf("listed %s, want %s", list[0].SandboxID, match.SandboxID)
			}
			var v1 []listedSandbox
			e.do("GET", "/sandboxes?"+q, keyA, "").wantStatus(t, http.StatusOK).decode(t, &v1)
			if len(v1) != tt.want {
				t.Errorf("v1 ?%s listed %d, want %d", q, len(v1), tt.want)
			}
		})
	}
	// The metadata comes back as it was given.
	got := e.get(keyA, match.SandboxID)
	if got.Metadata["user"] != special || got.Metadata["k&="] != "v" {
		t.Errorf("metadata = %q", got.Metadata)
	}
}

func TestListStateTemplateAndStartFilters(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := context.Background()
	start := time.Now().Add(-time.Hour).Truncate(time.Second)
	ids := e.insertSandboxes(t, e.teamA, 4, start, func(int) map[string]string { return nil })
	// ids[0] is paused, ids[1] pausing (shown as paused), ids[2] being
	// killed (never listed), ids[3] running from team A's own template.
	for i, st := range []store.SandboxState{store.StatePaused, store.StatePausing, store.StateKilling} {
		_, err := e.store.UpdateSandbox(ctx, ids[i], func(s *store.Sandbox) error { s.State = st; return nil })
		must(t, err)
	}
	_, err := e.store.UpdateSandbox(ctx, ids[3], func(s *store.Sandbox) error { s.TemplateID, s.Alias = mineID, "mine"; return nil })
	must(t, err)

	tests := []struct {
		query, totalRunning string
		want                []string
		states              []string
	}{
		{"", "1", []string{ids[3], ids[1], ids[0]}, []string{"running", "paused", "paused"}},
		{"state=running,paused", "1", []string{ids[3], ids[1], ids[0]}, nil},
		{"state=running&state=paused", "1", []string{ids[3], ids[1], ids[0]}, nil},
		{"state=running", "1", []string{ids[3]}, nil},
		{"state=paused", "", []string{ids[1], ids[0]}, []string{"paused", "paused"}},
		{"template=mine", "1", []string{ids[3]}, nil},
		{"template=team-a/mine", "1", []string{ids[3]}, nil},
		{"template=" + mineID, "1", []string{ids[3]}, nil},
		{"template=base", "0", []string{ids[1], ids[0]}, nil},
		{"template=nosuch", "0", nil, nil},
		{"startedAfter=" + url.QueryEscape(start.Add(time.Second).Format(time.RFC3339)), "1", []string{ids[3], ids[1]}, nil},
		{"startedAfter=" + url.QueryEscape(start.Add(3*time.Second).Format(time.RFC3339)), "1", []string{ids[3]}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			list, res := e.listPage(keyA, tt.query)
			var got []string
			for _, sb := range list {
				got = append(got, sb.SandboxID)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("listed %v, want %v", got, tt.want)
			}
			for i, st := range tt.states {
				if i < len(list) && list[i].State != st {
					t.Errorf("item %d state %q, want %q", i, list[i].State, st)
				}
			}
			total, present := res.header["X-Total-Running"]
			if tt.totalRunning == "" && present {
				t.Errorf("X-Total-Running = %v without running asked for", total)
			}
			if tt.totalRunning != "" && res.header.Get("X-Total-Running") != tt.totalRunning {
				t.Errorf("X-Total-Running = %q, want %s", res.header.Get("X-Total-Running"), tt.totalRunning)
			}
		})
	}

	// The deprecated list shows running sandboxes only.
	var v1 []listedSandbox
	e.do("GET", "/sandboxes", keyA, "").wantStatus(t, http.StatusOK).decode(t, &v1)
	if len(v1) != 1 || v1[0].SandboxID != ids[3] {
		t.Errorf("v1 list = %+v, want only %s", v1, ids[3])
	}
}

func TestListFieldsAndEmptyList(t *testing.T) {
	e := newEnv(t, envOptions{})
	res := e.do("GET", "/v2/sandboxes", keyA, "").wantStatus(t, http.StatusOK)
	if string(res.body) != "[]" {
		t.Errorf("empty list body = %s, want []", res.body)
	}
	sb := e.create(keyA, `{"templateID":"base","timeout":60}`)
	res = e.do("GET", "/v2/sandboxes", keyA, "").wantStatus(t, http.StatusOK)
	for _, field := range []string{`"sandboxID":"` + sb.SandboxID, `"templateID":"` + baseID, `"alias":"base"`, `"clientID":"6532622b"`,
		`"startedAt":"`, `"endAt":"`, `"cpuCount":2`, `"memoryMB":512`, `"diskSizeMB":4096`, `"metadata":{}`, `"state":"running"`, `"envdVersion":"0.6.5"`} {
		if !strings.Contains(string(res.body), field) {
			t.Errorf("listed sandbox %s lacks %s", res.body, field)
		}
	}
	var list []listedSandbox
	res.decode(t, &list)
	if d := list[0].EndAt.Sub(list[0].StartedAt); d != time.Minute {
		t.Errorf("endAt - startedAt = %s, want 1m", d)
	}
}
