package sqlite

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
)

// sandboxColumns is the columns of sandboxes; selectSandbox reads them.
const sandboxColumns = `id, team_id, template_id, build_id, alias, node_id, state, metadata, env_vars,
	cpu_count, memory_mb, disk_size_mb, envd_version, envd_access_token, allow_internet, auto_pause, auto_resume,
	started_at, end_at, auto_pause_memory, timeout_ns, paused_key, paused_memory, paused_bytes, paused_at`

// selectSandbox selects sandboxColumns, metadata as JSON text.
const selectSandbox = `SELECT id, team_id, template_id, build_id, alias, node_id, state, json(metadata), env_vars,
	cpu_count, memory_mb, disk_size_mb, envd_version, envd_access_token, allow_internet, auto_pause, auto_resume,
	started_at, end_at, auto_pause_memory, timeout_ns, paused_key, paused_memory, paused_bytes, paused_at FROM sandboxes`

func scanSandbox(r scanner) (*store.Sandbox, error) {
	var (
		s           store.Sandbox
		timeoutNS   int64
		pausedKey   string
		pausedMem   bool
		pausedBytes int64
		pausedAt    *time.Time
	)
	err := r.Scan(&s.ID, &s.TeamID, &s.TemplateID, &s.BuildID, &s.Alias, &s.NodeID, &s.State,
		mapCol{&s.Metadata}, mapCol{&s.EnvVars},
		&s.CPUCount, &s.MemoryMB, &s.DiskSizeMB, &s.EnvdVersion, &s.EnvdAccessToken,
		&s.AllowInternet, &s.AutoPause, &s.AutoResume, timeCol{&s.StartedAt}, timeCol{&s.EndAt},
		&s.AutoPauseMemory, &timeoutNS, &pausedKey, &pausedMem, &pausedBytes, timePtrCol{&pausedAt})
	if err != nil {
		return nil, err
	}
	s.Timeout = time.Duration(timeoutNS)
	s.Paused = column.PausedFrom(pausedKey, pausedMem, pausedBytes, pausedAt)
	return &s, nil
}

// sandboxArgs is every column of s but id, in sandboxColumns' order.
func sandboxArgs(s *store.Sandbox) ([]any, error) {
	metadata, err := column.EncodeMap(s.Metadata)
	if err != nil {
		return nil, fmt.Errorf("metadata: %w", err)
	}
	envVars, err := column.EncodeMap(s.EnvVars)
	if err != nil {
		return nil, fmt.Errorf("env vars: %w", err)
	}
	pausedKey, pausedMem, pausedBytes, pausedAt := column.PausedArgs(s.Paused)
	return []any{s.TeamID, s.TemplateID, s.BuildID, s.Alias, s.NodeID, string(s.State), metadata, envVars,
		s.CPUCount, s.MemoryMB, s.DiskSizeMB, s.EnvdVersion, s.EnvdAccessToken,
		s.AllowInternet, s.AutoPause, s.AutoResume, timeArg(s.StartedAt), timeArg(s.EndAt),
		s.AutoPauseMemory, int64(s.Timeout), pausedKey, pausedMem, pausedBytes, timePtrArg(pausedAt)}, nil
}

