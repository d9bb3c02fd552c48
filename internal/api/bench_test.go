package api_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// BenchmarkListV2Sandboxes1000 is Sandbox.list with a metadata filter, through
// the whole handler (auth, query parsing, store, JSON), over 1,000 stored
// sandboxes of the team; a tenth match, so each call answers a page of 100.
// Target: < 20 ms per call.
func BenchmarkListV2Sandboxes1000(b *testing.B) {
	e := newEnv(b, envOptions{})
	e.insertSandboxes(b, e.teamA, 1000, time.Now().Add(-time.Hour), func(i int) map[string]string {
		return map[string]string{"user": fmt.Sprintf("u%d", i%10), "app": "bench"}
	})
	query := "/v2/sandboxes?" + sdkMetadataQuery([][2]string{{"user", "u3"}, {"app", "bench"}})
	req := httptest.NewRequest("GET", query, nil)
	req.Header.Set("X-API-Key", keyA)
	check := httptest.NewRecorder()
	e.h.ServeHTTP(check, req)
	if check.Code != http.StatusOK || check.Header().Get("X-Total-Running") != "100" {
		b.Fatalf("list = %d, X-Total-Running %q: %s", check.Code, check.Header().Get("X-Total-Running"), check.Body)
	}
	for b.Loop() {
		rec := httptest.NewRecorder()
		e.h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("list = %d: %s", rec.Code, rec.Body)
		}
	}
}
