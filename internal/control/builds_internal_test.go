package control

import (
	"errors"
	"path/filepath"
	"testing"
	"time"
)

func TestIsBaseImage(t *testing.T) {
	for ref, want := range map[string]bool{
		"e2bdev/base":                   true,
		"e2bdev/base:latest":            true,
		"docker.io/e2bdev/base:1.2":     true,
		"index.docker.io/E2BDEV/BASE":   true,
		"e2bdev/base@sha256:0123abcdef": true,
		"e2bdev/base-extra":             false,
		"python:3.12":                   false,
		"ghcr.io/e2bdev/base":           false,
	} {
		if got := isBaseImage(ref); got != want {
			t.Errorf("isBaseImage(%q) = %v, want %v", ref, got, want)
		}
	}
}

func TestCleanTags(t *testing.T) {
	got, err := cleanTags([]string{" V1 ", "v1", "latest.2", "a_b-c"})
	if err != nil || len(got) != 3 || got[0] != "v1" || got[1] != "latest.2" || got[2] != "a_b-c" {
		t.Fatalf("cleanTags = %q, %v; want [v1 latest.2 a_b-c]", got, err)
	}
	for _, bad := range []string{"", "a b", "a/b", "a:b", "123e4567-e89b-12d3-a456-426614174000", "123e4567e89b12d3a456426614174000"} {
		if _, err := cleanTags([]string{bad}); err == nil {
			t.Errorf("cleanTags(%q) accepted it", bad)
		}
	}
}

func TestUploadTokens(t *testing.T) {
	tm := &Templates{uploadKey: []byte("0123456789abcdef0123456789abcdef")}
	u := Upload{TeamID: "team", TemplateID: "tpl", Hash: "abc123"}
	got, err := tm.VerifyUpload(tm.signUpload(u, time.Now().Add(time.Minute)))
	if err != nil || *got != u {
		t.Fatalf("VerifyUpload(valid) = %+v, %v; want %+v", got, err, u)
	}
	expired := tm.signUpload(u, time.Now().Add(-time.Second))
	other := &Templates{uploadKey: []byte("another key, another warren......")}
	for name, token := range map[string]string{
		"expired":       expired,
		"other key":     other.signUpload(u, time.Now().Add(time.Minute)),
		"no signature":  "dGVhbQ",
		"garbage":       "!!!.???",
		"empty":         "",
		"swapped claim": other.signUpload(u, time.Now().Add(time.Minute))[:10] + expired[10:],
	} {
		if _, err := tm.VerifyUpload(token); !errors.Is(err, ErrBadUploadToken) {
			t.Errorf("VerifyUpload(%s) = %v, want ErrBadUploadToken", name, err)
		}
	}
	// The key survives a restart: it is kept in the data dir.
	path := filepath.Join(t.TempDir(), uploadKeyFile)
	k1, err := loadUploadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := loadUploadKey(path)
	if err != nil || string(k1) != string(k2) || len(k1) != 32 {
		t.Fatalf("upload key not kept: %x then %x (%v)", k1, k2, err)
	}
}
