package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/store"
)

// DefaultTeamID is the team `warren up` creates on an empty store.
const DefaultTeamID = "default"

// TeamLimits are the limits of the default team.
type TeamLimits struct {
	MaxSandboxes int
	MaxLifetime  time.Duration
}

// Bootstrap makes sure the store has the default team and at least one API
// key. On an empty store it creates both and returns the new key's text (the
// only time it exists outside the caller); fixedKey, when set, is that key.
// limits apply when the team is created; later calls return "" and change nothing.
func Bootstrap(ctx context.Context, st store.Store, limits TeamLimits, fixedKey string) (team *store.Team, newKey string, err error) {
	if fixedKey != "" && !apikey.Valid(fixedKey) {
		return nil, "", fmt.Errorf("bootstrap API key %q is not of the form e2b_ + 40 lowercase hex characters", fixedKey)
	}
	team, err = st.GetTeam(ctx, DefaultTeamID)
	if errors.Is(err, store.ErrNotFound) {
		team = &store.Team{
			ID: DefaultTeamID, Name: "default", Slug: "default",
			MaxSandboxes: limits.MaxSandboxes, MaxLifetime: limits.MaxLifetime, CreatedAt: time.Now().UTC(),
		}
		err = st.CreateTeam(ctx, team)
	}
	if err != nil {
		return nil, "", fmt.Errorf("default team: %w", err)
	}
	keys, err := st.ListAPIKeys(ctx, team.ID)
	if err != nil {
		return nil, "", err
	}
	if len(keys) > 0 {
		return team, "", nil
	}
	raw := fixedKey
	if raw == "" {
		if raw, err = apikey.New(); err != nil {
			return nil, "", err
		}
	}
	key := &store.APIKey{
		ID: "bootstrap", TeamID: team.ID, Name: "bootstrap", Hash: apikey.Hash(raw), Mask: apikey.Mask(raw),
		CreatedAt: time.Now().UTC(),
	}
	if err := st.CreateAPIKey(ctx, key); err != nil {
		return nil, "", fmt.Errorf("bootstrap API key: %w", err)
	}
	return team, raw, nil
}
