package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
)

// buildLog is the append-only log of a build in flight: entries in memory
// for the status polls, and each one appended to the build's JSONL file so
// they outlive the build and a restart.
type buildLog struct {
	mu      sync.Mutex
	entries []template.LogEntry
	f       *os.File // nil when the file could not be opened: memory only
	log     func(msg string, args ...any)
}

// logEntryJSON is a line of a build log file (and BuildLogEntry's fields).
type logEntryJSON struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step,omitempty"`
}

func (t *Templates) logPath(buildID string) string {
	return filepath.Join(t.cfg.DataDir, logsDir, buildID+".log")
}

// openLog opens (appending) the log of a build.
func (t *Templates) openLog(buildID string) *buildLog {
	l := &buildLog{log: func(msg string, args ...any) { t.log.Warn(msg, append(args, "build", buildID)...) }}
	f, err := os.OpenFile(t.logPath(buildID), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		l.log("build log: keeping it in memory only", "err", err)
	} else {
		l.f = f
	}
	// Entries written before (by a previous run) come first.
	if old, err := t.readLogFile(buildID); err == nil {
		l.entries = old
	}
	return l
}

// add appends an entry; it is the Builder's BuildRequest.Log.
func (l *buildLog) add(e template.LogEntry) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	if levelRank(e.Level) < 0 {
		e.Level = "info"
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.entries = append(l.entries, e)
	if l.f == nil {
		return
	}
	line, _ := json.Marshal(logEntryJSON{Timestamp: e.Time, Level: e.Level, Message: e.Message, Step: e.Step})
	if _, err := l.f.Write(append(line, '\n')); err != nil {
		l.log("build log: write", "err", err)
		l.f.Close()
		l.f = nil
	}
}

func (l *buildLog) snapshot() []template.LogEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.entries)
}

func (l *buildLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// readLogFile reads a build's log file; no file is an empty log.
func (t *Templates) readLogFile(buildID string) ([]template.LogEntry, error) {
	b, err := os.ReadFile(t.logPath(buildID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("build log %s: %w", buildID, err)
	}
	var out []template.LogEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var e logEntryJSON
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue // a line cut by a crash
		}
		out = append(out, template.LogEntry{Time: e.Timestamp, Level: e.Level, Message: e.Message, Step: e.Step})
	}
	return out, sc.Err()
}

// entries is a build's whole log: from memory while it runs, else its file.
func (t *Templates) entries(buildID string) ([]template.LogEntry, error) {
	t.mu.Lock()
	l := t.logs[buildID]
	t.mu.Unlock()
	if l != nil {
		return l.snapshot(), nil
	}
	return t.readLogFile(buildID)
}

// levels are the log levels, least severe first.
var levels = []string{"debug", "info", "warn", "error"}

// levelRank is a level's place in levels; -1 for an unknown level.
func levelRank(level string) int { return slices.Index(levels, level) }

// CheckLevel checks a level filter ("" is none).
func CheckLevel(level string) error {
	if level != "" && levelRank(level) < 0 {
		return errorf(Invalid, "Invalid level %q (want one of debug, info, warn, error)", level)
	}
	return nil
}

// atLeast keeps the entries at level or above ("" keeps all).
func atLeast(entries []template.LogEntry, level string) []template.LogEntry {
	if level == "" {
		return entries
	}
	floor := levelRank(level)
	return slices.DeleteFunc(entries, func(e template.LogEntry) bool { return levelRank(e.Level) < floor })
}

// BuildInfo is a build's status and a page of its log (TemplateBuildInfo).
type BuildInfo struct {
	TemplateID, BuildID string
	Status              store.BuildStatus
	Entries             []template.LogEntry
	// Reason is set for failed builds.
	Reason *BuildReason
}

// BuildReason says why a build failed.
type BuildReason struct {
	Message string
	Step    string
	// Entries are the last entries of the failed step.
	Entries []template.LogEntry
}

// reasonEntries is how many of the failed step's last entries a reason holds.
const reasonEntries = 20

// BuildStatus returns a build of one of the team's templates with its log
// entries from offset on (at most limit, at level or above).
func (t *Templates) BuildStatus(ctx context.Context, team *store.Team, templateRef, buildID string, offset, limit int, level string) (*BuildInfo, error) {
	tmpl, b, err := t.ownBuild(ctx, team, templateRef, buildID)
	if err != nil {
		return nil, err
	}
	all, err := t.entries(b.ID)
	if err != nil {
		return nil, err
	}
	info := &BuildInfo{TemplateID: tmpl.ID, BuildID: b.ID, Status: b.Status, Entries: []template.LogEntry{}}
	page := atLeast(slices.Clone(all), level)
	if offset < len(page) {
		page = page[offset:]
		info.Entries = page[:min(limit, len(page))]
	}
	if b.Status == store.BuildError {
		r := &BuildReason{Message: b.Reason, Step: b.ReasonStep, Entries: []template.LogEntry{}}
		for _, e := range all {
			if e.Step == b.ReasonStep {
				r.Entries = append(r.Entries, e)
			}
		}
		if n := len(r.Entries); n > reasonEntries {
			r.Entries = r.Entries[n-reasonEntries:]
		}
		info.Reason = r
	}
	return info, nil
}

// LogQuery selects build log entries (GET .../builds/{buildID}/logs).
type LogQuery struct {
	// Cursor, when set, is where to start: entries at or after it going
	// forward, at or before it going backward.
	Cursor   time.Time
	Backward bool // newest first
	Limit    int
	Level    string
}

// BuildLogs returns log entries of a build of one of the team's templates.
func (t *Templates) BuildLogs(ctx context.Context, team *store.Team, templateRef, buildID string, q LogQuery) ([]template.LogEntry, error) {
	_, b, err := t.ownBuild(ctx, team, templateRef, buildID)
	if err != nil {
		return nil, err
	}
	all, err := t.entries(b.ID)
	if err != nil {
		return nil, err
	}
	all = atLeast(all, q.Level)
	out := []template.LogEntry{}
	if q.Backward {
		for i := len(all) - 1; i >= 0 && len(out) < q.Limit; i-- {
			if q.Cursor.IsZero() || !all[i].Time.After(q.Cursor) {
				out = append(out, all[i])
			}
		}
		return out, nil
	}
	for _, e := range all {
		if len(out) == q.Limit {
			break
		}
		if q.Cursor.IsZero() || !e.Time.Before(q.Cursor) {
			out = append(out, e)
		}
	}
	return out, nil
}
