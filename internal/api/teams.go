package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/store"
)

// listTeams answers the CLI's `auth login`: the caller's team, with the key
// it called with (the CLI stores it as the team's key).
func (s *server) listTeams(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	writeJSON(w, http.StatusOK, []struct {
		TeamID    string `json:"teamID"`
		Name      string `json:"name"`
		APIKey    string `json:"apiKey"`
		IsDefault bool   `json:"isDefault"`
	}{{team.ID, team.Name, r.Header.Get(apiKeyHeader), true}})
	return nil
}

// maskDetails is the IdentifierMaskingDetails schema.
type maskDetails struct {
	Prefix            string `json:"prefix"`
	ValueLength       int    `json:"valueLength"`
	MaskedValuePrefix string `json:"maskedValuePrefix"`
	MaskedValueSuffix string `json:"maskedValueSuffix"`
}

// keyValueLength is the length of a key after its prefix (40 hex).
const keyValueLength = 40

// parseMask splits a stored mask ("e2b_1a2b...9f0e") into its parts.
func parseMask(mask string) maskDetails {
	d := maskDetails{ValueLength: keyValueLength}
	if strings.HasPrefix(mask, apikey.Prefix) {
		d.Prefix, mask = apikey.Prefix, mask[len(apikey.Prefix):]
	}
	d.MaskedValuePrefix, d.MaskedValueSuffix, _ = strings.Cut(mask, "...")
	return d
}

// teamAPIKey is the TeamAPIKey schema; key is set (CreatedTeamAPIKey) only
// in the answer to its creation.
type teamAPIKey struct {
	ID        string      `json:"id"`
	Key       string      `json:"key,omitempty"`
	Name      string      `json:"name"`
	Mask      maskDetails `json:"mask"`
	CreatedAt time.Time   `json:"createdAt"`
	CreatedBy *struct{}   `json:"createdBy"` // warren has teams, not users: always null
	LastUsed  *time.Time  `json:"lastUsed"`
}

func describeKey(k *store.APIKey) teamAPIKey {
	return teamAPIKey{
		ID: k.ID, Name: k.Name, Mask: parseMask(k.Mask), CreatedAt: k.CreatedAt.UTC(), LastUsed: utcPtr(k.LastUsedAt),
	}
}

func (s *server) listAPIKeys(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	keys, err := s.store.ListAPIKeys(r.Context(), team.ID)
	if err != nil {
		return fmt.Errorf("list API keys of team %s: %w", team.ID, err)
	}
	out := make([]teamAPIKey, 0, len(keys))
	for _, k := range keys {
		out = append(out, describeKey(k))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// createAPIKey makes a key for the caller's team and returns its text, the
// only time it is ever shown: only its hash is stored.
func (s *server) createAPIKey(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Name *string `json:"name"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Name == nil || strings.TrimSpace(*body.Name) == "" {
		return badRequest("Field \"name\" is required")
	}
	raw, err := apikey.New()
	if err != nil {
		return err
	}
	id, err := newUUID()
	if err != nil {
		return err
	}
	k := &store.APIKey{
		ID: id, TeamID: team.ID, Name: strings.TrimSpace(*body.Name), Hash: apikey.Hash(raw), Mask: apikey.Mask(raw),
		CreatedAt: time.Now().UTC(),
	}
	if err := s.store.CreateAPIKey(r.Context(), k); err != nil {
		return fmt.Errorf("create API key: %w", err)
	}
	out := describeKey(k)
	out.Key = raw
	writeJSON(w, http.StatusCreated, out)
	return nil
}

func (s *server) deleteAPIKey(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	id := r.PathValue("apiKeyID")
	err := s.store.DeleteAPIKey(r.Context(), team.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return &apiError{status: http.StatusNotFound, message: fmt.Sprintf("API key %q doesn't exist or you don't have access to it", id)}
	}
	if err != nil {
		return fmt.Errorf("delete API key %s: %w", id, err)
	}
	s.forgetTouch(id)
	writeEmpty(w, http.StatusNoContent)
	return nil
}
