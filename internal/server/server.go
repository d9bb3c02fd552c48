// Package server assembles warren's roles into one process for `warren up`:
// the store, the base template, the node that runs microVMs, the control
// plane, the E2B REST API and the sandbox proxy, behind one listener.
//
// Lifecycle of sandboxes across restarts: a VM does not outlive warren (a
// node starts empty: its network slots are reset at start), but a paused
// sandbox does: its saved state is in the blob storage and its row in the
// store, and it resumes after a restart (connect, or traffic with
// autoResume). So on SIGTERM warren stops the sandboxes of its own node the
// way their owners asked: those created with autoPause (lifecycle.onTimeout
// "pause") are paused as at their deadline, a few at a time, within
// Config.ShutdownTimeout, and the others are killed, as is any whose pause
// does not finish in time. After a crash the next start kills the VMs that
// are left and forgets the sandboxes that were running (control.Reconcile).
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/api"
	"github.com/warren-sh/warren/internal/catalog"
	"github.com/warren-sh/warren/internal/certs"
	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/oci"
	"github.com/warren-sh/warren/internal/proxy"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/postgres"
	"github.com/warren-sh/warren/internal/store/sqlite"
	"github.com/warren-sh/warren/internal/template"
	"github.com/warren-sh/warren/internal/transfer"
	"github.com/warren-sh/warren/internal/version"
)

