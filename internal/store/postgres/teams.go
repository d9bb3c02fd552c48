package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/internal/column"
)

// CreateTeam stores a team.
func (s *Store) CreateTeam(ctx context.Context, t *store.Team) error {
	column.NormalizeTeam(t)
	_, err := s.pool.Exec(ctx, `
		INSERT INTO teams (id, name, slug, max_sandboxes, max_lifetime_ns, created_at)
		VALUES ($1, $2, $3, $4, $5, $6)`,
		t.ID, t.Name, t.Slug, t.MaxSandboxes, int64(t.MaxLifetime), timeArg(t.CreatedAt))
	if err != nil {
		return fmt.Errorf("create team %s (slug %q): %w", t.ID, t.Slug, classify(err))
	}
	return nil
}

const teamColumns = `id, name, slug, max_sandboxes, max_lifetime_ns, created_at`

func scanTeam(r scanner) (*store.Team, error) {
	var t store.Team
	var lifetime int64
	if err := r.Scan(&t.ID, &t.Name, &t.Slug, &t.MaxSandboxes, &lifetime, timeCol{&t.CreatedAt}); err != nil {
		return nil, err
	}
	t.MaxLifetime = time.Duration(lifetime)
	return &t, nil
}

// GetTeam returns a team.
func (s *Store) GetTeam(ctx context.Context, id string) (*store.Team, error) {
	t, err := one(s.pool.QueryRow(ctx, `SELECT `+teamColumns+` FROM teams WHERE id = $1`, id), scanTeam)
	if err != nil {
		return nil, fmt.Errorf("get team %s: %w", id, err)
	}
	return t, nil
}

// ListTeams returns every team, oldest first.
func (s *Store) ListTeams(ctx context.Context) ([]*store.Team, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+teamColumns+` FROM teams ORDER BY created_at, id`)
	teams, err := collect(rows, err, scanTeam)
	if err != nil {
		return nil, fmt.Errorf("list teams: %w", err)
	}
	return teams, nil
}

// UpdateTeamLimits writes a team's limits.
func (s *Store) UpdateTeamLimits(ctx context.Context, id string, maxSandboxes int, maxLifetime time.Duration) error {
	err := exactlyOne(s.pool.Exec(ctx, `UPDATE teams SET max_sandboxes = $1, max_lifetime_ns = $2 WHERE id = $3`,
		maxSandboxes, int64(maxLifetime), id))
	if err != nil {
		return fmt.Errorf("update team %s limits: %w", id, err)
	}
	return nil
}

// CreateAPIKey stores a key.
func (s *Store) CreateAPIKey(ctx context.Context, k *store.APIKey) error {
	column.NormalizeAPIKey(k)
	_, err := s.pool.Exec(ctx, `
		INSERT INTO api_keys (id, team_id, name, hash, mask, created_at, last_used_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`,
		k.ID, k.TeamID, k.Name, k.Hash, k.Mask, timeArg(k.CreatedAt), timePtrArg(k.LastUsedAt))
	if err != nil {
		return fmt.Errorf("create api key %s for team %s: %w", k.ID, k.TeamID, classify(err))
	}
	return nil
}

const apiKeyColumns = `id, team_id, name, hash, mask, created_at, last_used_at`

func scanAPIKey(r scanner) (*store.APIKey, error) {
	var k store.APIKey
	err := r.Scan(&k.ID, &k.TeamID, &k.Name, &k.Hash, &k.Mask, timeCol{&k.CreatedAt}, timePtrCol{&k.LastUsedAt})
	if err != nil {
		return nil, err
	}
	return &k, nil
}

// APIKeyByHash finds a key by its hash.
func (s *Store) APIKeyByHash(ctx context.Context, hash string) (*store.APIKey, error) {
	k, err := one(s.pool.QueryRow(ctx, `SELECT `+apiKeyColumns+` FROM api_keys WHERE hash = $1`, hash), scanAPIKey)
	if err != nil {
		// The hash identifies a secret: keep it out of the message.
		return nil, fmt.Errorf("api key by hash: %w", err)
	}
	return k, nil
}

// ListAPIKeys returns a team's keys, oldest first.
func (s *Store) ListAPIKeys(ctx context.Context, teamID string) ([]*store.APIKey, error) {
	rows, err := s.pool.Query(ctx,
		`SELECT `+apiKeyColumns+` FROM api_keys WHERE team_id = $1 ORDER BY created_at, id`, teamID)
	keys, err := collect(rows, err, scanAPIKey)
	if err != nil {
		return nil, fmt.Errorf("list api keys of team %s: %w", teamID, err)
	}
	return keys, nil
}

// DeleteAPIKey deletes a team's key.
func (s *Store) DeleteAPIKey(ctx context.Context, teamID, id string) error {
	err := exactlyOne(s.pool.Exec(ctx, `DELETE FROM api_keys WHERE team_id = $1 AND id = $2`, teamID, id))
	if err != nil {
		return fmt.Errorf("delete api key %s of team %s: %w", id, teamID, err)
	}
	return nil
}

// TouchAPIKey sets a key's LastUsedAt.
func (s *Store) TouchAPIKey(ctx context.Context, id string, usedAt time.Time) error {
	err := exactlyOne(s.pool.Exec(ctx, `UPDATE api_keys SET last_used_at = $1 WHERE id = $2`, timeArg(usedAt), id))
	if err != nil {
		return fmt.Errorf("touch api key %s: %w", id, err)
	}
	return nil
}
