package server

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/transfer"
)

// Config is everything `warren up` is started with. Every field has a flag
// and a WARREN_* environment variable (see cmd/warren/up.go).
type Config struct {
	// Listen is the address of warren's one listener: API and sandbox traffic.
	Listen string
	// PublicURL is the URL clients use (printed in the E2B_* lines); derived
	// from Listen (and the TLS mode) when empty.
	PublicURL string
	// DataDir holds the store, templates, VMs and keys. Never /tmp.
	DataDir string
	// DatabaseURL selects Postgres (postgres://...); empty means SQLite in DataDir.
	DatabaseURL string
	// Domain enables host routing <port>-<sandboxID>.<Domain> and is reported
	// to clients as the sandboxes' domain.
	Domain string
	// TLS is "off", "self-signed" or "files" (TLSCert and TLSKey).
	TLS              string
	TLSCert, TLSKey  string
	VMAccel          string // auto, kvm or tcg
	GuestASLR        string // auto, on or off (microvm.Config.GuestASLR)
	TransferDiskMB   int    // cold-booted VMs' transfer disk in MiB (microvm.Config.TransferDiskSize); 0 = its default
	Envd             string // the static envd binary for guests
	SlotRange        netip.Prefix
	MaxSandboxes     int           // per team, running at once
	MaxLifetime      time.Duration // per sandbox, from its start
	NodeMaxSandboxes int           // on this host; 0 = derived from memory
	NodeMaxStarting  int           // sandboxes restored at once on this host; 0 = its CPUs
	BootstrapAPIKey  string        // fixes the first API key (e2b_ + 40 hex)
	SandboxDNS       []string      // nameservers for sandboxes' /etc/resolv.conf
	DebianMirror     string
	// BuildConcurrency is how many template builds run at once; the rest
	// wait (0 = 1).
	BuildConcurrency int
	// MetricsListen is the address serving Prometheus metrics at /metrics;
	// empty: none.
	MetricsListen string
	// CodeInterpreter builds the code-interpreter-v1 template
	// (internal/interpreter) in the background after start, unless the
	// current base build's is there already.
	CodeInterpreter bool
	// WarmPool is how many base sandboxes the node keeps restored and
	// frozen for creates to claim (0: none).
	WarmPool int
	// WarmPools sizes the warm pools of other templates, by the name a
	// client of the default team uses (ParseWarmPools); each follows its
	// template's rebuilds.
	WarmPools map[string]int
	// MaxUploadBytes caps one upload of a template build's COPY files (0 =
	// control.DefaultMaxUploadBytes).
	MaxUploadBytes int64
	// TemplateCacheMax bounds what the template build cache keeps beyond
	// what live templates, sandboxes and builds use (template.ParseCacheMax;
	// template.NoCacheLimit: no bound). The zero value keeps only what costs
	// nothing.
	TemplateCacheMax int64
	// ShutdownTimeout bounds, from the signal on, how long the shutdown
	// spends pausing the sandboxes with autoPause; those not paused by then
	// are killed (0 = DefaultShutdownTimeout).
	ShutdownTimeout time.Duration

	// OnBasePool, when set, is called once the base template is ready with
	// a handle on its warm pool: a program running warren in its own
	// process (the bench) resizes the pool while warren runs. Not a flag.
	OnBasePool func(*BasePool)
}

// BasePool is the running warren's warm pool of base sandboxes.
type BasePool struct {
	node *node.Manager
	dir  string // the base build's artifact
}

// Resize sets how many base sandboxes are kept warm; a smaller size kills
// the warm VMs past it before it returns.
func (p *BasePool) Resize(size int) error { return p.node.SetWarmPool(p.dir, size) }

// Ready reports how many warm VMs wait, and the pool's size.
func (p *BasePool) Ready() (ready, size int) { return p.node.WarmPool(p.dir) }

// DefaultShutdownTimeout is Config.ShutdownTimeout unless set: under TCG a
// pause takes about a second plus the time to write the sandbox's RAM, so
// this pauses dozens.
const DefaultShutdownTimeout = 2 * time.Minute

// TLS modes.
var tlsModes = []string{"off", "self-signed", "files"}

// Validate checks the values that flags alone cannot.
func (c *Config) Validate() error {
	if c.DataDir == "" {
		return fmt.Errorf("--data-dir is empty")
	}
	switch c.TLS {
	case "off", "self-signed":
	case "files":
		if c.TLSCert == "" || c.TLSKey == "" {
			return fmt.Errorf("--tls files needs --tls-cert and --tls-key")
		}
	default:
		return fmt.Errorf("--tls %q is not one of %s", c.TLS, strings.Join(tlsModes, ", "))
	}
	switch c.VMAccel {
	case "auto", "kvm", "tcg":
	default:
		return fmt.Errorf("--vm-accel %q is not one of auto, kvm, tcg", c.VMAccel)
	}
	switch c.GuestASLR {
	case "", "auto", "on", "off":
	default:
		return fmt.Errorf("--guest-aslr %q is not one of auto, on, off", c.GuestASLR)
	}
	if min := transfer.MinSize >> 20; c.TransferDiskMB != 0 && c.TransferDiskMB < min {
		return fmt.Errorf("--transfer-disk-mb %d: at least %d", c.TransferDiskMB, min)
	}
	if c.MaxLifetime <= 0 {
		return fmt.Errorf("--max-sandbox-lifetime must be positive, got %s", c.MaxLifetime)
	}
	if c.BuildConcurrency < 0 || c.MaxUploadBytes < 0 || c.WarmPool < 0 {
		return fmt.Errorf("--build-concurrency, --max-upload-mb and --warm-pool cannot be negative")
	}
	if c.ShutdownTimeout < 0 {
		return fmt.Errorf("--shutdown-timeout cannot be negative, got %s", c.ShutdownTimeout)
	}
	if c.MaxSandboxes < 0 || c.NodeMaxSandboxes < 0 || c.NodeMaxStarting < 0 {
		return fmt.Errorf("sandbox limits cannot be negative")
	}
	for _, ns := range c.SandboxDNS {
		if a, err := netip.ParseAddr(ns); err != nil || a.IsLoopback() {
			return fmt.Errorf("--sandbox-dns %q is not a nameserver address a sandbox can reach (an IP, not loopback)", ns)
		}
	}
	if c.Domain != "" && strings.ContainsAny(c.Domain, "/: ") {
		return fmt.Errorf("--domain %q must be a bare DNS name such as sbx.example.com", c.Domain)
	}
	return nil
}

// HostNameservers are the non-loopback nameservers of the host's resolv.conf:
// a sandbox cannot reach the host's own (loopback) resolver.
func HostNameservers(resolvConf string) []string {
	var out []string
	for _, line := range strings.Split(resolvConf, "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			if a, err := netip.ParseAddr(f[1]); err == nil && !a.IsLoopback() && !a.IsUnspecified() {
				out = append(out, a.String())
			}
		}
	}
	return out
}