// Run starts every role, prints the connection details to out once ready, and
// serves until ctx is done; then it shuts down, pausing the running sandboxes
// with autoPause and killing the others (see the package comment).
func Run(ctx context.Context, cfg Config, out io.Writer, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}

	st, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer st.Close()
	team, newKey, err := control.Bootstrap(ctx, st, control.TeamLimits{MaxSandboxes: cfg.MaxSandboxes, MaxLifetime: cfg.MaxLifetime}, cfg.BootstrapAPIKey)
	if err != nil {
		return err
	}
	keyFile := filepath.Join(cfg.DataDir, "api-key")
	if newKey != "" {
		if err := os.WriteFile(keyFile, []byte(newKey+"\n"), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", keyFile, err)
		}
	}

	rt, err := microvm.New(microvm.Config{
		Root: vmsDir(cfg.DataDir), Accel: cfg.VMAccel, GuestASLR: cfg.GuestASLR,
		TransferDiskSize: int64(cfg.TransferDiskMB) << 20, Log: log,
	})
	if err != nil {
		return err
	}
	starts := newStartMetrics()
	mgr, err := node.NewManager(ctx, node.Config{
		ID: nodeID(), DataDir: cfg.DataDir, Runtime: rt, SlotRange: cfg.SlotRange,
		MaxSandboxes: cfg.NodeMaxSandboxes, MaxStarting: cfg.NodeMaxStarting, DNS: cfg.SandboxDNS, Log: log.With("role", "node"),
		OnStart: starts.observe,
	})
	if err != nil {
		return fmt.Errorf("node: %w", err)
	}
	defer mgr.Close()
	base, err := ensureBase(ctx, cfg, rt, mgr.Slots(), st, out)
	if err != nil {
		return err
	}
	if cfg.WarmPool > 0 {
		if err := mgr.SetWarmPool(base.Dir, cfg.WarmPool); err != nil {
			return err
		}
	}
	if cfg.OnBasePool != nil {
		cfg.OnBasePool(&BasePool{node: mgr, dir: base.Dir})
	}
	builder, err := template.NewBuilder(template.BuilderConfig{
		DataDir: cfg.DataDir, Runtime: rt, Slots: mgr.Slots(), Base: base, DNS: cfg.SandboxDNS,
		Log: log.With("role", "builder"),
	})
	if err != nil {
		return err
	}
	images := imageResolver{store: &oci.Store{Dir: filepath.Join(cfg.DataDir, "images"), Log: log.With("role", "images")}, envd: cfg.Envd}

	gc := templateGC(cfg, st, log)
	var px *proxy.Proxy
	ctl := control.New(control.Config{
		Store: st, Node: mgr, Catalog: catalog.NewMemory(), Log: log.With("role", "control"),
		OnGone: func(id string) { px.Abort(id) },
	})
	// Before the API serves: it fails the builds a previous run left unfinished.
	tpl, err := control.NewTemplates(ctx, control.TemplatesConfig{
		Store: st, DataDir: cfg.DataDir, Concurrency: cfg.BuildConcurrency, MaxUploadBytes: cfg.MaxUploadBytes,
		Builder: builder, Images: images, GC: gc,
		Log: log.With("role", "builds"),
	})
	if err != nil {
		return err
	}
	px = proxy.New(proxy.Config{Router: router{ctl: ctl, agents: mgr.AgentTransport, transfers: mgr.TransferDisk}, Domain: cfg.Domain, Log: log.With("role", "proxy")})
	defer px.Close()
	handler := px.Wrap(api.New(api.Config{Control: ctl, Templates: tpl, Store: st, Log: log.With("role", "api"), Domain: cfg.Domain}))

	tlsConfig, caPath, err := listenerTLS(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	if tlsConfig != nil {
		ln = tls.NewListener(ln, tlsConfig)
	}
	srv := &http.Server{
		Handler: handler,
		// No read/write timeouts: command and watch streams last hours
		// (PROXY.md §6); idle connections outlive the agent's keepalives.
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       620 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	// Command and watch streams end only with their command: at shutdown
	// they are cut at once (as when their sandbox stops), so that waiting
	// for requests in flight waits for the ones that end by themselves.
	srv.RegisterOnShutdown(px.AbortStreams)

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	ctlDone := make(chan error, 1)
	go func() { ctlDone <- ctl.Run(runCtx) }()
	interpreterDone := make(chan struct{})
	go func() {
		defer close(interpreterDone)
		if !cfg.CodeInterpreter {
			return
		}
		// In the background: creates of other templates need not wait for
		// it, and one of code-interpreter-v1 finds it once it is there.
		if err := ensureCodeInterpreter(runCtx, cfg.DataDir, builder, base, st, log.With("role", "builder")); err != nil && runCtx.Err() == nil {
			log.Error("the template code-interpreter-v1 is not available", "err", err)
		}
	}()
	defer func() {
		stop() // a build in progress ends (runCtx), before the node closes
		<-interpreterDone
	}()
	buildsDone := make(chan struct{})
	go func() {
		defer close(buildsDone)
		tpl.Run(runCtx)
	}()
	if len(cfg.WarmPools) > 0 {
		pools := &templatePools{
			sizes: cfg.WarmPools,
			resolve: func(ctx context.Context, name string) (string, error) {
				r, err := ctl.ResolveTemplate(ctx, team, name)
				if err != nil {
					return "", err
				}
				return r.Build.Artifact, nil
			},
			set: mgr.SetWarmPool,
			log: log.With("role", "node"),
		}
		go pools.run(runCtx)
	}
	if cfg.MetricsListen != "" {
		mln, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return fmt.Errorf("metrics: listen on %s: %w", cfg.MetricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", metricsHandler(newCollector(st, cfg.DataDir, mgr.WarmPools, gc.Stats, log.With("role", "metrics")), starts))
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go msrv.Serve(mln)
		defer msrv.Close()
	}
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ln) }()

	printReady(out, cfg, ln.Addr(), tlsConfig != nil, caPath, newKey, keyFile)

	var runErr error
	ctlEnded := false
	select {
	case <-ctx.Done():
	case err := <-srvDone:
		runErr = fmt.Errorf("serve: %w", err)
	case err := <-ctlDone:
		ctlEnded = true
		if err != nil {
			runErr = fmt.Errorf("control plane: %w", err)
		}
	}
	log.Info("shutting down")
	deadline := time.Now().Add(cmp.Or(cfg.ShutdownTimeout, DefaultShutdownTimeout))
	stop()
	if !ctlEnded {
		<-ctlDone // it waits for pauses in flight, which must end before the stops below
	}
	// Requests in flight get up to 10 s (within the deadline): none may start,
	// pause or resume a sandbox once the sandboxes are being stopped. Connect
	// streams are cut at once (RegisterOnShutdown above).
	serveEnd := time.Now().Add(10 * time.Second)
	if deadline.Before(serveEnd) {
		serveEnd = deadline
	}
	serveCtx, cancel := context.WithDeadline(context.Background(), serveEnd)
	defer cancel()
	srv.Shutdown(serveCtx)
	<-buildsDone // builds in flight were cancelled by stop() and record their end
	stopCtx, cancelStop := context.WithDeadline(context.Background(), deadline)
	defer cancelStop()
	ctl.Shutdown(stopCtx, shutdownParallel())
	return runErr
}

// shutdownParallel is how many sandboxes are paused at once at shutdown. A
// pause keeps a CPU busy (saving the VM; under TCG the guest's vCPUs too
// until they stop) and writes its RAM to disk: more pauses than CPUs only
// share them, and beyond a few they share one disk.
func shutdownParallel() int { return min(goruntime.NumCPU(), 4) }

func openStore(ctx context.Context, cfg Config) (store.Store, error) {
	if cfg.DatabaseURL != "" {
		st, err := postgres.Open(ctx, cfg.DatabaseURL)
		if err != nil {
			return nil, fmt.Errorf("postgres store: %w", err)
		}
		return st, nil
	}
	st, err := sqlite.Open(ctx, sqlitePath(cfg.DataDir))
	if err != nil {
		return nil, fmt.Errorf("sqlite store: %w", err)
	}
	return st, nil
}

