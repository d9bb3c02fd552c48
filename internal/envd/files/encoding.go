package files

import (
	"strconv"
	"strings"
)

// acceptedCodings are the qualities an Accept-Encoding header gives the two
// codings /files can answer with; 0 means refused.
type acceptedCodings struct {
	identity float64
	gzip     float64
	other    float64 // best quality of any other compression named, "*" included
}

// parseAcceptEncoding reads an Accept-Encoding header (RFC 9110 §12.5.3):
// identity is acceptable unless refused explicitly or through "*;q=0"; gzip
// only when listed, by name or through "*". Elements with a malformed q are
// ignored.
func parseAcceptEncoding(header string) acceptedCodings {
	var identity, gzip, star *float64
	var other float64
	for _, elem := range strings.Split(header, ",") {
		name, params, _ := strings.Cut(elem, ";")
		name = strings.ToLower(strings.TrimSpace(name))
		if name == "" {
			continue
		}
		q, ok := quality(params)
		if !ok {
			continue
		}
		switch name {
		case "identity":
			identity = &q
		case "gzip", "x-gzip":
			gzip = &q
		case "*":
			star = &q
			other = max(other, q)
		default:
			other = max(other, q)
		}
	}
	acc := acceptedCodings{identity: 1, other: other}
	switch {
	case identity != nil:
		acc.identity = *identity
	case star != nil:
		acc.identity = *star
	}
	switch {
	case gzip != nil:
		acc.gzip = *gzip
	case star != nil:
		acc.gzip = *star
	}
	return acc
}

// quality returns the q parameter of one Accept-Encoding element (1 when
// absent) and false when it is not a number between 0 and 1.
func quality(params string) (float64, bool) {
	for _, p := range strings.Split(params, ";") {
		k, v, _ := strings.Cut(strings.TrimSpace(p), "=")
		if !strings.EqualFold(strings.TrimSpace(k), "q") {
			continue
		}
		q, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || q < 0 || q > 1 {
			return 0, false
		}
		return q, true
	}
	return 1, true
}

// none reports whether the client refuses both codings.
func (a acceptedCodings) none() bool { return a.identity <= 0 && a.gzip <= 0 }

// preferGzip reports whether to answer with gzip: when identity is refused, or
// when the client names gzip as its single favourite compression. The SDK sends
// exactly "gzip" when the user asks for compressed reads, while fetch's automatic
// "gzip, deflate" (and browsers' "gzip, deflate, br") leave the choice to us, and
// identity is the cheap answer for a local file: compressing costs a core and
// makes loopback downloads 3-4x slower.
func (a acceptedCodings) preferGzip() bool {
	if a.gzip <= 0 {
		return false
	}
	return a.identity <= 0 || (a.gzip >= a.identity && a.gzip > a.other)
}
