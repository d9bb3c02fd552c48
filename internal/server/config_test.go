package server

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	good := func() Config {
		return Config{DataDir: "/var/lib/warren", TLS: "off", VMAccel: "auto", MaxLifetime: time.Hour}
	}
	cases := []struct {
		name    string
		change  func(*Config)
		wantErr string // empty: valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"self-signed", func(c *Config) { c.TLS = "self-signed"; c.Domain = "sbx.example.com" }, ""},
		{"files", func(c *Config) { c.TLS = "files"; c.TLSCert, c.TLSKey = "c.pem", "k.pem" }, ""},
		{"files without key", func(c *Config) { c.TLS = "files"; c.TLSCert = "c.pem" }, "--tls files needs --tls-cert and --tls-key"},
		{"unknown tls", func(c *Config) { c.TLS = "acme" }, `--tls "acme" is not one of off, self-signed, files`},
		{"unknown accel", func(c *Config) { c.VMAccel = "hvf" }, `--vm-accel "hvf" is not one of auto, kvm, tcg`},
		{"transfer disk", func(c *Config) { c.TransferDiskMB = 4096 }, ""},
		{"transfer disk too small", func(c *Config) { c.TransferDiskMB = 1 }, "--transfer-disk-mb 1: at least 8"},
		{"no data dir", func(c *Config) { c.DataDir = "" }, "--data-dir is empty"},
		{"zero lifetime", func(c *Config) { c.MaxLifetime = 0 }, "--max-sandbox-lifetime must be positive"},
		{"negative limit", func(c *Config) { c.MaxSandboxes = -1 }, "cannot be negative"},
		{"negative shutdown timeout", func(c *Config) { c.ShutdownTimeout = -time.Second }, "--shutdown-timeout cannot be negative"},
		{"domain with scheme", func(c *Config) { c.Domain = "https://x.example" }, "must be a bare DNS name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := good()
			c.change(&cfg)
			err := cfg.Validate()
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, c.wantErr)
			}
		})
	}
}

func TestHostNameservers(t *testing.T) {
	conf := "# comment\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nsearch example\nnameserver ::1\nnameserver 2001:db8::53\nnameserver bogus\n"
	got := strings.Join(HostNameservers(conf), ",")
	if want := "10.255.255.53,2001:db8::53"; got != want {
		t.Fatalf("HostNameservers = %q, want %q", got, want)
	}
}

func TestConfigRejectsLoopbackDNS(t *testing.T) {
	cfg := Config{DataDir: "/d", TLS: "off", VMAccel: "auto", MaxLifetime: time.Hour, SandboxDNS: []string{"127.0.0.53"}}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--sandbox-dns") {
		t.Fatalf("Validate = %v, want a --sandbox-dns error", err)
	}
}