// sqlitePath is the SQLite store's file, when there is no Postgres.
func sqlitePath(dataDir string) string { return filepath.Join(dataDir, "warren.db") }

// vmsDir is the microVM runtime's state root; the node's blob storage is
// its default, blobsDir.
func vmsDir(dataDir string) string   { return filepath.Join(dataDir, "vms") }
func blobsDir(dataDir string) string { return filepath.Join(dataDir, "blobs") }

// templateGC collects the template storage of cfg's data directory: what
// sandboxes' disks (VM state, blob storage) and the store's builds use stays.
func templateGC(cfg Config, st store.Store, log *slog.Logger) *control.TemplateGC {
	return &control.TemplateGC{
		Store: st, DataDir: cfg.DataDir, InUse: []string{vmsDir(cfg.DataDir), blobsDir(cfg.DataDir)},
		CacheMax: cfg.TemplateCacheMax, Log: log.With("role", "template-gc"),
	}
}

// CollectTemplates runs one collection of the template storage of the warren
// cfg describes (its data directory and store), as `warren up` does after
// builds and hourly; it may run beside that warren. With dryRun nothing is
// removed.
func CollectTemplates(ctx context.Context, cfg Config, dryRun bool, log *slog.Logger) (*control.GCResult, error) {
	if cfg.DatabaseURL == "" {
		// Opening would make an empty store, which lists no build.
		if _, err := os.Stat(sqlitePath(cfg.DataDir)); err != nil {
			return nil, fmt.Errorf("no database of warren in %s (%v): give the --data-dir and --database-url 'warren up' uses", cfg.DataDir, err)
		}
	}
	st, err := openStore(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	return templateGC(cfg, st, log).Collect(ctx, dryRun)
}

// ensureBase builds the base template on first need (minutes, with progress)
// and registers it in the store.
func ensureBase(ctx context.Context, cfg Config, rt *microvm.Runtime, slots *netns.Pool, st store.Store, out io.Writer) (*template.Artifact, error) {
	fmt.Fprintln(out, "warren: making sure the base template exists (the first time takes several minutes)")
	// Recorded under EnsureBase's lock: a collection of template storage
	// (warren template gc) never sees the build unrecorded.
	register := func(ctx context.Context, art *template.Artifact) error {
		var diskMB int
		if fi, err := os.Stat(art.RootDisk); err == nil {
			diskMB = int(fi.Size() >> 20)
		}
		return control.EnsureBaseTemplate(ctx, st, control.BaseBuild{
			Key: art.BuildID, Artifact: art.Dir, CPUCount: art.CPUs, MemoryMB: art.MemoryMiB,
			DiskSizeMB: diskMB, EnvdVersion: version.EnvdVersion,
		})
	}
	return template.EnsureBase(ctx, cfg.DataDir, template.BaseOptions{
		Envd: cfg.Envd, Runtime: rt, Slots: slots, Mirror: cfg.DebianMirror, Progress: PrefixWriter{W: out, Prefix: "warren: base: "},
		Register: register,
	})
}

// imageResolver serves template builds' fromImage from warren's image store
// (internal/oci), which pulls what it does not hold.
type imageResolver struct {
	store *oci.Store
	envd  string
}

func (r imageResolver) RootImage(ctx context.Context, ref string, creds *control.RegistryCredentials) (string, control.ImageMeta, error) {
	var c *oci.Credentials
	if creds != nil {
		c = &oci.Credentials{Type: creds.Type, Username: creds.Username, Password: creds.Password}
	}
	fs, err := r.store.RootImage(ctx, ref, r.envd, c)
	if err != nil {
		return "", control.ImageMeta{}, err
	}
	// The image's USER is not taken: E2B templates run as `user`, which
	// provisioning made; a numeric or image-specific user would not be.
	meta := control.ImageMeta{Env: map[string]string{}, Workdir: fs.Image.WorkingDir}
	for _, kv := range fs.Image.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			meta.Env[k] = v
		}
	}
	return fs.Path, meta, nil
}

func listenerTLS(cfg Config) (*tls.Config, string, error) {
	switch cfg.TLS {
	case "self-signed":
		domain := cfg.Domain
		if domain == "" {
			domain = "warren.localhost"
		}
		return certs.SelfSigned(filepath.Join(cfg.DataDir, "tls"), domain, nil)
	case "files":
		c, err := certs.FromFiles(cfg.TLSCert, cfg.TLSKey)
		return c, "", err
	}
	return nil, "", nil
}

