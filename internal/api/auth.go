package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/store"
)

// apiKeyHeader is the spec's spelling; the SDK sends X-API-KEY and HTTP/2
// lowercases it, and Go's canonical header lookup matches them all.
const apiKeyHeader = "X-API-Key"

// touchEvery spaces the writes of a key's last use: one per minute is enough
// to tell a used key from an abandoned one, and keeps a busy key from turning
// every read into a write.
const touchEvery = time.Minute

// unauthorized is the 401 the SDK turns into AuthenticationError.
func unauthorized(message string) error {
	return &apiError{status: http.StatusUnauthorized, message: message}
}

// authenticate returns the team whose API key the request carries.
func (s *server) authenticate(r *http.Request) (*store.Team, error) {
	raw := r.Header.Get(apiKeyHeader)
	if raw == "" {
		return nil, unauthorized("Invalid API key: send it in the X-API-Key header")
	}
	ctx := r.Context()
	key, err := s.store.APIKeyByHash(ctx, apikey.Hash(raw))
	if errors.Is(err, store.ErrNotFound) {
		return nil, unauthorized("Invalid API key")
	}
	if err != nil {
		return nil, fmt.Errorf("look up API key: %w", err)
	}
	team, err := s.store.GetTeam(ctx, key.TeamID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, unauthorized("Invalid API key")
	}
	if err != nil {
		return nil, fmt.Errorf("look up team of API key %s: %w", key.ID, err)
	}
	s.touch(ctx, key)
	return team, nil
}

// touch records a key's use at most once per touchEvery. It writes in the
// request (no goroutine to own) because it writes so rarely.
func (s *server) touch(ctx context.Context, key *store.APIKey) {
	now := time.Now()
	if key.LastUsedAt != nil && now.Sub(*key.LastUsedAt) < touchEvery {
		return
	}
	s.touchMu.Lock()
	if now.Sub(s.touched[key.ID]) < touchEvery {
		s.touchMu.Unlock()
		return
	}
	s.touched[key.ID] = now
	s.touchMu.Unlock()
	// A failed touch must not fail the request it rides on.
	if err := s.store.TouchAPIKey(context.WithoutCancel(ctx), key.ID, now); err != nil {
		s.log.Warn("record API key use", "key", key.ID, "err", err)
	}
}

// forgetTouch drops a deleted key from the touch record.
func (s *server) forgetTouch(id string) {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	delete(s.touched, id)
}

// newUUID returns a random (version 4) UUID.
func newUUID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate ID: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}
