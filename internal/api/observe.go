package api

import (
	"errors"
	"math"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// sandboxMetric is the SandboxMetric schema.
type sandboxMetric struct {
	Timestamp     time.Time `json:"timestamp"`
	TimestampUnix int64     `json:"timestampUnix"`
	CPUCount      int       `json:"cpuCount"`
	CPUUsedPct    float64   `json:"cpuUsedPct"`
	MemUsed       uint64    `json:"memUsed"`
	MemTotal      uint64    `json:"memTotal"`
	MemCache      uint64    `json:"memCache"`
	DiskUsed      uint64    `json:"diskUsed"`
	DiskTotal     uint64    `json:"diskTotal"`
}

func metric(st node.Stats) sandboxMetric {
	return sandboxMetric{
		Timestamp: st.Timestamp.UTC(), TimestampUnix: st.Timestamp.Unix(),
		CPUCount: st.CPUCount, CPUUsedPct: st.CPUUsedPct,
		MemUsed: st.MemUsed, MemTotal: st.MemTotal, MemCache: st.MemCache,
		DiskUsed: st.DiskUsed, DiskTotal: st.DiskTotal,
	}
}

// sandboxMetrics answers getMetrics: samples between start and end, unix
// seconds, both inclusive (end to the last instant of its second, so a
// sample reported as timestampUnix == end is inside). Default: the whole
// life until now.
func (s *server) sandboxMetrics(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	start, err := queryInt(q, "start", 0, 0, math.MaxInt32*4)
	if err != nil {
		return err
	}
	now := time.Now()
	end, err := queryInt(q, "end", now.Unix(), 0, math.MaxInt32*4)
	if err != nil {
		return err
	}
	if start > end {
		return badRequest("Query parameter \"start\" (%d) is after \"end\" (%d)", start, end)
	}
	from := time.Unix(start, 0)
	if start == 0 {
		from = time.Time{}
	}
	samples, err := s.control.Metrics(r.Context(), team, sandboxIDParam(r), from, time.Unix(end, 0).Add(time.Second-1))
	if err != nil {
		return err
	}
	out := make([]sandboxMetric, 0, len(samples))
	for _, st := range samples {
		out = append(out, metric(st))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// maxBatchMetrics is how many sandboxes one batch metrics call may name.
const maxBatchMetrics = 100

// batchMetrics answers GET /sandboxes/metrics?sandbox_ids=a,b with each
// sandbox's latest sample; unknown and other teams' IDs are left out.
func (s *server) batchMetrics(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var ids []string
	seen := map[string]bool{}
	for _, list := range r.URL.Query()["sandbox_ids"] {
		for _, id := range strings.Split(list, ",") {
			if id, _, _ = strings.Cut(strings.TrimSpace(id), "-"); id != "" && !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	if len(ids) == 0 {
		return badRequest("Query parameter \"sandbox_ids\" is required: a comma-separated list of sandbox IDs")
	}
	if len(ids) > maxBatchMetrics {
		return badRequest("Query parameter \"sandbox_ids\" names %d sandboxes; at most %d are allowed", len(ids), maxBatchMetrics)
	}
	out := map[string]sandboxMetric{}
	now := time.Now()
	for _, id := range ids {
		samples, err := s.control.Metrics(r.Context(), team, id, time.Time{}, now)
		var ce *control.Error
		if errors.As(err, &ce) && ce.Kind == control.NotFound {
			continue
		}
		if err != nil {
			return err
		}
		if len(samples) > 0 {
			out[id] = metric(samples[len(samples)-1])
		}
	}
	writeJSON(w, http.StatusOK, struct {
		Sandboxes map[string]sandboxMetric `json:"sandboxes"`
	}{out})
	return nil
}

// sandboxLog and sandboxLogEntry are SandboxLog and SandboxLogEntry.
type sandboxLog struct {
	Timestamp time.Time `json:"timestamp"`
	Line      string    `json:"line"`
}

type sandboxLogEntry struct {
	Timestamp time.Time         `json:"timestamp"`
	Level     string            `json:"level"`
	Message   string            `json:"message"`
	Fields    map[string]string `json:"fields"`
}

// Every line a node reports is at level info: boot, agent and start-command
// output carry no level of their own.
const logLevel = "info"

// logLevels orders LogLevel for the v2 "minimum level" filter.
var logLevels = map[string]int{"debug": 0, "info": 1, "warn": 2, "error": 3}

func entry(l node.LogLine) sandboxLogEntry {
	return sandboxLogEntry{Timestamp: l.Time.UTC(), Level: logLevel, Message: l.Message, Fields: map[string]string{"source": l.Source}}
}

// logsV1 answers GET /sandboxes/{id}/logs?start=<ms>&limit=: lines from
// start, oldest first, in both the plain and the structured form.
func (s *server) logsV1(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	start, err := queryInt(q, "start", 0, 0, math.MaxInt64)
	if err != nil {
		return err
	}
	limit, err := queryInt(q, "limit", 1000, 0, math.MaxInt32)
	if err != nil {
		return err
	}
	lines, err := s.control.Logs(r.Context(), team, sandboxIDParam(r))
	if err != nil {
		return err
	}
	out := struct {
		Logs       []sandboxLog      `json:"logs"`
		LogEntries []sandboxLogEntry `json:"logEntries"`
	}{Logs: []sandboxLog{}, LogEntries: []sandboxLogEntry{}}
	for _, l := range sortedLines(lines, false) {
		if int64(len(out.Logs)) >= limit {
			break
		}
		if l.Time.UnixMilli() < start {
			continue
		}
		out.Logs = append(out.Logs, sandboxLog{Timestamp: l.Time.UTC(), Line: l.Message})
		out.LogEntries = append(out.LogEntries, entry(l))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// logsV2 answers GET /v2/sandboxes/{id}/logs: from cursor (ms) forward
// (oldest first, default) or backward (newest first), at or above a level,
// containing search.
func (s *server) logsV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	limit, err := queryInt(q, "limit", 1000, 0, 1000)
	if err != nil {
		return err
	}
	backward := false
	switch q.Get("direction") {
	case "", "forward":
	case "backward":
		backward = true
	default:
		return badRequest("Query parameter \"direction\" must be forward or backward, not %q", q.Get("direction"))
	}
	defCursor := int64(0)
	if backward {
		defCursor = math.MaxInt64
	}
	cursorMs, err := queryInt(q, "cursor", defCursor, 0, math.MaxInt64)
	if err != nil {
		return err
	}
	minLevel := 0
	if lv := q.Get("level"); lv != "" {
		n, ok := logLevels[lv]
		if !ok {
			return badRequest("Query parameter \"level\" must be debug, info, warn or error, not %q", lv)
		}
		minLevel = n
	}
	search := q.Get("search")
	if len(search) > 256 {
		return badRequest("Query parameter \"search\" is longer than 256 bytes")
	}
	lines, err := s.control.Logs(r.Context(), team, sandboxIDParam(r))
	if err != nil {
		return err
	}
	out := []sandboxLogEntry{}
	for _, l := range sortedLines(lines, backward) {
		if int64(len(out)) >= limit {
			break
		}
		ms := l.Time.UnixMilli()
		if (!backward && ms < cursorMs) || (backward && ms > cursorMs) ||
			logLevels[logLevel] < minLevel || !strings.Contains(l.Message, search) {
			continue
		}
		out = append(out, entry(l))
	}
	writeJSON(w, http.StatusOK, struct {
		Logs []sandboxLogEntry `json:"logs"`
	}{out})
	return nil
}

// sortedLines orders lines by time, oldest first or (backward) newest first.
func sortedLines(lines []node.LogLine, backward bool) []node.LogLine {
	out := append([]node.LogLine(nil), lines...)
	sort.SliceStable(out, func(i, j int) bool {
		if backward {
			return out[i].Time.After(out[j].Time)
		}
		return out[i].Time.Before(out[j].Time)
	})
	return out
}
