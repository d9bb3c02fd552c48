package templatecli

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestListAndDelete(t *testing.T) {
	var deleted []string
	mux := http.NewServeMux()
	mux.HandleFunc("GET /templates", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, []map[string]any{
			{"templateID": "aaaa1111", "buildID": "b1", "names": []string{"base"}, "aliases": []string{"base"},
				"cpuCount": 2, "memoryMB": 512, "createdAt": "2026-01-02T03:04:05Z", "buildStatus": "ready"},
			{"templateID": "bbbb2222", "buildID": "b2", "names": []string{"team/web", "web2"}, "aliases": []string{"web", "web2"},
				"cpuCount": 1, "memoryMB": 1024, "createdAt": "2026-01-03T03:04:05Z", "buildStatus": "building"},
		})
	})
	mux.HandleFunc("DELETE /templates/{id}", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-API-Key") != testKey {
			t.Errorf("DELETE without the key")
		}
		if r.PathValue("id") == "bbbb2222" {
			writeJSON(w, 409, map[string]any{"code": 409, "message": "template bbbb2222 has running sandboxes"})
			return
		}
		deleted = append(deleted, r.PathValue("id"))
		w.WriteHeader(204)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c := &Client{URL: srv.URL, APIKey: testKey}
	ctx := context.Background()

	list, err := c.ListTemplates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := WriteTable(&out, list); err != nil {
		t.Fatal(err)
	}
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).Local().Format(time.DateTime)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "ID") ||
		strings.Join(strings.Fields(lines[1]), " ") != "aaaa1111 base ready 2 512 MiB "+created {
		t.Errorf("table:\n%s", out.String())
	}

	for ref, want := range map[string]string{"base": "aaaa1111", "base:v2": "aaaa1111", "aaaa1111": "aaaa1111",
		"web": "bbbb2222", "team/web": "bbbb2222", "nope": ""} {
		got := ""
		if t := Find(list, ref); t != nil {
			got = t.TemplateID
		}
		if got != want {
			t.Errorf("Find(%q) = %q, want %q", ref, got, want)
		}
	}

	if err := c.DeleteTemplate(ctx, "aaaa1111"); err != nil || len(deleted) != 1 {
		t.Errorf("delete: %v, deleted %q", err, deleted)
	}
	err = c.DeleteTemplate(ctx, "bbbb2222")
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 409 || ae.Message != "template bbbb2222 has running sandboxes" {
		t.Errorf("delete in use: %v", err)
	}
}

func TestClientURL(t *testing.T) {
	for _, tt := range []struct{ base, ref, want string }{
		{"http://h:3000", "/v3/templates", "http://h:3000/v3/templates"},
		{"http://h:3000/prefix/", "/v3/templates", "http://h:3000/prefix/v3/templates"},
		{"http://h:3000", "http://other/upload?x=1", "http://other/upload?x=1"},
		{"http://h:3000/api/", "upload/abc", "http://h:3000/api/upload/abc"},
	} {
		got, err := (&Client{URL: tt.base}).resolve(tt.ref)
		if err != nil || got != tt.want {
			t.Errorf("resolve(%q, %q) = %q, %v; want %q", tt.base, tt.ref, got, err, tt.want)
		}
	}
	if _, err := (&Client{URL: "localhost:3000"}).resolve("/x"); err == nil || !strings.Contains(err.Error(), "not an absolute http(s) URL") {
		t.Errorf("a URL without a scheme: %v", err)
	}
}
