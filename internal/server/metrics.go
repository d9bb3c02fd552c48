package server

import (
	"context"
	"log/slog"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/warren-sh/warren/internal/blob"
	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
)

// collector exposes warren's state to Prometheus on each scrape: sandboxes
// by state, the disk that paused sandboxes, snapshots, templates and images
// take, and the warm pools. Values are read when scraped, not kept.
type collector struct {
	store   store.Store
	dataDir string
	warm    func() []node.PoolStatus // the node's warm pools; nil: none
	gc      func() control.GCStats   // template storage collections; nil: none
	log     *slog.Logger

	sandboxes, storage, warmReady, warmSize *prometheus.Desc
	cacheBytes, gcFreed, gcRemoved          *prometheus.Desc
}

func newCollector(st store.Store, dataDir string, warm func() []node.PoolStatus, gc func() control.GCStats, log *slog.Logger) *collector {
	return &collector{
		store: st, dataDir: dataDir, warm: warm, gc: gc, log: log,
		sandboxes: prometheus.NewDesc("warren_sandboxes", "Sandboxes by lifecycle state.", []string{"state"}, nil),
		storage: prometheus.NewDesc("warren_storage_bytes",
			"Disk taken under the data directory: paused sandboxes, snapshots, fork copies, templates (with the layer cache) and images.",
			[]string{"kind"}, nil),
		warmReady: prometheus.NewDesc("warren_warm_pool_ready", "Sandboxes of a template build restored and frozen, ready for creates.", []string{"template", "build"}, nil),
		warmSize:  prometheus.NewDesc("warren_warm_pool_size", "A template build's warm pool size.", []string{"template", "build"}, nil),
		cacheBytes: prometheus.NewDesc("warren_template_cache_bytes",
			"Disk the template build cache keeps beyond what live templates, sandboxes and builds use, as of the last collection (bounded by --template-cache-max).", nil, nil),
		gcFreed: prometheus.NewDesc("warren_template_gc_freed_bytes_total", "Disk freed by collections of template storage.", nil, nil),
		gcRemoved: prometheus.NewDesc("warren_template_gc_removed_total",
			"What collections of template storage removed: step layers, source disks, build artifacts and superseded base template builds.", []string{"kind"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.sandboxes
	ch <- c.storage
	ch <- c.warmReady
	ch <- c.warmSize
	ch <- c.cacheBytes
	ch <- c.gcFreed
	ch <- c.gcRemoved
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, state := range []store.SandboxState{store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming, store.StateKilling} {
		n, err := c.store.CountSandboxes(ctx, store.SandboxFilter{States: []store.SandboxState{state}})
		if err != nil {
			c.log.Warn("metrics: count sandboxes", "state", state, "err", err)
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.sandboxes, prometheus.GaugeValue, float64(n), string(state))
	}
	blobs, err := (&blob.Local{Root: blobsDir(c.dataDir)}).Usage(ctx)
	if err != nil {
		c.log.Warn("metrics: blob usage", "err", err)
	}
	for _, kind := range []string{"paused", "snapshots", "forks"} {
		ch <- prometheus.MustNewConstMetric(c.storage, prometheus.GaugeValue, float64(blobs[kind]), kind)
	}
	for kind, dir := range map[string]string{"templates": "templates", "layer_cache": "templates/layers", "images": "images"} {
		n, err := blob.DiskUsage(filepath.Join(c.dataDir, dir))
		if err != nil {
			c.log.Warn("metrics: disk usage", "dir", dir, "err", err)
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.storage, prometheus.GaugeValue, float64(n), kind)
	}
	if c.gc != nil {
		s := c.gc()
		ch <- prometheus.MustNewConstMetric(c.cacheBytes, prometheus.GaugeValue, float64(s.CacheBytes))
		ch <- prometheus.MustNewConstMetric(c.gcFreed, prometheus.CounterValue, float64(s.FreedBytes))
		for _, kind := range []string{"layer", "source", "artifact", "base"} {
			ch <- prometheus.MustNewConstMetric(c.gcRemoved, prometheus.CounterValue, float64(s.Removed[kind]), kind)
		}
	}
	if c.warm != nil {
		for _, p := range c.warm() {
			// Artifacts are <data>/templates/<template ID or base>/<build ID>.
			template, build := filepath.Base(filepath.Dir(p.Artifact)), filepath.Base(p.Artifact)
			ch <- prometheus.MustNewConstMetric(c.warmReady, prometheus.GaugeValue, float64(p.Ready), template, build)
			ch <- prometheus.MustNewConstMetric(c.warmSize, prometheus.GaugeValue, float64(p.Size), template, build)
		}
	}
}

// startMetrics counts the node's sandbox starts (node.Config.OnStart): how
// long they take by kind, which shows how often creates miss the warm pool
// and what a miss costs, and how many fail.
type startMetrics struct {
	seconds  *prometheus.HistogramVec
	failures *prometheus.CounterVec
}

func newStartMetrics() *startMetrics {
	m := &startMetrics{
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "warren_sandbox_start_seconds",
			Help: "Time from a create (or resume) reaching the node to the sandbox's envd ready, by kind: warm (claimed from a warm pool), restore (from its template's snapshot), resume (a paused sandbox).",
			// From a warm claim (tens of ms) to a cold boot under TCG.
			Buckets: []float64{0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"kind"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warren_sandbox_start_failures_total",
			Help: "Sandbox starts that failed, by kind (see warren_sandbox_start_seconds).",
		}, []string{"kind"}),
	}
	for _, kind := range []string{node.StartWarm, node.StartRestore, node.StartResume} {
		m.seconds.WithLabelValues(kind)
		m.failures.WithLabelValues(kind)
	}
	return m
}

// observe is the node's Config.OnStart. Failed starts count as failures
// only: their time says little.
func (m *startMetrics) observe(kind string, took time.Duration, err error) {
	if err != nil {
		m.failures.WithLabelValues(kind).Inc()
		return
	}
	m.seconds.WithLabelValues(kind).Observe(took.Seconds())
}

// metricsHandler serves warren's metrics and the Go runtime's.
func metricsHandler(c *collector, starts *startMetrics) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, starts.seconds, starts.failures, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}
