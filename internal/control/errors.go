package control

import (
	"fmt"
	"time"
)

// Kind classifies a control-plane error; the API turns it into an HTTP status.
type Kind int

// Error kinds, with the HTTP status E2B clients expect for each.
const (
	Invalid      Kind = iota + 1 // 400
	NotFound                     // 404
	Conflict                     // 409
	LimitReached                 // 429 with Retry-After
	Unavailable                  // 503
	Internal                     // 500
)

// Error is a control-plane failure whose message is shown to the client.
type Error struct {
	Kind    Kind
	Message string
	// RetryAfter tells a rate-limited client when to try again.
	RetryAfter time.Duration
}

func (e *Error) Error() string { return e.Message }

func errorf(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Message: fmt.Sprintf(format, args...)}
}

// sandboxNotFound is E2B's message for unknown and other teams' sandboxes.
func sandboxNotFound(id string) *Error {
	return errorf(NotFound, "Sandbox %q doesn't exist or you don't have access to it", id)
}
