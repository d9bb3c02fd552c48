// Package column converts between store values and what both SQL backends keep
// in their columns, so SQLite and Postgres round times and encode maps alike.
package column

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/warren-sh/warren/internal/store"
)

// Round is t as a store keeps it: UTC, to the microsecond (Postgres keeps no
// more, and SQLite is held to the same so both backends answer alike).
func Round(t time.Time) time.Time {
	return t.UTC().Truncate(time.Microsecond)
}

// RoundPtr is Round for optional times.
func RoundPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	r := Round(*t)
	return &r
}

// EncodeMap is m as a JSON object; nil is stored as {} like an empty map.
// HTML characters stay unescaped so the text reads as it was given.
func EncodeMap(m map[string]string) (string, error) {
	if len(m) == 0 {
		return "{}", nil
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		return "", fmt.Errorf("encode map: %w", err)
	}
	return string(bytes.TrimSuffix(b.Bytes(), []byte("\n"))), nil
}

// DecodeMap reads a JSON object into a map that is never nil.
func DecodeMap(b []byte) (map[string]string, error) {
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("decode map %q: %w", b, err)
	}
	if m == nil { // the JSON was null
		m = map[string]string{}
	}
	return m, nil
}

// The Normalize functions make a value what a store hands back for it: times
// rounded, nil maps empty. Create and update methods apply them to their
// argument in place, so the caller holds what a later Get returns.

// NormalizeTeam normalizes t in place.
func NormalizeTeam(t *store.Team) { t.CreatedAt = Round(t.CreatedAt) }

// NormalizeAPIKey normalizes k in place.
func NormalizeAPIKey(k *store.APIKey) {
	k.CreatedAt = Round(k.CreatedAt)
	k.LastUsedAt = RoundPtr(k.LastUsedAt)
}

// NormalizeTemplate normalizes t in place.
func NormalizeTemplate(t *store.Template) {
	t.CreatedAt = Round(t.CreatedAt)
	t.UpdatedAt = Round(t.UpdatedAt)
	t.LastSpawnedAt = RoundPtr(t.LastSpawnedAt)
}

// NormalizeBuild normalizes b in place.
func NormalizeBuild(b *store.Build) {
	b.CreatedAt = Round(b.CreatedAt)
	b.UpdatedAt = Round(b.UpdatedAt)
	b.FinishedAt = RoundPtr(b.FinishedAt)
}

// NormalizeTag normalizes t in place.
func NormalizeTag(t *store.Tag) { t.CreatedAt = Round(t.CreatedAt) }

// NormalizeSandbox normalizes s in place.
func NormalizeSandbox(s *store.Sandbox) {
	s.StartedAt = Round(s.StartedAt)
	s.EndAt = Round(s.EndAt)
	if s.Paused != nil {
		s.Paused.At = Round(s.Paused.At)
	}
	if s.Metadata == nil {
		s.Metadata = map[string]string{}
	}
	if s.EnvVars == nil {
		s.EnvVars = map[string]string{}
	}
}

// PausedArgs is a sandbox's Paused as its columns: paused_key (” when
// not paused), paused_memory, paused_bytes and paused_at.
func PausedArgs(p *store.PausedState) (key string, memory bool, bytes int64, at *time.Time) {
	if p == nil {
		return "", false, 0, nil
	}
	t := Round(p.At)
	return p.Key, p.Memory, p.Bytes, &t
}

// PausedFrom reads the columns PausedArgs writes back into a Paused; nil
// when nothing is saved.
func PausedFrom(key string, memory bool, bytes int64, at *time.Time) *store.PausedState {
	if key == "" {
		return nil
	}
	p := &store.PausedState{Key: key, Memory: memory, Bytes: bytes}
	if at != nil {
		p.At = Round(*at)
	}
	return p
}
