// Package apikey makes and checks E2B-style API keys: "e2b_" + 40 lowercase
// hex characters (20 random bytes). Only a key's hash is ever stored.
package apikey

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
)

// Prefix starts every key; SDKs up to 2.45 reject keys of another shape.
const Prefix = "e2b_"

var pattern = regexp.MustCompile(`^e2b_[0-9a-f]{40}$`)

// New returns a fresh random key.
func New() (string, error) {
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate API key: %w", err)
	}
	return Prefix + hex.EncodeToString(b), nil
}

// Valid reports whether raw has the shape of a key warren issues.
func Valid(raw string) bool { return pattern.MatchString(raw) }

// Hash is how a key is stored and looked up: the hex SHA-256 of its text.
func Hash(raw string) string {
	sum := sha256.Sum256([]byte(raw))
	return hex.EncodeToString(sum[:])
}

// Mask is the part of a valid key that may be shown again: the prefix and
// the first and last four characters of its value.
func Mask(raw string) string {
	value := raw[len(Prefix):]
	return Prefix + value[:4] + "..." + value[len(value)-4:]
}
