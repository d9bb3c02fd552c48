package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/server"
)

func init() {
	commands["up"] = command{summary: "run every role (API, node, proxy, builder) in one process", run: runUp}
}

func runUp(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: warren up [flags]

Runs warren on this host: the E2B REST API and the sandbox proxy on one
listener, the node that runs microVM sandboxes, and the base template (built on
first start: several minutes). On an empty data dir it creates the team
"default" and an API key, printed once and written to DATA/api-key (0600).
Prints the E2B_* lines to paste, then "ready". SIGTERM or Ctrl-C stops it:
running sandboxes created with autoPause (lifecycle.onTimeout "pause") are
paused, as at their deadline, and resume after a restart; the others are
killed, as is what is not paused within --shutdown-timeout.

Flags (each also read from the environment variable shown):
`)
		fs.PrintDefaults()
	}
	e := &envFlags{fs: fs}
	var cfg server.Config
	listen := e.String("listen", "WARREN_LISTEN", ":3000", "address of the API and sandbox-traffic listener")
	metricsListen := e.String("metrics-listen", "WARREN_METRICS_LISTEN", "127.0.0.1:9464", "address serving Prometheus metrics at /metrics (sandboxes by state, storage, warm pool); empty: none")
	publicURL := e.String("public-url", "WARREN_PUBLIC_URL", "", "URL clients reach warren at, for the printed E2B_* lines (default: from --listen)")
	dataDir := e.String("data-dir", "WARREN_DATA_DIR", "/var/lib/warren", "where warren keeps its database, templates, VMs and keys")
	dbURL := e.String("database-url", "WARREN_DATABASE_URL", "", "Postgres URL (postgres://user:pass@host/db); default: SQLite in the data dir")
	domain := e.String("domain", "WARREN_DOMAIN", "", "domain for host routing <port>-<sandboxID>.<domain> (clients set E2B_DOMAIN to it)")
	tlsMode := e.String("tls", "WARREN_TLS", "off", "TLS on the listener: off, self-signed (a CA in DATA/tls/ca.pem to trust), or files (--tls-cert, --tls-key)")
	tlsCert := e.String("tls-cert", "WARREN_TLS_CERT", "", "PEM certificate chain for --tls files")
	tlsKey := e.String("tls-key", "WARREN_TLS_KEY", "", "PEM private key for --tls files")
	accel := e.String("vm-accel", "WARREN_VM_ACCEL", "auto", "microVM acceleration: auto (KVM where the CPU has vmx/svm and /dev/kvm works, else TCG), kvm, tcg")
	aslr := e.String("guest-aslr", "WARREN_GUEST_ASLR", "auto", "address space randomization in sandboxes: auto (on under KVM, off under TCG, where it makes every command start 3-5x slower), on, off; templates keep what they were built with")
	transferDisk := e.Int("transfer-disk-mb", "WARREN_TRANSFER_DISK_MB", microvm.DefaultTransferDiskSize>>20, "size in MiB of each sandbox's transfer disk, a sparse file that uploads pass through into the sandbox (it takes host disk only while they do); sandboxes get their template's size, and the base template is rebuilt for a new one")
	envd := e.String("envd", "WARREN_ENVD", defaultEnvd(), "the static envd binary put into every sandbox")
	slotRange := e.String("slot-range", "WARREN_SLOT_RANGE", netns.DefaultRange.String(), "IPv4 range for sandbox network slots (one /30 each); must not overlap networks the host reaches")
	maxSandboxes := e.Int("max-sandboxes", "WARREN_MAX_SANDBOXES", 100, "running sandboxes of the default team at once (0 = no limit)")
	maxLifetime := e.Duration("max-sandbox-lifetime", "WARREN_MAX_SANDBOX_LIFETIME", 24*time.Hour, "longest a sandbox of the default team may live, from its start")
	nodeMax := e.Int("node-max-sandboxes", "WARREN_NODE_MAX_SANDBOXES", 0, "sandboxes this host runs at once (0 = derived from memory)")
	nodeStarting := e.Int("node-max-starting", "WARREN_NODE_MAX_STARTING", 0, "sandboxes this host restores or resumes at once; more creates wait their turn (0 = the host's CPUs: a restore is CPU-bound, and under TCG costs most of a second of CPU); warm pool claims never wait")
	dns := e.String("sandbox-dns", "WARREN_SANDBOX_DNS", strings.Join(hostDNS(), ","), "comma-separated nameservers for sandboxes' /etc/resolv.conf (default: the host's non-loopback ones)")
	mirror := e.String("debian-mirror", "WARREN_DEBIAN_MIRROR", "", "Debian mirror for building the base template (default http://deb.debian.org/debian)")
	warmPool := e.Int("warm-pool", "WARREN_WARM_POOL", 2, "base sandboxes kept restored and frozen, ready for creates (0: none); each holds a network slot and ~45 MiB")
	warmPools := e.String("warm-pool-templates", "WARREN_WARM_POOL_TEMPLATES", "", "warm pools of other templates of the default team: template=size pairs, comma-separated (e.g. code-interpreter-v1=2); each follows its template's rebuilds")
	codeInterpreter := e.Bool("code-interpreter", "WARREN_CODE_INTERPRETER", true, "build the code-interpreter-v1 template (base + a code interpreter server on port 49999, for @e2b/code-interpreter) in the background after start, and again when base or warren's server for it changes")
	buildConcurrency := e.Int("build-concurrency", "WARREN_BUILD_CONCURRENCY", 1, "template builds run at once; the others wait (each build runs a VM of the template's size)")
	maxUploadMB := e.Int("max-upload-mb", "WARREN_MAX_UPLOAD_MB", 1024, "largest upload of a template build's COPY files, in MiB")
	cacheMax := templateCacheMax(e)
	shutdownTimeout := e.Duration("shutdown-timeout", "WARREN_SHUTDOWN_TIMEOUT", server.DefaultShutdownTimeout, "at shutdown, time from the signal to pause the running sandboxes with autoPause; those not paused by then are killed (a service manager's stop timeout must allow this and a few seconds more)")
	verbose := fs.Bool("verbose", os.Getenv("WARREN_VERBOSE") == "true", "debug logging (WARREN_VERBOSE=true)")
	fs.Parse(args)
	if err := e.err(); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("up takes no arguments, got %q", fs.Args())
	}
	pools, err := server.ParseWarmPools(*warmPools)
	if err != nil {
		return err
	}
	templateCache, err := cacheMax()
	if err != nil {
		return err
	}
	prefix, err := netip.ParsePrefix(*slotRange)
	if err != nil {
		return fmt.Errorf("--slot-range %q is not an IPv4 prefix such as 10.200.0.0/16", *slotRange)
	}
	cfg = server.Config{
		Listen: *listen, PublicURL: *publicURL, DataDir: *dataDir, DatabaseURL: *dbURL, Domain: *domain,
		TLS: *tlsMode, TLSCert: *tlsCert, TLSKey: *tlsKey, VMAccel: *accel, GuestASLR: *aslr, TransferDiskMB: *transferDisk, Envd: *envd, SlotRange: prefix,
		MaxSandboxes: *maxSandboxes, MaxLifetime: *maxLifetime, NodeMaxSandboxes: *nodeMax, NodeMaxStarting: *nodeStarting,
		BootstrapAPIKey: os.Getenv("WARREN_BOOTSTRAP_API_KEY"), DebianMirror: *mirror,
		SandboxDNS: splitList(*dns), BuildConcurrency: *buildConcurrency, WarmPool: *warmPool, WarmPools: pools, MetricsListen: *metricsListen, MaxUploadBytes: int64(*maxUploadMB) << 20,
		TemplateCacheMax: templateCache, ShutdownTimeout: *shutdownTimeout, CodeInterpreter: *codeInterpreter,
	}
	if cfg.ShutdownTimeout <= 0 {
		return fmt.Errorf("--shutdown-timeout must be positive, got %s", cfg.ShutdownTimeout)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return server.Run(ctx, cfg, os.Stdout, log)
}

// defaultEnvd is bin/envd beside the warren binary, as `make build` puts it.
func defaultEnvd() string {
	exe, err := os.Executable()
	if err != nil {
		return "envd"
	}
	return filepath.Join(filepath.Dir(exe), "envd")
}

// hostDNS is the host's nameservers a sandbox can reach.
func hostDNS() []string {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return nil
	}
	return server.HostNameservers(string(b))
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
