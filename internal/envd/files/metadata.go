package files

import (
	"maps"
	"net/http"
	"slices"
	"strings"
)

// Metadata limits (ENVD.md §8). A key becomes the xattr name "user.e2b.<key>",
// and Linux caps xattr names at 255 bytes: 255 - len("user.e2b.") = 246.
const (
	metadataHeaderPrefix = "X-Metadata-"
	xattrPrefix          = "user.e2b."
	maxMetadataKey       = 246
	maxMetadataTotal     = 4096
)

// parseMetadata collects the X-Metadata-<key> headers of an upload into
// lowercased key → value. A repeated header counts with its first value; an
// empty key is ignored. It fails with a 400 naming the offending header when a
// key or value is not printable ASCII or the limits are exceeded.
func parseMetadata(h http.Header) (map[string]string, error) {
	md := map[string]string{}
	total := 0
	// Sorted, so the outcome does not depend on map order.
	for _, name := range slices.Sorted(maps.Keys(h)) {
		values := h[name]
		if len(name) < len(metadataHeaderPrefix) || !strings.EqualFold(name[:len(metadataHeaderPrefix)], metadataHeaderPrefix) {
			continue
		}
		key := strings.ToLower(name[len(metadataHeaderPrefix):])
		if key == "" || len(values) == 0 {
			continue
		}
		value := values[0]
		if !printableASCII(key) {
			return nil, errorf(http.StatusBadRequest, "metadata key %q: only printable ASCII (0x20-0x7E) is allowed", key)
		}
		if !printableASCII(value) {
			return nil, errorf(http.StatusBadRequest, "metadata value of key %q: only printable ASCII (0x20-0x7E) is allowed", key)
		}
		if len(key) > maxMetadataKey {
			return nil, errorf(http.StatusBadRequest, "metadata key %q is %d bytes, at most %d are allowed", key, len(key), maxMetadataKey)
		}
		// Headers differing only in case name one key; the first seen wins.
		if _, dup := md[key]; dup {
			continue
		}
		md[key] = value
		total += len(key) + len(value)
	}
	if total > maxMetadataTotal {
		return nil, errorf(http.StatusBadRequest, "metadata is %d bytes (keys and values), at most %d are allowed per file", total, maxMetadataTotal)
	}
	return md, nil
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
