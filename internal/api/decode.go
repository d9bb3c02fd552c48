package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// decodeBody reads a JSON object into v. An empty body leaves v as it is
// (every field absent); unknown fields are ignored because clients send keys
// newer than ours. Errors are 400s that name the field, or 413.
func decodeBody(r *http.Request, v any) error {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var me *http.MaxBytesError
		if errors.As(err, &me) {
			return err
		}
		return badRequest("Read request body: %v", err)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return nil
	}
	err = json.Unmarshal(body, v)
	var (
		syntax *json.SyntaxError
		typ    *json.UnmarshalTypeError
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &syntax):
		return badRequest("Request body is not valid JSON: %v (at byte %d)", syntax, syntax.Offset)
	case errors.As(err, &typ) && typ.Field == "":
		return badRequest("Request body must be a JSON object, not %s", typ.Value)
	case errors.As(err, &typ):
		return badRequest("Field %q: want %s, got %s", typ.Field, jsonTypeName(typ.Type.String()), typ.Value)
	default:
		return badRequest("Request body is not valid: %v", err)
	}
}

// jsonTypeName says a Go type the way a JSON client thinks of it.
func jsonTypeName(goType string) string {
	goType = strings.TrimPrefix(goType, "*")
	switch {
	case strings.HasPrefix(goType, "map["), strings.HasPrefix(goType, "struct"):
		return "an object"
	case strings.HasPrefix(goType, "[]"):
		return "an array"
	case strings.HasPrefix(goType, "int"):
		return "an integer (32-bit)"
	case goType == "bool":
		return "a boolean"
	case goType == "string":
		return "a string"
	}
	return goType
}

// queryInt parses an optional integer query parameter within [lo, hi].
func queryInt(q url.Values, name string, def, lo, hi int64) (int64, error) {
	raw := q.Get(name)
	if raw == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, badRequest("Query parameter %q must be an integer from %d to %d, not %q", name, lo, hi, raw)
	}
	return n, nil
}

// pageLimit is the paginationLimit parameter: 1..100, default 100.
func pageLimit(q url.Values) (int, error) {
	n, err := queryInt(q, "limit", 100, 1, 100)
	return int(n), err
}

// cursor is a position in a listing ordered by time then ID; clients see it
// only as the opaque X-Next-Token / nextToken.
type cursor struct {
	at time.Time
	id string
}

// encodeCursor makes the opaque token: base64url("<unix nanos>.<id>").
func encodeCursor(at time.Time, id string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(at.UnixNano(), 10) + "." + id))
}

// decodeCursor reads a nextToken; an empty token is no cursor.
func decodeCursor(token string) (*cursor, error) {
	if token == "" {
		return nil, nil
	}
	bad := badRequest("Invalid nextToken %q: pass the X-Next-Token of the previous page as it was", token)
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return nil, bad
	}
	nanos, id, ok := strings.Cut(string(raw), ".")
	n, err := strconv.ParseInt(nanos, 10, 64)
	if !ok || err != nil || id == "" {
		return nil, bad
	}
	return &cursor{at: time.Unix(0, n).UTC(), id: id}, nil
}

// parseMetadataFilter reads the metadata query parameter: after the usual
// decoding it is itself a query string whose keys and values are URL-encoded
// once more (the SDK encodes each pair, then the pairs, then the parameter).
// Every pair must match exactly.
func parseMetadataFilter(q url.Values) (map[string]string, error) {
	raw := q.Get("metadata")
	if raw == "" {
		return nil, nil
	}
	pairs, err := url.ParseQuery(raw)
	if err != nil {
		return nil, badRequest("Invalid metadata filter %q: want key=value pairs joined by '&': %v", raw, err)
	}
	out := make(map[string]string, len(pairs))
	for k, vs := range pairs {
		key, err := url.QueryUnescape(k)
		if err != nil {
			return nil, badRequest("Invalid metadata filter key %q: %v", k, err)
		}
		value, err := url.QueryUnescape(vs[len(vs)-1])
		if err != nil {
			return nil, badRequest("Invalid metadata filter value %q: %v", vs[len(vs)-1], err)
		}
		out[key] = value
	}
	return out, nil
}
