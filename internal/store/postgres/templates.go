package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
)

// CreateTemplate stores a template.
func (s *Store) CreateTemplate(ctx context.Context, t *store.Template) error {
	column.NormalizeTemplate(t)
	_, err := s.pool.Exec(ctx, `
		INSERT INTO templates (id, team_id, public, created_at, updated_at, last_spawned_at, spawn_count, source_sandbox_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
		t.ID, t.TeamID, t.Public, timeArg(t.CreatedAt), timeArg(t.UpdatedAt), timePtrArg(t.LastSpawnedAt), t.SpawnCount,
		t.SourceSandboxID)
	if err != nil {
		return fmt.Errorf("create template %s of team %s: %w", t.ID, t.TeamID, classify(err))
	}
	return nil
}

const templateColumns = `id, team_id, public, created_at, updated_at, last_spawned_at, spawn_count, source_sandbox_id`

func scanTemplate(r scanner) (*store.Template, error) {
	var t store.Template
	err := r.Scan(&t.ID, &t.TeamID, &t.Public, timeCol{&t.CreatedAt}, timeCol{&t.UpdatedAt},
		timePtrCol{&t.LastSpawnedAt}, &t.SpawnCount, &t.SourceSandboxID)
	if err != nil {
		return nil, err
	}
	return &t, nil
}

// GetTemplate returns a template.
func (s *Store) GetTemplate(ctx context.Context, id string) (*store.Template, error) {
	t, err := one(s.pool.QueryRow(ctx, `SELECT `+templateColumns+` FROM templates WHERE id = $1`, id), scanTemplate)
	if err != nil {
		return nil, fmt.Errorf("get template %s: %w", id, err)
	}
	return t, nil
}

// ListTemplates returns a team's templates and, with public, every public one.
func (s *Store) ListTemplates(ctx context.Context, teamID string, public bool) ([]*store.Template, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+templateColumns+` FROM templates
		WHERE team_id = $1 OR ($2 AND public) ORDER BY created_at, id`, teamID, public)
	templates, err := collect(rows, err, scanTemplate)
	if err != nil {
		return nil, fmt.Errorf("list templates of team %s: %w", teamID, err)
	}
	return templates, nil
}

// ListSnapshots returns a team's snapshot templates, of one sandbox when
// sandboxID is set, oldest first.
func (s *Store) ListSnapshots(ctx context.Context, teamID, sandboxID string) ([]*store.Template, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+templateColumns+` FROM templates
		WHERE team_id = $1 AND source_sandbox_id <> '' AND ($2 = '' OR source_sandbox_id = $2)
		ORDER BY created_at, id`, teamID, sandboxID)
	templates, err := collect(rows, err, scanTemplate)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of team %s: %w", teamID, err)
	}
	return templates, nil
}

// UpdateTemplate writes t's Public and UpdatedAt.
func (s *Store) UpdateTemplate(ctx context.Context, t *store.Template) error {
	column.NormalizeTemplate(t)
	err := exactlyOne(s.pool.Exec(ctx, `UPDATE templates SET public = $1, updated_at = $2 WHERE id = $3`,
		t.Public, timeArg(t.UpdatedAt), t.ID))
	if err != nil {
		return fmt.Errorf("update template %s: %w", t.ID, err)
	}
	return nil
}

// DeleteTemplate deletes a template; its aliases, builds and tags go with it
// (ON DELETE CASCADE).
func (s *Store) DeleteTemplate(ctx context.Context, id string) error {
	err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM templates WHERE id = $1`, id))
	if err != nil {
		return fmt.Errorf("delete template %s: %w", id, err)
	}
	return nil
}

// RecordSpawn counts a sandbox started from a template.
func (s *Store) RecordSpawn(ctx context.Context, templateID string, at time.Time) error {
	err := exactlyOne(s.pool.Exec(ctx,
		`UPDATE templates SET spawn_count = spawn_count + 1, last_spawned_at = $1 WHERE id = $2`, timeArg(at), templateID))
	if err != nil {
		return fmt.Errorf("record spawn of template %s: %w", templateID, err)
	}
	return nil
}

