// Package filesig computes the signatures of envd's signed /files URLs
// (ENVD.md §9). The agent checks them; the proxy uses them to find which
// sandbox a signed URL without routing headers belongs to.
package filesig

import (
	"crypto/sha256"
	"encoding/base64"
	"strings"
)

// Operations a signature grants: the op field of the signed string.
const (
	OpRead  = "read"  // GET /files
	OpWrite = "write" // POST /files
)

// Sign is the URL signature the SDK computes for downloadUrl/uploadUrl:
// "v1_" + unpadded base64 of sha256(path:op:username:token[:expiration]).
// path is the query value as the client sent it, not the resolved path;
// an empty expiration means the URL does not expire and adds no field.
func Sign(path, op, username, token, expiration string) string {
	parts := []string{path, op, username, token}
	if expiration != "" {
		parts = append(parts, expiration)
	}
	sum := sha256.Sum256([]byte(strings.Join(parts, ":")))
	return "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
}
