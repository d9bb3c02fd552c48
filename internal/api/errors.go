package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/warren-sh/warren/internal/control"
)

// apiError is a failure found by the API layer itself (a bad parameter, a
// body too large); its message is shown to the client.
type apiError struct {
	status  int
	message string
}

func (e *apiError) Error() string { return e.message }

// badRequest is a 400 whose message names the bad value.
func badRequest(format string, args ...any) error {
	return &apiError{status: http.StatusBadRequest, message: fmt.Sprintf(format, args...)}
}

// errorBody is E2B's Error schema. The SDK decides kill → false and the
// like from code in the body, not from the status line, so both always agree.
type errorBody struct {
	Code      int    `json:"code"`
	Message   string `json:"message"`
	ErrorCode string `json:"error_code,omitempty"`
}

// writeError writes an error body with the given status.
func writeError(w http.ResponseWriter, status int, message string) {
	writeJSON(w, status, errorBody{Code: status, Message: message})
}

// writeFailure turns any handler error into E2B's error body: the
// controller's kinds map to their statuses, unexpected errors are logged and
// answered 500 without their details.
func (s *server) writeFailure(w http.ResponseWriter, r *http.Request, err error) {
	body, retryAfter := s.failureBody(r, err)
	if retryAfter > 0 {
		// The SDK retries a 429 only when Retry-After is whole seconds.
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(retryAfter.Seconds())))))
	}
	writeJSON(w, body.Code, body)
}

// failureBody is the error body (with code = the HTTP status) for a handler
// error, and how long a rate-limited client should wait. Fork results carry
// the same bodies per fork.
func (s *server) failureBody(r *http.Request, err error) (errorBody, time.Duration) {
	var (
		ce *control.Error
		ae *apiError
		me *http.MaxBytesError
	)
	switch {
	case errors.As(err, &ae):
		return errorBody{Code: ae.status, Message: ae.message}, 0
	case errors.As(err, &me):
		return errorBody{Code: http.StatusRequestEntityTooLarge, Message: tooLargeMessage(me.Limit)}, 0
	case errors.As(err, &ce):
		body := errorBody{Message: ce.Message}
		switch ce.Kind {
		case control.Invalid:
			body.Code = http.StatusBadRequest
		case control.NotFound:
			body.Code = http.StatusNotFound
		case control.Conflict:
			body.Code = http.StatusConflict
		case control.LimitReached:
			body.Code = http.StatusTooManyRequests
			return body, max(ce.RetryAfter, time.Second)
		case control.Unavailable:
			body.Code = http.StatusServiceUnavailable
			body.ErrorCode = "sandbox_capacity_unavailable"
		default:
			s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			body.Code, body.ErrorCode = http.StatusInternalServerError, "internal_server_error"
		}
		return body, 0
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		return errorBody{
			Code: http.StatusInternalServerError, Message: "Internal server error", ErrorCode: "internal_server_error",
		}, 0
	}
}

func tooLargeMessage(limit int64) string {
	return fmt.Sprintf("Request body is larger than %d bytes", limit)
}

// writeJSON writes v as the body with an exact Content-Length.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"code":500,"message":"encode response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

// writeEmpty answers without a body. Any status but 204 says Content-Length:
// 0, or the SDK's fetch wrapper tries to parse JSON and fails with
// "Unexpected end of JSON input".
func writeEmpty(w http.ResponseWriter, status int) {
	if status != http.StatusNoContent {
		w.Header().Set("Content-Length", "0")
	}
	w.WriteHeader(status)
}
