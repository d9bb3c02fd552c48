package files

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/warren-sh/warren/internal/envd/filesig"
)

// Signing operations: the op field of a signature (ENVD.md §9).
const (
	opRead  = filesig.OpRead
	opWrite = filesig.OpWrite
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
	expiration := q.Get("signature_expiration")
	want := filesig.Sign(q.Get("path"), op, q.Get("username"), token, expiration)
	if subtle.ConstantTimeCompare([]byte(want), []byte(q.Get("signature"))) != 1 {
		return errors.New("invalid signature")
	}
	if q.Has("signature_expiration") {
		exp, err := strconv.ParseInt(expiration, 10, 64)
		if err != nil {
			return fmt.Errorf("invalid signature_expiration '%s': want unix seconds", expiration)
		}
		// The SDK test asserts this exact message.
		if exp < time.Now().Unix() {
			return errors.New("signature is already expired")
		}
	}
	return nil
}
