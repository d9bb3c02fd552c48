package api_test

import (
	"encoding/json"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkCreateOverhead is what the control plane adds to a sandbox create:
// POST /v2/sandboxes through the whole handler (auth, body, template
// resolution, the team's limit, the SQLite store, the controller) with a
// node that starts nothing and answers at once. Every b.Loop iteration
// creates 250 sandboxes one after the other, each killed (DELETE, timed
// apart) before the next, so the team stays under its limit of 20 and the
// store's state is steady; p50 and p99 are over all of them.
//
// "handler" calls the handler in process; "loopback" goes through a real
// HTTP server on 127.0.0.1 with a kept-alive connection, as an SDK would.
func BenchmarkCreateOverhead(b *testing.B) {
	const batch = 250
	for _, via := range []string{"handler", "loopback"} {
		b.Run(via, func(b *testing.B) {
			e := newEnv(b, envOptions{maxSandboxes: 20})
			send := e.serveInProcess
			if via == "loopback" {
				send = e.serveLoopback
			}
			var creates, kills []time.Duration
			for b.Loop() {
				for range batch {
					began := time.Now()
					status, body := send(b, "POST", "/v2/sandboxes", `{"templateID":"base","timeout":300}`)
					creates = append(creates, time.Since(began))
					if status != http.StatusCreated {
						b.Fatalf("create = %d: %s", status, body)
					}
					var sb sandbox
					if err := json.Unmarshal(body, &sb); err != nil {
						b.Fatalf("decode %s: %v", body, err)
					}
					began = time.Now()
					status, body = send(b, "DELETE", "/sandboxes/"+sb.SandboxID, "")
					kills = append(kills, time.Since(began))
					if status != http.StatusNoContent {
						b.Fatalf("kill %s = %d: %s", sb.SandboxID, status, body)
					}
				}
			}
			slices.Sort(creates)
			slices.Sort(kills)
			b.ReportMetric(0, "ns/op") // one iteration is a batch of creates and kills
			b.ReportMetric(micros(creates, 50), "create-p50-µs")
			b.ReportMetric(micros(creates, 99), "create-p99-µs")
			b.ReportMetric(micros(kills, 50), "kill-p50-µs")
			b.ReportMetric(float64(len(creates)), "creates")
		})
	}
}

// serveInProcess sends a request with team A's key straight to the handler.
func (e *env) serveInProcess(b *testing.B, method, path, body string) (int, []byte) {
	var req *http.Request
	if body == "" {
		req = httptest.NewRequest(method, path, nil)
	} else {
		req = httptest.NewRequest(method, path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("X-API-Key", keyA)
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.Bytes()
}

// serveLoopback sends a request with team A's key to the env's loopback
// server (http.DefaultClient keeps the connection alive between requests).
func (e *env) serveLoopback(b *testing.B, method, path, body string) (int, []byte) {
	res := doRequest(b, method, e.url+path, keyA, body)
	return res.status, res.body
}

// micros is the nearest-rank p-th percentile of sorted, in microseconds.
func micros(sorted []time.Duration, p float64) float64 {
	i := max(int(math.Ceil(p/100*float64(len(sorted))))-1, 0)
	return float64(sorted[i].Nanoseconds()) / 1000
}