// SetAlias points namespace/alias at a template unless another holds it.
func (s *Store) SetAlias(ctx context.Context, a *store.Alias) error {
	// The upsert touches the row only when it already names this template,
	// so RETURNING yields nothing exactly when another template holds it.
	var holder string
	err := s.pool.QueryRow(ctx, `
		INSERT INTO aliases (namespace, alias, template_id) VALUES ($1, $2, $3)
		ON CONFLICT (namespace, alias) DO UPDATE SET template_id = excluded.template_id
		WHERE aliases.template_id = excluded.template_id
		RETURNING template_id`, a.Namespace, a.Alias, a.TemplateID).Scan(&holder)
	if errors.Is(err, pgx.ErrNoRows) {
		err = store.ErrConflict
	}
	if err != nil {
		return fmt.Errorf("set alias %q in namespace %q to template %s: %w", a.Alias, a.Namespace, a.TemplateID, classify(err))
	}
	return nil
}

func scanAlias(r scanner) (*store.Alias, error) {
	var a store.Alias
	if err := r.Scan(&a.Namespace, &a.Alias, &a.TemplateID); err != nil {
		return nil, err
	}
	return &a, nil
}

// GetAlias returns the alias namespace/alias.
func (s *Store) GetAlias(ctx context.Context, namespace, alias string) (*store.Alias, error) {
	a, err := one(s.pool.QueryRow(ctx,
		`SELECT namespace, alias, template_id FROM aliases WHERE namespace = $1 AND alias = $2`, namespace, alias), scanAlias)
	if err != nil {
		return nil, fmt.Errorf("get alias %q in namespace %q: %w", alias, namespace, err)
	}
	return a, nil
}

// ListAliases returns a template's aliases.
func (s *Store) ListAliases(ctx context.Context, templateID string) ([]*store.Alias, error) {
	rows, err := s.pool.Query(ctx, `SELECT namespace, alias, template_id FROM aliases
		WHERE template_id = $1 ORDER BY namespace, alias`, templateID)
	aliases, err := collect(rows, err, scanAlias)
	if err != nil {
		return nil, fmt.Errorf("list aliases of template %s: %w", templateID, err)
	}
	return aliases, nil
}

// DeleteAlias deletes namespace/alias.
func (s *Store) DeleteAlias(ctx context.Context, namespace, alias string) error {
	err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM aliases WHERE namespace = $1 AND alias = $2`, namespace, alias))
	if err != nil {
		return fmt.Errorf("delete alias %q in namespace %q: %w", alias, namespace, err)
	}
	return nil
}

// CreateBuild stores a build.
func (s *Store) CreateBuild(ctx context.Context, b *store.Build) error {
	column.NormalizeBuild(b)
	_, err := s.pool.Exec(ctx, `
		INSERT INTO builds (id, template_id, status, cpu_count, memory_mb, disk_size_mb, envd_version,
			artifact, reason, reason_step, spec, created_at, updated_at, finished_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)`,
		b.ID, b.TemplateID, string(b.Status), b.CPUCount, b.MemoryMB, b.DiskSizeMB, b.EnvdVersion,
		b.Artifact, b.Reason, b.ReasonStep, b.Spec, timeArg(b.CreatedAt), timeArg(b.UpdatedAt), timePtrArg(b.FinishedAt))
	if err != nil {
		return fmt.Errorf("create build %s of template %s: %w", b.ID, b.TemplateID, classify(err))
	}
	return nil
}

const buildColumns = `id, template_id, status, cpu_count, memory_mb, disk_size_mb, envd_version,
	artifact, reason, reason_step, spec, created_at, updated_at, finished_at`

func scanBuild(r scanner) (*store.Build, error) {
	var b store.Build
	err := r.Scan(&b.ID, &b.TemplateID, &b.Status, &b.CPUCount, &b.MemoryMB, &b.DiskSizeMB, &b.EnvdVersion,
		&b.Artifact, &b.Reason, &b.ReasonStep, &b.Spec, timeCol{&b.CreatedAt}, timeCol{&b.UpdatedAt}, timePtrCol{&b.FinishedAt})
	if err != nil {
		return nil, err
	}
	return &b, nil
}

// GetBuild returns a build.
func (s *Store) GetBuild(ctx context.Context, id string) (*store.Build, error) {
	b, err := one(s.pool.QueryRow(ctx, `SELECT `+buildColumns+` FROM builds WHERE id = $1`, id), scanBuild)
	if err != nil {
		return nil, fmt.Errorf("get build %s: %w", id, err)
	}
	return b, nil
}

// UpdateBuild writes every field of b but ID, TemplateID and CreatedAt.
func (s *Store) UpdateBuild(ctx context.Context, b *store.Build) error {
	column.NormalizeBuild(b)
	err := exactlyOne(s.pool.Exec(ctx, `
		UPDATE builds SET status = $1, cpu_count = $2, memory_mb = $3, disk_size_mb = $4, envd_version = $5,
			artifact = $6, reason = $7, reason_step = $8, spec = $9, updated_at = $10, finished_at = $11
		WHERE id = $12`,
		string(b.Status), b.CPUCount, b.MemoryMB, b.DiskSizeMB, b.EnvdVersion,
		b.Artifact, b.Reason, b.ReasonStep, b.Spec, timeArg(b.UpdatedAt), timePtrArg(b.FinishedAt), b.ID))
	if err != nil {
		return fmt.Errorf("update build %s: %w", b.ID, err)
	}
	return nil
}

// ListBuilds returns a template's builds, newest first.
func (s *Store) ListBuilds(ctx context.Context, templateID string) ([]*store.Build, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+buildColumns+` FROM builds
		WHERE template_id = $1 ORDER BY created_at DESC, id DESC`, templateID)
	builds, err := collect(rows, err, scanBuild)
	if err != nil {
		return nil, fmt.Errorf("list builds of template %s: %w", templateID, err)
	}
	return builds, nil
}

// ListBuildsByStatus returns every template's builds in one of the statuses,
// oldest first.
func (s *Store) ListBuildsByStatus(ctx context.Context, statuses ...store.BuildStatus) ([]*store.Build, error) {
	if len(statuses) == 0 {
		return nil, nil
	}
	names := make([]string, len(statuses))
	for i, st := range statuses {
		names[i] = string(st)
	}
	rows, err := s.pool.Query(ctx, `SELECT `+buildColumns+` FROM builds
		WHERE status = ANY($1) ORDER BY created_at, id`, names)
	builds, err := collect(rows, err, scanBuild)
	if err != nil {
		return nil, fmt.Errorf("list builds by status %v: %w", statuses, err)
	}
	return builds, nil
}

// DeleteBuild deletes a build; its tags go with it (ON DELETE CASCADE).
func (s *Store) DeleteBuild(ctx context.Context, id string) error {
	err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM builds WHERE id = $1`, id))
	if err != nil {
		return fmt.Errorf("delete build %s: %w", id, err)
	}
	return nil
}

