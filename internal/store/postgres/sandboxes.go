package postgres

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
)

const sandboxColumns = `id, team_id, template_id, build_id, alias, node_id, state, metadata, env_vars,
	cpu_count, memory_mb, disk_size_mb, envd_version, envd_access_token, allow_internet, auto_pause, auto_resume,
	started_at, end_at, auto_pause_memory, timeout_ns, paused_key, paused_memory, paused_bytes, paused_at`

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
		_, err = s.pool.Exec(ctx, `INSERT INTO sandboxes (`+sandboxColumns+`)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
				$20, $21, $22, $23, $24, $25)`,
			append([]any{sb.ID}, args...)...)
	}
	if err != nil {
		return fmt.Errorf("insert sandbox %s of team %s: %w", sb.ID, sb.TeamID, classify(err))
	}
	return nil
}

// GetSandbox returns a sandbox.
func (s *Store) GetSandbox(ctx context.Context, id string) (*store.Sandbox, error) {
	sb, err := one(s.pool.QueryRow(ctx, `SELECT `+sandboxColumns+` FROM sandboxes WHERE id = $1`, id), scanSandbox)
	if err != nil {
		return nil, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	return sb, nil
}

// ListSandboxes returns the sandboxes f selects, in f's order.
func (s *Store) ListSandboxes(ctx context.Context, f store.SandboxFilter) ([]*store.Sandbox, error) {
	where, args, err := sandboxWhere(f, true)
	if err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	dir := "DESC"
	if f.Ascending {
		dir = "ASC"
	}
	q := `SELECT ` + sandboxColumns + ` FROM sandboxes` + where + ` ORDER BY started_at ` + dir + `, id ` + dir
	if f.Limit > 0 {
		args = append(args, f.Limit)
		q += fmt.Sprintf(` LIMIT $%d`, len(args))
	}
	rows, err := s.pool.Query(ctx, q, args...)
	list, err := collect(rows, err, scanSandbox)
	if err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	return list, nil
}

// CountSandboxes counts the sandboxes f selects, ignoring paging.
func (s *Store) CountSandboxes(ctx context.Context, f store.SandboxFilter) (int, error) {
	where, args, err := sandboxWhere(f, false)
	if err != nil {
		return 0, fmt.Errorf("count sandboxes: %w", err)
	}
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM sandboxes`+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count sandboxes: %w", err)
	}
	return n, nil
}

// sandboxWhere is the WHERE clause (empty or with a leading space) and its
// arguments for f; with paging, it includes f.After.
func sandboxWhere(f store.SandboxFilter, paging bool) (string, []any, error) {
	var conds []string
	var args []any
	// add appends cond, whose $? marks stand for a in turn.
	add := func(cond string, a ...any) {
		for _, v := range a {
			args = append(args, v)
			cond = strings.Replace(cond, "$?", "$"+strconv.Itoa(len(args)), 1)
		}
		conds = append(conds, cond)
	}
	if f.TeamID != "" {
		add("team_id = $?", f.TeamID)
	}
	if len(f.States) > 0 {
		states := make([]string, len(f.States))
		for i, st := range f.States {
			states[i] = string(st)
		}
		add("state = ANY($?)", states)
	}
	if len(f.Metadata) > 0 {
		// Containment of a flat object of strings: every pair, exactly.
		m, err := column.EncodeMap(f.Metadata)
		if err != nil {
			return "", nil, fmt.Errorf("metadata filter: %w", err)
		}
		add("metadata @> $?::jsonb", m)
	}
	if f.TemplateID != "" {
		add("template_id = $?", f.TemplateID)
	}
	if !f.StartedAfter.IsZero() {
		add("started_at >= $?", timeArg(f.StartedAfter))
	}
	if !f.EndBefore.IsZero() {
		add("end_at < $?", timeArg(f.EndBefore))
	}
	if f.NodeID != "" {
		add("node_id = $?", f.NodeID)
	}
	if paging && f.After != nil {
		op := "<"
		if f.Ascending {
			op = ">"
		}
		add("(started_at, id) "+op+" ($?, $?)", timeArg(f.After.StartedAt), f.After.ID)
	}
	if len(conds) == 0 {
		return "", nil, nil
	}
	return " WHERE " + strings.Join(conds, " AND "), args, nil
}

// UpdateSandbox runs fn on the row of sandbox id, locked FOR UPDATE, and
// writes back what fn leaves in it.
func (s *Store) UpdateSandbox(ctx context.Context, id string, fn func(*store.Sandbox) error) (*store.Sandbox, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("update sandbox %s: %w", id, err)
	}
	// After Commit, Rollback does nothing; on every other path it ends the
	// transaction and releases the lock. It needs a live context for that.
	defer tx.Rollback(context.WithoutCancel(ctx))

	sb, err := one(tx.QueryRow(ctx, `SELECT `+sandboxColumns+` FROM sandboxes WHERE id = $1 FOR UPDATE`, id), scanSandbox)
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
		_, err = tx.Exec(ctx, `UPDATE sandboxes SET team_id = $1, template_id = $2, build_id = $3, alias = $4,
			node_id = $5, state = $6, metadata = $7::jsonb, env_vars = $8::jsonb, cpu_count = $9, memory_mb = $10,
			disk_size_mb = $11, envd_version = $12, envd_access_token = $13, allow_internet = $14, auto_pause = $15,
			auto_resume = $16, started_at = $17, end_at = $18, auto_pause_memory = $19, timeout_ns = $20,
			paused_key = $21, paused_memory = $22, paused_bytes = $23, paused_at = $24
			WHERE id = $25`, append(args, id)...)
	}
	if err == nil {
		err = tx.Commit(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("update sandbox %s: %w", id, classify(err))
	}
	return sb, nil
}

// DeleteSandbox deletes a sandbox's row.
func (s *Store) DeleteSandbox(ctx context.Context, id string) error {
	if err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM sandboxes WHERE id = $1`, id)); err != nil {
		return fmt.Errorf("delete sandbox %s: %w", id, err)
	}
	return nil
}
