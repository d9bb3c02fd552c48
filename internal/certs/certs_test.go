package certs

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// trust returns a pool with the CA certificate at caPath, as a client given
// NODE_EXTRA_CA_CERTS would have it.
func trust(t *testing.T, caPath string) *x509.CertPool {
	t.Helper()
	raw, err := os.ReadFile(caPath)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(raw) {
		t.Fatalf("%s holds no PEM certificate", caPath)
	}
	return pool
}

// verifies reports whether cfg's certificate is valid for name under roots.
func verifies(t *testing.T, cfg *tls.Config, roots *x509.CertPool, name string) error {
	t.Helper()
	chain := cfg.Certificates[0].Certificate
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		t.Fatal(err)
	}
	_, err = leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	return err
}

func TestSelfSignedNames(t *testing.T) {
	dir := t.TempDir()
	cfg, caPath, err := SelfSigned(dir, "sbx.example.test", []string{"warren.lan", "192.0.2.10"})
	if err != nil {
		t.Fatal(err)
	}
	if caPath != filepath.Join(dir, "ca.pem") {
		t.Errorf("caPath %s", caPath)
	}
	roots := trust(t, caPath)
	for _, name := range []string{"api.sbx.example.test", "49983-abc123.sbx.example.test", "localhost", "127.0.0.1", "::1", "warren.lan", "192.0.2.10"} {
		if err := verifies(t, cfg, roots, name); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, name := range []string{"a.b.sbx.example.test", "example.test", "other.test"} {
		if err := verifies(t, cfg, roots, name); err == nil {
			t.Errorf("%s: accepted, want refused", name)
		}
	}
	if got := cfg.NextProtos; len(got) != 2 || got[0] != "h2" || got[1] != "http/1.1" {
		t.Errorf("NextProtos %v, want [h2 http/1.1]", got)
	}
}

func TestSelfSignedFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if _, _, err := SelfSigned(dir, "sbx.example.test", nil); err != nil {
		t.Fatal(err)
	}
	for name, mode := range map[string]os.FileMode{"ca.pem": 0o644, "ca-key.pem": 0o600, "cert.pem": 0o644, "key.pem": 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), mode)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		t.Errorf("%d files in %s, want 4 (no temporary files left)", len(entries), dir)
	}
}

func TestSelfSignedReuseAndReissue(t *testing.T) {
	dir := t.TempDir()
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, _, err := SelfSigned(dir, "one.test", nil); err != nil {
		t.Fatal(err)
	}
	ca, leaf := read("ca.pem"), read("cert.pem")

	t.Run("same names keep CA and leaf", func(t *testing.T) {
		if _, _, err := SelfSigned(dir, "one.test", nil); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(read("ca.pem"), ca) || !bytes.Equal(read("cert.pem"), leaf) {
			t.Error("certificates changed although the names did not")
		}
	})
	t.Run("new domain re-issues the leaf under the same CA", func(t *testing.T) {
		cfg, caPath, err := SelfSigned(dir, "two.test", nil)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(read("ca.pem"), ca) {
			t.Fatal("CA changed: users would have to trust a new one")
		}
		if bytes.Equal(read("cert.pem"), leaf) {
			t.Fatal("leaf kept its old names")
		}
		roots := trust(t, caPath)
		if err := verifies(t, cfg, roots, "49983-x.two.test"); err != nil {
			t.Errorf("new domain: %v", err)
		}
		if err := verifies(t, cfg, roots, "49983-x.one.test"); err == nil {
			t.Error("old domain still accepted")
		}
	})
	t.Run("extra host re-issues the leaf", func(t *testing.T) {
		before := read("cert.pem")
		cfg, caPath, err := SelfSigned(dir, "two.test", []string{"10.1.2.3"})
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(read("cert.pem"), before) {
			t.Fatal("leaf not re-issued")
		}
		if err := verifies(t, cfg, trust(t, caPath), "10.1.2.3"); err != nil {
			t.Error(err)
		}
	})
	t.Run("a leaf near expiry is re-issued", func(t *testing.T) {
		before := read("cert.pem")
		// Replace the leaf with one (validly signed) that expires in a week.
		caCert, caKey, err := loadPair(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		short := shortLivedCopy(t, dir, caCert, caKey, 7*24*time.Hour)
		if _, _, err := SelfSigned(dir, "two.test", []string{"10.1.2.3"}); err != nil {
			t.Fatal(err)
		}
		if now := read("cert.pem"); bytes.Equal(now, short) || bytes.Equal(now, before) {
			t.Error("leaf expiring within 30 days was kept")
		}
	})
	t.Run("a damaged CA is an error, not silently replaced", func(t *testing.T) {
		if err := os.WriteFile(filepath.Join(dir, "ca.pem"), []byte("garbage"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := SelfSigned(dir, "two.test", nil)
		if err == nil || !strings.Contains(err.Error(), "remove") {
			t.Errorf("err %v, want a load error saying what to remove", err)
		}
	})
}

// shortLivedCopy rewrites cert.pem in dir as a certificate with the same
// names and key that expires after ttl, and returns its PEM.
func shortLivedCopy(t *testing.T, dir string, ca *x509.Certificate, caKey crypto.Signer, ttl time.Duration) []byte {
	t.Helper()
	cert, key, err := loadPair(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := *cert
	tmpl.NotAfter = time.Now().Add(ttl)
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(filepath.Join(dir, "cert.pem"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestFromFiles(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := SelfSigned(dir, "files.test", nil); err != nil {
		t.Fatal(err)
	}
	cfg, err := FromFiles(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if err := verifies(t, cfg, trust(t, filepath.Join(dir, "ca.pem")), "api.files.test"); err != nil {
		t.Error(err)
	}
	if _, err := FromFiles(filepath.Join(dir, "missing.pem"), filepath.Join(dir, "key.pem")); err == nil ||
		!strings.Contains(err.Error(), "missing.pem") {
		t.Errorf("missing file: err %v, want one naming the file", err)
	}
}

// TestHandshakeNegotiatesH2 runs a real TLS handshake, as Node would: it
// trusts ca.pem, names a sandbox host and offers h2 and http/1.1.
func TestHandshakeNegotiatesH2(t *testing.T) {
	cfg, caPath, err := SelfSigned(t.TempDir(), "sbx.example.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			err = c.(*tls.Conn).Handshake()
			c.Close()
		}
		done <- err
	}()
	conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		RootCAs:    trust(t, caPath),
		ServerName: "49983-abc.sbx.example.test",
		NextProtos: []string{"h2", "http/1.1"},
	})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Errorf("negotiated %q, want h2", p)
	}
	if err := <-done; err != nil {
		t.Errorf("server handshake: %v", err)
	}
}
