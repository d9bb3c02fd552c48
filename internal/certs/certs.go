// Package certs provides the TLS configuration of warren's listener: a
// persistent private CA with a leaf certificate for api.<domain>, *.<domain>
// and localhost (README mode B without a public certificate), or a
// certificate pair from files.
//
// SelfSigned keeps in its directory:
//
//	ca.pem      the CA certificate users trust (NODE_EXTRA_CA_CERTS=<dir>/ca.pem)
//	ca-key.pem  the CA key (0600), made once
//	cert.pem    the leaf certificate, re-issued when its names change or it nears expiry
//	key.pem     the leaf key (0600)
package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// File names inside SelfSigned's directory.
const (
	CAFile      = "ca.pem"
	caKeyFile   = "ca-key.pem"
	leafFile    = "cert.pem"
	leafKeyFile = "key.pem"
)

const (
	caValidity = 10 * 365 * 24 * time.Hour
	// leafValidity stays under the 398 days browsers and Apple platforms
	// accept for a server certificate.
	leafValidity = 397 * 24 * time.Hour
	// renewBefore re-issues a leaf that would expire within this window.
	renewBefore = 30 * 24 * time.Hour
)

// SelfSigned returns a TLS configuration serving a leaf certificate for
// api.<domain>, *.<domain> (when domain is set), localhost, 127.0.0.1, ::1 and
// hosts (names or IP addresses), signed by a CA kept in dir; caPath is the CA
// certificate clients should trust. The CA is made once; the leaf is re-issued
// when the names change or it expires within 30 days.
func SelfSigned(dir, domain string, hosts []string) (_ *tls.Config, caPath string, _ error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("create certificate directory: %w", err)
	}
	ca, caKey, err := loadOrCreateCA(dir)
	if err != nil {
		return nil, "", err
	}
	dnsNames, ips := leafNames(domain, hosts)
	leaf, err := loadLeaf(dir, ca, dnsNames, ips)
	if err != nil {
		if leaf, err = issueLeaf(dir, ca, caKey, dnsNames, ips); err != nil {
			return nil, "", err
		}
	}
	return serverConfig(leaf), filepath.Join(dir, CAFile), nil
}

// FromFiles returns a TLS configuration serving the PEM certificate chain in
// certFile with the key in keyFile (e.g. a public wildcard certificate).
func FromFiles(certFile, keyFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load TLS certificate %s with key %s: %w", certFile, keyFile, err)
	}
	return serverConfig(cert), nil
}

// serverConfig offers h2 first so Node's SDK multiplexes its streams over
// one connection.
func serverConfig(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2", "http/1.1"},
		MinVersion:   tls.VersionTLS12,
	}
}

// leafNames are the names a leaf certificate must carry, sorted and
// deduplicated so they compare with an existing certificate's.
func leafNames(domain string, hosts []string) (dnsNames []string, ips []net.IP) {
	names := []string{"localhost"}
	if domain = strings.TrimSuffix(strings.ToLower(domain), "."); domain != "" {
		names = append(names, "api."+domain, "*."+domain)
	}
	addrs := []string{"127.0.0.1", "::1"}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			addrs = append(addrs, ip.String())
		} else if h != "" {
			names = append(names, strings.ToLower(h))
		}
	}
	slices.Sort(names)
	slices.Sort(addrs)
	for _, a := range slices.Compact(addrs) {
		ips = append(ips, net.ParseIP(a))
	}
	return slices.Compact(names), ips
}

func loadOrCreateCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPath, keyPath := filepath.Join(dir, CAFile), filepath.Join(dir, caKeyFile)
	cert, key, err := loadPair(certPath, keyPath)
	if err == nil {
		return cert, key, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		// A damaged CA is not silently replaced: users trust the one on disk.
		return nil, nil, fmt.Errorf("load CA (remove %s and %s to make a new one): %w", certPath, keyPath, err)
	}
	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serialNumber(),
		Subject:               pkix.Name{CommonName: "warren local CA", Organization: []string{"warren"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CA certificate: %w", err)
	}
	// Key first: a certificate without its key would be taken for a damaged CA.
	if err := writeKey(keyPath, key); err != nil {
		return nil, nil, err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	cert, err = x509.ParseCertificate(der)
	return cert, key, err
}

// loadLeaf returns the stored leaf when it is signed by ca, carries exactly
// the wanted names and is not about to expire.
func loadLeaf(dir string, ca *x509.Certificate, dnsNames []string, ips []net.IP) (tls.Certificate, error) {
	cert, key, err := loadPair(filepath.Join(dir, leafFile), filepath.Join(dir, leafKeyFile))
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := cert.CheckSignatureFrom(ca); err != nil {
		return tls.Certificate{}, fmt.Errorf("leaf not signed by the CA: %w", err)
	}
	if time.Until(cert.NotAfter) < renewBefore {
		return tls.Certificate{}, errors.New("leaf expires soon")
	}
	if !slices.Equal(cert.DNSNames, dnsNames) || !slices.EqualFunc(cert.IPAddresses, ips, net.IP.Equal) {
		return tls.Certificate{}, errors.New("leaf names changed")
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw, ca.Raw}, PrivateKey: key, Leaf: cert}, nil
}

func issueLeaf(dir string, ca *x509.Certificate, caKey crypto.Signer, dnsNames []string, ips []net.IP) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate TLS key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serialNumber(),
		Subject:      pkix.Name{CommonName: dnsNames[0], Organization: []string{"warren"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("create TLS certificate: %w", err)
	}
	if err := writeKey(filepath.Join(dir, leafKeyFile), key); err != nil {
		return tls.Certificate{}, err
	}
	if err := writePEM(filepath.Join(dir, leafFile), "CERTIFICATE", der, 0o644); err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// loadPair reads a PEM certificate and its PKCS#8 key.
func loadPair(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
	certDER, err := readPEM(certPath, "CERTIFICATE")
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := readPEM(keyPath, "PRIVATE KEY")
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, nil, fmt.Errorf("parse %s: %w", certPath, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return nil, nil, fmt.Errorf("parse %s: %w", keyPath, err)
	}
	key, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%s: %T is not a signing key", keyPath, k)
	}
	return cert, key, nil
}

func readPEM(path, blockType string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(raw)
	if block == nil || block.Type != blockType {
		return nil, fmt.Errorf("%s: no PEM %s block", path, blockType)
	}
	return block.Bytes, nil
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode key for %s: %w", path, err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// writePEM replaces path atomically, so a crash never leaves half a file.
func writePEM(path, blockType string, der []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := pem.Encode(tmp, &pem.Block{Type: blockType, Bytes: der}); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// serialNumber is a random 128-bit certificate serial.
func serialNumber() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // crypto/rand does not fail on Linux
	}
	return n
}
