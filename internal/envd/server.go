// Package envd is warren's in-sandbox agent: E2B's envd protocol on port 49983.
//
// It serves the Connect services process.Process and filesystem.Filesystem
// (JSON and binary codecs, HTTP/1.1 and h2c), and the REST endpoints /health,
// /init, /envs, /metrics and /files. The control plane configures it once per
// sandbox through POST /init; every other request is authorised by the access
// token set there (ENVD.md §3).
package envd

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/warren-sh/warren/gen/filesystem/filesystemconnect"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/envd/files"
	"github.com/warren-sh/warren/internal/envd/filesystem"
	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/portforward"
	"github.com/warren-sh/warren/internal/envd/process"
	"github.com/warren-sh/warren/internal/envd/reply"
	"github.com/warren-sh/warren/internal/envd/state"
)

// Config is how envd is started.
type Config struct {
	// DefaultUser acts for requests that name no user until /init sets another.
	DefaultUser string
	// InitSecret, when set, lets /init replace an access token that is already
	// set (the node's private channel into a restored snapshot clone).
	InitSecret string
	// InVM says envd is a sandbox VM's init and owns the machine: /init sets
	// the clock and reseeds the kernel RNG, /init writes /run/e2b, and servers
	// listening on loopback only are forwarded to the guest's address. Never on
	// a host.
	InVM bool
	// TransferDisk is where framed uploads (package transfer) read their
	// bytes: a device or file; empty in a VM means the disk with the transfer
	// serial, elsewhere none.
	TransferDisk string
	Log          *slog.Logger
}

// Server is a running agent's request handling.
type Server struct {
	cfg        Config
	state      *state.Sandbox
	processes  *process.Service
	filesystem *filesystem.Service
	handler    http.Handler
}

// New builds the agent. Close releases its background work.
func New(cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.DefaultUser == "" {
		cfg.DefaultUser = "root"
	}
	if _, err := identity.Lookup(cfg.DefaultUser); err != nil {
		cfg.Log.Warn("default user does not exist; acting as root until /init names one", "user", cfg.DefaultUser, "err", err)
		cfg.DefaultUser = "root"
	}
	s := &Server{cfg: cfg, state: state.New(cfg.DefaultUser)}
	// Every process learns it runs in a sandbox, as under E2B.
	s.state.MergeEnvVars(map[string]string{"E2B_SANDBOX": "true"})
	s.processes = process.NewService(s.state, cfg.Log.With("service", "process"))
	s.filesystem = filesystem.NewService(s.state, cfg.Log.With("service", "filesystem"))

	mux := http.NewServeMux()
	path, h := processconnect.NewProcessHandler(s.processes)
	mux.Handle(path, s.requireToken(h))
	path, h = filesystemconnect.NewFilesystemHandler(s.filesystem)
	mux.Handle(path, s.requireToken(h))
	// /files checks the token or a URL signature itself.
	mux.Handle("/files", files.NewHandler(s.state, files.TransferDisk(cfg.TransferDisk, cfg.InVM), cfg.Log.With("service", "files")))
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /init", s.handleInit)
	mux.Handle("GET /envs", s.requireToken(http.HandlerFunc(s.handleEnvs)))
	mux.Handle("GET /metrics", s.requireToken(http.HandlerFunc(s.handleMetrics)))
	s.handler = cors(mux)
	return s
}

// Handler is the agent's HTTP handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Close stops watchers and other background work. Processes keep running.
func (s *Server) Close() {
	s.processes.Close()
	s.filesystem.Close()
}

// Serve answers on ln until ctx is done: HTTP/1.1 and cleartext HTTP/2.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:           s.handler,
		Protocols:         protocols,
		ReadHeaderTimeout: 30 * time.Second,
		// No read/write timeouts: process and watch streams last as long as the
		// process. Idle connections outlive the proxy's idle timeout (ENVD.md §1).
		IdleTimeout: 640 * time.Second,
		ErrorLog:    slog.NewLogLogger(s.cfg.Log.Handler(), slog.LevelDebug),
	}
	if s.cfg.InVM {
		go s.forwardLoopbackPorts(ctx, ln)
	}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
	}()
	err := srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

const unauthorizedMessage = "unauthorized access, please provide a valid access token or method signing if supported"

// requireToken enforces X-Access-Token once /init has set a token.
func (s *Server) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.state.AccessToken() != "" && !s.state.TokenMatches(r.Header.Get("X-Access-Token")) {
			reply.Error(w, http.StatusUnauthorized, unauthorizedMessage)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// cors lets browser clients call the agent from any origin, as E2B's envd does.
func cors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if origin := r.Header.Get("Origin"); origin != "" {
			h := w.Header()
			h.Set("Access-Control-Allow-Origin", "*")
			h.Set("Access-Control-Allow-Methods", "HEAD, GET, POST, PUT, PATCH, DELETE")
			h.Set("Access-Control-Allow-Headers", "*")
			h.Set("Access-Control-Expose-Headers", strings.Join([]string{
				"Connect-Protocol-Version", "Connect-Content-Encoding", "Connect-Accept-Encoding",
				"Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "Content-Encoding",
				"Content-Disposition", "X-Envd-Version",
			}, ", "))
			h.Set("Access-Control-Max-Age", "7200")
			if r.Method == http.MethodOptions {
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func constantTimeEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// forwardLoopbackPorts makes servers bound to the guest's loopback reachable
// through the proxy (ENVD.md §12), on eth0's address, until ctx is done.
func (s *Server) forwardLoopbackPorts(ctx context.Context, ln net.Listener) {
	external, err := interfaceIPv4("eth0")
	if err != nil {
		s.cfg.Log.Warn("not forwarding loopback ports", "err", err)
		return
	}
	var skip []uint16
	if a, ok := ln.Addr().(*net.TCPAddr); ok {
		skip = append(skip, uint16(a.Port))
	}
	f := &portforward.Forwarder{External: external, Skip: skip, Log: s.cfg.Log.With("service", "portforward")}
	f.Run(ctx)
}

// interfaceIPv4 is the first IPv4 address of the named interface.
func interfaceIPv4(name string) (netip.Addr, error) {
	iface, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := iface.Addrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%s has no IPv4 address", name)
}
