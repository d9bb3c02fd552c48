// Command envd is warren's in-sandbox agent: E2B's envd protocol on port 49983.
// Inside a sandbox it runs as root; on a host it serves E2B_DEBUG mode clients.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/warren-sh/warren/internal/envd"
	"github.com/warren-sh/warren/internal/envd/guestinit"
	"github.com/warren-sh/warren/internal/transfer"
	"github.com/warren-sh/warren/internal/version"
)

func main() {
	err := run()
	if os.Getpid() == 1 {
		guestinit.PowerOff(os.Stderr, err) // PID 1 must not exit: the kernel would panic
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "envd:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("envd", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `envd — warren's in-sandbox agent (E2B envd protocol %s)

Usage: envd [flags]

Serves process and filesystem Connect RPC, /files, /health, /init, /envs and
/metrics. Run it as root: processes and file operations take the credentials of
the user each request names (HTTP Basic auth, default --default-user).

Flags (each also read from the environment variable shown):
`, version.EnvdVersion)
		fs.PrintDefaults()
	}
	port := fs.Int("port", envInt("WARREN_ENVD_PORT", 49983), "TCP port to listen on (WARREN_ENVD_PORT)")
	host := fs.String("host", envStr("WARREN_ENVD_HOST", "0.0.0.0"), "address to listen on; 127.0.0.1 keeps a host agent private (WARREN_ENVD_HOST)")
	user := fs.String("default-user", envStr("WARREN_ENVD_DEFAULT_USER", "user"), "user for requests that name none, until /init sets one; root when the account is missing (WARREN_ENVD_DEFAULT_USER)")
	initSecret := fs.String("init-secret", envStr("WARREN_ENVD_INIT_SECRET", ""), "secret that lets the node re-/init a sandbox that already has an access token (WARREN_ENVD_INIT_SECRET)")
	transferDisk := fs.String("transfer-disk", envStr("WARREN_ENVD_TRANSFER_DISK", ""), "device (or file) that framed uploads from warren's proxy read their bytes from; empty: in a VM (--init), the disk with virtio serial "+transfer.Serial+", else none (WARREN_ENVD_TRANSFER_DISK)")
	verbose := fs.Bool("verbose", os.Getenv("WARREN_ENVD_VERBOSE") == "true", "log every request at debug level (WARREN_ENVD_VERBOSE=true)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	initMode := fs.Bool("init", os.Getpid() == 1, "first act as a warren microVM's init (PID 1 only): mount, load modules, switch to the root disk, configure the network; --init=false for PID 1 of a container")
	fs.Parse(os.Args[1:])
	if *showVersion {
		fmt.Printf("envd %s (protocol %s)\n", version.Version, version.EnvdVersion)
		return nil
	}
	if *port < 0 || *port > 65535 {
		return fmt.Errorf("--port %d is not a TCP port (0-65535)", *port)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *initMode {
		if err := guestinit.Boot(os.Stderr); err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}

	ln, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := envd.New(envd.Config{DefaultUser: *user, InitSecret: *initSecret, InVM: *initMode, TransferDisk: *transferDisk, Log: log})
	defer srv.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("envd listening", "addr", ln.Addr().String(), "version", version.Version, "protocol", version.EnvdVersion)
	return srv.Serve(ctx, ln)
}

func envStr(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}

func envInt(key string, def int) int {
	v, ok := os.LookupEnv(key)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "envd: %s=%q is not a number; using %d\n", key, v, def)
		return def
	}
	return n
}
