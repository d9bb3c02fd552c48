// Package reply writes envd's REST answers: JSON bodies and E2B error bodies.
package reply

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
)

// JSON writes v as a JSON body with the given status and an exact Content-Length.
func JSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"code":500,"message":"encode response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

// Error writes E2B's error body {"code":status,"message":...}. The SDK reads the
// message into the exception it raises, so it should say what was wrong.
func Error(w http.ResponseWriter, status int, format string, args ...any) {
	JSON(w, status, struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}{status, fmt.Sprintf(format, args...)})
}
