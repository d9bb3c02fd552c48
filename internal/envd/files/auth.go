package files

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Signing operations: the op field of a signature (ENVD.md §9).
const (
	opRead  = "read"
	opWrite = "write"
)

// unauthorizedMessage is the token middleware's message in package envd; a
// wrong X-Access-Token on /files reads the same.
const unauthorizedMessage = "unauthorized access, please provide a valid access token or method signing if supported"

// authorize lets a request through when no token is set, when its
// X-Access-Token is the token, or, without that header, when its URL carries a
// valid, unexpired signature for op.
func (h *Handler) authorize(r *http.Request, op string) error {
	token := h.state.AccessToken()
	if token == "" {
		return nil
	}
	// A token header decides alone: a wrong token is not rescued by a signature.
	if r.Header.Get("X-Access-Token") != "" {
		if !h.state.TokenMatches(r.Header.Get("X-Access-Token")) {
			return errors.New(unauthorizedMessage)
		}
		return nil
	}
	q := r.URL.Query()
	if !q.Has("signature") {
		return errors.New("missing signature query parameter")
	}
	var expiration *string
	if q.Has("signature_expiration") {
		e := q.Get("signature_expiration")
		expiration = &e
	}
	want := signature(q.Get("path"), op, q.Get("username"), token, expiration)
	if subtle.ConstantTimeCompare([]byte(want), []byte(q.Get("signature"))) != 1 {
		return errors.New("invalid signature")
	}
	if expiration != nil {
		exp, err := strconv.ParseInt(*expiration, 10, 64)
		if err != nil {
			return fmt.Errorf("invalid signature_expiration '%s': want unix seconds", *expiration)
		}
		// The SDK test asserts this exact message.
		if exp < time.Now().Unix() {
			return errors.New("signature is already expired")
		}
	}
	return nil
}

// signature is the URL signature the SDK computes for downloadUrl/uploadUrl:
// "v1_" + unpadded base64 of sha256(path:op:username:token[:expiration]).
// path is the query value as the client sent it, not the resolved path.
func signature(path, op, username, token string, expiration *string) string {
	parts := []string{path, op, username, token}
	if expiration != nil {
		parts = append(parts, *expiration)
	}
	sum := sha256.Sum256([]byte(strings.Join(parts, ":")))
	return "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
}