func printReady(out io.Writer, cfg Config, addr net.Addr, tlsOn bool, caPath, newKey, keyFile string) {
	url := cfg.PublicURL
	if url == "" {
		scheme := "http"
		if tlsOn {
			scheme = "https"
		}
		host, port, _ := net.SplitHostPort(addr.String())
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
		url = fmt.Sprintf("%s://%s", scheme, net.JoinHostPort(host, port))
	}
	key := newKey
	if key == "" {
		if b, err := os.ReadFile(keyFile); err == nil {
			key = strings.TrimSpace(string(b))
		}
	}
	fmt.Fprintf(out, "warren %s: API and sandbox traffic on %s\n", version.Version, url)
	if newKey != "" {
		fmt.Fprintf(out, "warren: new API key (shown once; also in %s): %s\n", keyFile, newKey)
	}
	fmt.Fprintln(out, "warren: point the E2B SDK or CLI at warren with:")
	fmt.Fprintf(out, "  export E2B_API_URL=%s E2B_SANDBOX_URL=%s", url, url)
	if key != "" {
		fmt.Fprintf(out, " E2B_API_KEY=%s", key)
	} else {
		fmt.Fprintf(out, " E2B_API_KEY=<your key>")
	}
	fmt.Fprintln(out)
	if cfg.Domain != "" {
		fmt.Fprintf(out, "  # or, with DNS for api.%s and *.%s pointing here: export E2B_DOMAIN=%s\n", cfg.Domain, cfg.Domain, cfg.Domain)
	}
	if caPath != "" {
		fmt.Fprintf(out, "  export NODE_EXTRA_CA_CERTS=%s\n", caPath)
	}
	fmt.Fprintln(out, "ready")
}

// router lets the proxy find sandboxes through the control plane, and reach
// their agents over the node's own connections and transfer disks.
type router struct {
	ctl       *control.Controller
	agents    func(sandboxID string) http.RoundTripper // node.Manager.AgentTransport
	transfers func(sandboxID string) *transfer.Disk    // node.Manager.TransferDisk
}

func (r router) target(rt *control.Route) *proxy.Target {
	return &proxy.Target{
		SandboxID: rt.SandboxID, Host: rt.Host, EnvdToken: rt.EnvdToken,
		Agent: r.agents(rt.SandboxID), Transfer: r.transfers(rt.SandboxID),
	}
}

func (r router) Lookup(ctx context.Context, id string) (*proxy.Target, error) {
	rt, err := r.ctl.Lookup(ctx, id)
	if errors.Is(err, control.ErrNoRoute) {
		return nil, proxy.ErrSandboxNotFound
	}
	if err != nil {
		return nil, err
	}
	return r.target(rt), nil
}

func (r router) Running(ctx context.Context) ([]*proxy.Target, error) {
	routes, err := r.ctl.Running(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*proxy.Target, len(routes))
	for i, rt := range routes {
		out[i] = r.target(rt)
	}
	return out, nil
}

func nodeID() string {
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "local"
}

// PrefixWriter prefixes every line written through it (progress output of
// long work, such as the base template's build).
type PrefixWriter struct {
	W      io.Writer
	Prefix string
}

func (p PrefixWriter) Write(b []byte) (int, error) {
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if line != "" {
			fmt.Fprint(p.W, p.Prefix+line)
		}
	}
	return len(b), nil
}

// Paused lets the proxy auto-resume paused sandboxes (proxy.Resumer).
func (r router) Paused(ctx context.Context, id string) (*proxy.Target, error) {
	rt, err := r.ctl.Resumable(ctx, id)
	if err != nil {
		return nil, proxyError(err)
	}
	return &proxy.Target{SandboxID: rt.SandboxID, EnvdToken: rt.EnvdToken}, nil
}

func (r router) Resume(ctx context.Context, id string) (*proxy.Target, error) {
	rt, err := r.ctl.AutoResume(ctx, id)
	if err != nil {
		return nil, proxyError(err)
	}
	return r.target(rt), nil
}

// proxyError is a control-plane error as the proxy answers it (PROXY.md §3).
func proxyError(err error) error {
	var ce *control.Error
	switch {
	case errors.Is(err, control.ErrNoRoute):
		return proxy.ErrSandboxNotFound
	case !errors.As(err, &ce):
		return err
	case ce.Kind == control.NotFound:
		return proxy.ErrSandboxNotFound
	case ce.Kind == control.Conflict:
		return proxy.ErrTransitioning
	case ce.Kind == control.LimitReached:
		return &proxy.ResumeError{Status: http.StatusTooManyRequests, Message: ce.Message}
	case ce.Kind == control.Unavailable:
		return &proxy.ResumeError{Status: http.StatusServiceUnavailable, Message: ce.Message}
	}
	return err
}

var _ proxy.Resumer = router{}