// InsertSandbox records a new sandbox.
func (s *Store) InsertSandbox(ctx context.Context, sb *store.Sandbox) error {
	column.NormalizeSandbox(sb)
	args, err := sandboxArgs(sb)
	if err == nil {
		_, err = s.write.ExecContext(ctx, `INSERT INTO sandboxes (`+sandboxColumns+`)
			VALUES (?, ?, ?, ?, ?, ?, ?, jsonb(?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, append([]any{sb.ID}, args...)...)
	}
	if err != nil {
		return fmt.Errorf("insert sandbox %s of team %s: %w", sb.ID, sb.TeamID, classify(err))
	}
	return nil
}

// GetSandbox returns a sandbox.
func (s *Store) GetSandbox(ctx context.Context, id string) (*store.Sandbox, error) {
	sb, err := one(s.read.QueryRowContext(ctx, selectSandbox+` WHERE id = ?`, id), scanSandbox)
	if err != nil {
		return nil, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	return sb, nil
}

// ListSandboxes returns the sandboxes f selects, in f's order.
func (s *Store) ListSandboxes(ctx context.Context, f store.SandboxFilter) ([]*store.Sandbox, error) {
	where, args := sandboxWhere(f, true)
	dir := "DESC"
	if f.Ascending {
		dir = "ASC"
	}
	q := selectSandbox + where +
		` ORDER BY started_at ` + dir + `, id ` + dir
	if f.Limit > 0 {
		q += ` LIMIT ?`
		args = append(args, f.Limit)
	}
	rows, err := s.read.QueryContext(ctx, q, args...)
	list, err := collect(rows, err, scanSandbox)
	if err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	return list, nil
}

// CountSandboxes counts the sandboxes f selects, ignoring paging.
func (s *Store) CountSandboxes(ctx context.Context, f store.SandboxFilter) (int, error) {
	where, args := sandboxWhere(f, false)
	var n int
	if err := s.read.QueryRowContext(ctx, `SELECT count(*) FROM sandboxes`+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count sandboxes: %w", err)
	}
	return n, nil
}

// sandboxWhere is the WHERE clause (empty or with a leading space) and its
// arguments for f; with paging, it includes f.After.
func sandboxWhere(f store.SandboxFilter, paging bool) (string, []any) {
	var conds []string
	var args []any
	add := func(cond string, a ...any) {
		conds = append(conds, cond)
		args = append(args, a...)
	}
	if f.TeamID != "" {
		add("team_id = ?", f.TeamID)
	}
	if len(f.States) > 0 {
		marks := strings.TrimSuffix(strings.Repeat("?, ", len(f.States)), ", ")
		states := make([]any, len(f.States))
		for i, st := range f.States {
			states[i] = string(st)
		}
		add("state IN ("+marks+")", states...)
	}
	// Sorted so one filter always makes the same statement (and plan).
	for _, k := range slices.Sorted(maps.Keys(f.Metadata)) {
		add("json_extract(metadata, ?) = ?", jsonPath(k), f.Metadata[k])
	}
	if f.TemplateID != "" {
		add("template_id = ?", f.TemplateID)
	}
	if !f.StartedAfter.IsZero() {
		add("started_at >= ?", timeArg(f.StartedAfter))
	}
	if !f.EndBefore.IsZero() {
		add("end_at < ?", timeArg(f.EndBefore))
	}
	if f.NodeID != "" {
		add("node_id = ?", f.NodeID)
	}
	if paging && f.After != nil {
		op := "<"
		if f.Ascending {
			op = ">"
		}
		add("(started_at, id) "+op+" (?, ?)", timeArg(f.After.StartedAt), f.After.ID)
	}
	if len(conds) == 0 {
		return "", nil
	}
	return " WHERE " + strings.Join(conds, " AND "), args
}

// jsonPath is the SQLite JSON path of the top-level key k. A quoted label
// takes JSON string escapes, so any key (with dots, quotes, unicode) works.
func jsonPath(k string) string {
	b, _ := json.Marshal(k) // a string always encodes
	return "$." + string(b)
}

// UpdateSandbox runs fn on the row of sandbox id inside a write transaction
// and writes back what fn leaves in it.
func (s *Store) UpdateSandbox(ctx context.Context, id string, fn func(*store.Sandbox) error) (*store.Sandbox, error) {
	// The write connection is the only one, and its transactions begin
	// IMMEDIATE: from here to Commit no other writer runs.
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("update sandbox %s: %w", id, err)
	}
	defer tx.Rollback()

	sb, err := one(tx.QueryRowContext(ctx, selectSandbox+` WHERE id = ?`, id), scanSandbox)
	if err != nil {
		return nil, fmt.Errorf("update sandbox %s: %w", id, err)
	}
	if err := fn(sb); err != nil {
		return nil, err
	}
	sb.ID = id
	column.NormalizeSandbox(sb)
	args, err := sandboxArgs(sb)
	if err == nil {
		_, err = tx.ExecContext(ctx, `UPDATE sandboxes SET team_id = ?, template_id = ?, build_id = ?, alias = ?,
			node_id = ?, state = ?, metadata = jsonb(?), env_vars = ?, cpu_count = ?, memory_mb = ?, disk_size_mb = ?,
			envd_version = ?, envd_access_token = ?, allow_internet = ?, auto_pause = ?, auto_resume = ?,
			started_at = ?, end_at = ?, auto_pause_memory = ?, timeout_ns = ?,
			paused_key = ?, paused_memory = ?, paused_bytes = ?, paused_at = ?
			WHERE id = ?`, append(args, id)...)
	}
	if err == nil {
		err = tx.Commit()
	}
	if err != nil {
		return nil, fmt.Errorf("update sandbox %s: %w", id, classify(err))
	}
	return sb, nil
}

// DeleteSandbox deletes a sandbox's row.
func (s *Store) DeleteSandbox(ctx context.Context, id string) error {
	res, err := s.write.ExecContext(ctx, `DELETE FROM sandboxes WHERE id = ?`, id)
	if err == nil {
		err = exactlyOne(res)
	}
	if err != nil {
		return fmt.Errorf("delete sandbox %s: %w", id, err)
	}
	return nil
}
