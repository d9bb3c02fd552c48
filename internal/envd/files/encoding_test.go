package files

import "testing"

func TestParseAcceptEncoding(t *testing.T) {
	cases := []struct {
		header   string
		none     bool
		wantGzip bool
	}{
		{"", false, false},
		{"gzip, deflate", false, false}, // fetch's automatic header: our choice, identity
		{"gzip, deflate, br", false, false},
		{"gzip", false, true}, // the SDK with gzip: true
		{"gzip, deflate;q=0.5", false, true},
		{"gzip;q=0.5, identity", false, false},
		{"GZIP", false, true},
		{"x-gzip", false, true},
		{"gzip;q=0", false, false},
		{"br", false, false},
		{"*", false, false},
		{"identity;q=0", true, false},
		{"identity;q=0, br", true, false},
		{"identity;q=0, gzip", false, true},
		{"*;q=0", true, false},
		{"*;q=0, gzip", false, true},
		{"gzip;q=bogus", false, false},
	}
	for _, tc := range cases {
		acc := parseAcceptEncoding(tc.header)
		if acc.none() != tc.none || acc.preferGzip() != tc.wantGzip {
			t.Errorf("Accept-Encoding %q: none %v, gzip %v; want none %v, gzip %v", tc.header, acc.none(), acc.preferGzip(), tc.none, tc.wantGzip)
		}
	}
}
