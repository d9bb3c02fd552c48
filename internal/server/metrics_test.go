package server

import (
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/store/sqlite"
)

func TestMetrics(t *testing.T) {
	dir := t.TempDir()
	st, err := sqlite.Open(t.Context(), filepath.Join(dir, "warren.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	team := &store.Team{ID: "t1", Name: "t", Slug: "t", CreatedAt: time.Now()}
	if err := st.CreateTeam(t.Context(), team); err != nil {
		t.Fatal(err)
	}
	for i, state := range []store.SandboxState{store.StateRunning, store.StateRunning, store.StatePaused} {
		sb := &store.Sandbox{ID: "i" + string(rune('a'+i)), TeamID: "t1", TemplateID: "x", BuildID: "b", NodeID: "n", State: state,
			CPUCount: 1, MemoryMB: 512, StartedAt: time.Now(), EndAt: time.Now().Add(time.Hour)}
		if err := st.InsertSandbox(t.Context(), sb); err != nil {
			t.Fatal(err)
		}
	}
	paused := filepath.Join(dir, "blobs", "paused", "ic", "vm")
	os.MkdirAll(paused, 0o700)
	os.WriteFile(filepath.Join(paused, "state"), make([]byte, 2<<20), 0o600)
	// A layer nothing uses: a collection removes it.
	layers := filepath.Join(dir, "templates", "layers")
	os.MkdirAll(layers, 0o700)
	os.WriteFile(filepath.Join(layers, "0123-dead.qcow2"), []byte(strings.Repeat("x", 8192)), 0o600)
	if _, _, err := control.Bootstrap(t.Context(), st, control.TeamLimits{}, ""); err != nil {
		t.Fatal(err)
	}
	if err := control.EnsureBaseTemplate(t.Context(), st, control.BaseBuild{Key: "k", Artifact: "templates/base/0123456789abcdef"}); err != nil {
		t.Fatal(err)
	}
	gc := templateGC(Config{DataDir: dir, TemplateCacheMax: 1 << 30}, st, slog.Default())
	if _, err := gc.Collect(t.Context(), false); err != nil {
		t.Fatal(err)
	}

	starts := newStartMetrics()
	starts.observe(node.StartWarm, 40*time.Millisecond, nil)
	starts.observe(node.StartWarm, 60*time.Millisecond, nil)
	starts.observe(node.StartRestore, 1200*time.Millisecond, nil)
	starts.observe(node.StartResume, 3*time.Second, errors.New("no slot"))
	srv := httptest.NewServer(metricsHandler(newCollector(st, dir, func() []node.PoolStatus {
		return []node.PoolStatus{
			{Artifact: filepath.Join(dir, "templates/base/b1"), Ready: 1, Size: 2},
			{Artifact: filepath.Join(dir, "templates/tpl9/b7"), Ready: 0, Size: 1},
		}
	}, gc.Stats, slog.Default()), starts))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	body := string(b)
	for _, want := range []string{
		`warren_sandboxes{state="running"} 2`,
		`warren_sandboxes{state="paused"} 1`,
		`warren_storage_bytes{kind="paused"} 2.097152e+06`,
		`warren_storage_bytes{kind="snapshots"} 0`,
		`warren_warm_pool_ready{build="b1",template="base"} 1`,
		`warren_warm_pool_size{build="b1",template="base"} 2`,
		`warren_warm_pool_ready{build="b7",template="tpl9"} 0`,
		`warren_warm_pool_size{build="b7",template="tpl9"} 1`,
		`warren_template_cache_bytes 0`,
		`warren_template_gc_freed_bytes_total 8192`,
		`warren_template_gc_removed_total{kind="layer"} 1`,
		`warren_template_gc_removed_total{kind="source"} 0`,
		`warren_sandbox_start_seconds_bucket{kind="warm",le="0.05"} 1`,
		`warren_sandbox_start_seconds_bucket{kind="warm",le="0.1"} 2`,
		`warren_sandbox_start_seconds_count{kind="warm"} 2`,
		`warren_sandbox_start_seconds_bucket{kind="restore",le="1"} 0`,
		`warren_sandbox_start_seconds_bucket{kind="restore",le="2.5"} 1`,
		`warren_sandbox_start_seconds_count{kind="resume"} 0`,
		`warren_sandbox_start_failures_total{kind="resume"} 1`,
		`warren_sandbox_start_failures_total{kind="warm"} 0`,
		`go_goroutines`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
