package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"reflect"
	"testing"
)

func TestParseWarmPools(t *testing.T) {
	got, err := ParseWarmPools(" code-interpreter=2, team/web:v1=1 ,,")
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]int{"code-interpreter": 2, "team/web:v1": 1}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	for _, bad := range []string{"x", "x=", "x=-1", "=2", "x=two", "base=3"} {
		if _, err := ParseWarmPools(bad); err == nil {
			t.Errorf("ParseWarmPools(%q) accepted it", bad)
		}
	}
}

// TestTemplatePoolsFollowBuilds: a pool sits on the build its template
// resolves to; a rebuild moves it, a template that stops resolving empties
// it, and two names of one build share one pool of the larger size.
func TestTemplatePoolsFollowBuilds(t *testing.T) {
	builds := map[string]string{"web": "templates/web/b1", "alias-of-web": "templates/web/b1", "gone": ""}
	var calls []string
	p := &templatePools{
		sizes: map[string]int{"web": 1, "alias-of-web": 3, "gone": 2},
		resolve: func(_ context.Context, name string) (string, error) {
			if builds[name] == "" {
				return "", errors.New("template not found")
			}
			return builds[name], nil
		},
		set: func(art string, size int) error {
			calls = append(calls, art+"="+string(rune('0'+size)))
			return nil
		},
		log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	step := func(want ...string) {
		t.Helper()
		calls = nil
		p.sync(t.Context())
		if !reflect.DeepEqual(calls, want) {
			t.Errorf("set calls %v, want %v", calls, want)
		}
	}
	step("templates/web/b1=3") // one pool for both names, the larger size
	step()                     // nothing changed: no calls
	builds["web"], builds["alias-of-web"] = "templates/web/b2", "templates/web/b2"
	step("templates/web/b1=0", "templates/web/b2=3") // the rebuild: the old build's pool goes
	delete(builds, "web")
	builds["alias-of-web"] = ""
	step("templates/web/b2=0") // deleted: emptied
	builds["gone"] = "templates/gone/b1"
	step("templates/gone/b1=2")
}

func TestTemplatePoolsRetryAFailedSet(t *testing.T) {
	fail := true
	var sets int
	p := &templatePools{
		sizes:   map[string]int{"web": 2},
		resolve: func(context.Context, string) (string, error) { return "templates/web/b1", nil },
		set: func(string, int) error {
			sets++
			if fail {
				return errors.New("node closed")
			}
			return nil
		},
		log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	p.sync(t.Context())
	fail = false
	p.sync(t.Context())
	p.sync(t.Context())
	if sets != 2 {
		t.Errorf("%d set calls, want 2 (the failed one retried once, then nothing)", sets)
	}
}