// SetTag points templateID:tag at a build of that template.
func (s *Store) SetTag(ctx context.Context, t *store.Tag) error {
	column.NormalizeTag(t)
	_, err := s.pool.Exec(ctx, `
		INSERT INTO tags (template_id, tag, build_id, created_at) VALUES ($1, $2, $3, $4)
		ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, created_at = excluded.created_at`,
		t.TemplateID, t.Tag, t.BuildID, timeArg(t.CreatedAt))
	if err != nil {
		return fmt.Errorf("set tag %s:%s to build %s: %w", t.TemplateID, t.Tag, t.BuildID, classify(err))
	}
	return nil
}

func scanTag(r scanner) (*store.Tag, error) {
	var t store.Tag
	if err := r.Scan(&t.TemplateID, &t.Tag, &t.BuildID, timeCol{&t.CreatedAt}); err != nil {
		return nil, err
	}
	return &t, nil
}

// GetTag returns templateID:tag.
func (s *Store) GetTag(ctx context.Context, templateID, tag string) (*store.Tag, error) {
	t, err := one(s.pool.QueryRow(ctx, `SELECT template_id, tag, build_id, created_at FROM tags
		WHERE template_id = $1 AND tag = $2`, templateID, tag), scanTag)
	if err != nil {
		return nil, fmt.Errorf("get tag %s:%s: %w", templateID, tag, err)
	}
	return t, nil
}

// ListTags returns a template's tags by name.
func (s *Store) ListTags(ctx context.Context, templateID string) ([]*store.Tag, error) {
	rows, err := s.pool.Query(ctx, `SELECT template_id, tag, build_id, created_at FROM tags
		WHERE template_id = $1 ORDER BY tag`, templateID)
	tags, err := collect(rows, err, scanTag)
	if err != nil {
		return nil, fmt.Errorf("list tags of template %s: %w", templateID, err)
	}
	return tags, nil
}

// DeleteTag deletes templateID:tag.
func (s *Store) DeleteTag(ctx context.Context, templateID, tag string) error {
	err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM tags WHERE template_id = $1 AND tag = $2`, templateID, tag))
	if err != nil {
		return fmt.Errorf("delete tag %s:%s: %w", templateID, tag, err)
	}
	return nil
}
