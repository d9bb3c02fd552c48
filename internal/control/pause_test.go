package control_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
)

// pausedSandbox stores a paused sandbox of team A on node-1 whose saved
// state the fake node holds.
func (f *fixture) pausedSandbox(t *testing.T, id string, memory, autoResume bool, timeout time.Duration) {
	t.Helper()
	key := "paused/" + id
	must(t, f.store.InsertSandbox(context.Background(), &store.Sandbox{
		ID: id, TeamID: f.teamA.ID, TemplateID: "t", NodeID: "node-1", State: store.StatePaused,
		EnvdAccessToken: "tok-" + id, AutoPause: true, AutoPauseMemory: memory, AutoResume: autoResume,
		Timeout: timeout, StartedAt: time.Now().Add(-time.Hour), EndAt: time.Now().Add(-time.Minute),
		Paused: &store.PausedState{Key: key, Memory: memory, Bytes: 1 << 20, At: time.Now()},
	}))
	f.node.mu.Lock()
	f.node.saved[key] = memory
	f.node.mu.Unlock()
}

func (f *fixture) state(t *testing.T, id string) store.SandboxState {
	t.Helper()
	sb, err := f.store.GetSandbox(context.Background(), id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return sb.State
}

// A restart finds paused sandboxes without VMs, as they should be: they stay
// paused and resumable. Pauses and resumes a restart cut short are settled
// by whether the node still runs the VM.
func TestReconcileKeepsPausedSandboxes(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	later := time.Now().Add(time.Hour)
	f.pausedSandbox(t, "paused1", true, false, time.Minute)
	f.pausedSandbox(t, "pausedvm2", true, false, time.Minute) // a leftover VM beside the saved state
	f.sandbox(t, "pausing3", "node-1", store.StatePausing, later)
	f.sandbox(t, "pausingvm4", "node-1", store.StatePausing, later)
	f.pausedSandbox(t, "resuming5", true, false, time.Minute)
	f.pausedSandbox(t, "resumingvm6", true, false, time.Minute)
	for _, id := range []string{"resuming5", "resumingvm6"} {
		_, err := f.store.UpdateSandbox(ctx, id, func(s *store.Sandbox) error { s.State = store.StateResuming; return nil })
		must(t, err)
	}
	f.node.run("pausedvm2", "pausingvm4", "resumingvm6")
	// The node saved this one, but warren stopped before the store knew.
	f.sandbox(t, "pausingsaved7", "node-1", store.StatePausing, later)
	f.node.mu.Lock()
	f.node.saved["paused/pausingsaved7"] = false
	f.node.mu.Unlock()

	c := control.New(f.config)
	must(t, c.Reconcile(ctx))
	for id, want := range map[string]store.SandboxState{
		"paused1": store.StatePaused, "pausedvm2": store.StatePaused, "pausingvm4": store.StateRunning,
		"resuming5": store.StatePaused, "resumingvm6": store.StateRunning, "pausingsaved7": store.StatePaused,
	} {
		if got := f.state(t, id); got != want {
			t.Errorf("%s: state %s, want %s", id, got, want)
		}
	}
	if f.exists("pausing3") {
		t.Error("a sandbox whose pause was cut short with nothing saved is still stored")
	}
	if got := fmt.Sprint(f.node.killed()); got != "[pausedvm2]" {
		t.Errorf("node kills = %s, want only the paused sandbox's leftover VM", got)
	}
	for _, id := range []string{"pausingvm4", "resumingvm6"} {
		if _, err := c.Lookup(ctx, id); err != nil {
			t.Errorf("%s is running again but not routed: %v", id, err)
		}
	}
	if sb, err := f.store.GetSandbox(ctx, "pausingsaved7"); err != nil || sb.Paused == nil ||
		sb.Paused.Key != "paused/pausingsaved7" || sb.Paused.Memory {
		t.Errorf("the pause the node finished is recorded as %+v (%v), want its key, without memory", sb, err)
	}
	if sb, resumed, err := c.Connect(ctx, f.teamA, "pausingsaved7", time.Minute); err != nil || !resumed || sb.State != store.StateRunning {
		t.Errorf("connect to the sandbox whose pause was recorded late: %+v resumed=%v err=%v", sb, resumed, err)
	}
	// The paused sandbox resumes after the restart.
	sb, resumed, err := c.Connect(ctx, f.teamA, "paused1", time.Minute)
	if err != nil || !resumed || sb.State != store.StateRunning || !f.node.isRunning("paused1") {
		t.Fatalf("connect after restart: %+v resumed=%v err=%v", sb, resumed, err)
	}
	if _, err := c.Lookup(ctx, "paused1"); err != nil {
		t.Errorf("resumed sandbox not routed: %v", err)
	}
}

// At the deadline the evictor pauses autoPause sandboxes (memory as asked)
// and kills the rest.
func TestEvictorAutoPauses(t *testing.T) {
	f := newFixture(t)
	f.config.EvictInterval = 10 * time.Millisecond
	past := time.Now().Add(-time.Second)
	for id, mem := range map[string]bool{"mem1": true, "disk2": false} {
		must(t, f.store.InsertSandbox(context.Background(), &store.Sandbox{
			ID: id, TeamID: f.teamA.ID, TemplateID: "t", NodeID: "node-1", State: store.StateRunning,
			AutoPause: true, AutoPauseMemory: mem, StartedAt: time.Now().Add(-time.Minute), EndAt: past,
		}))
	}
	f.sandbox(t, "kill3", "node-1", store.StateRunning, past)
	f.node.run("mem1", "disk2", "kill3")

	c := control.New(f.config)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(3 * time.Second)
	for f.state(t, "mem1") != store.StatePaused || f.state(t, "disk2") != store.StatePaused || f.exists("kill3") {
		if time.Now().After(deadline) {
			t.Fatalf("states: mem1 %s, disk2 %s, kill3 exists %v", f.state(t, "mem1"), f.state(t, "disk2"), f.exists("kill3"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got := fmt.Sprint(f.node.paused()); got != "[mem1 memory=true disk2 memory=false]" && got != "[disk2 memory=false mem1 memory=true]" {
		t.Errorf("node pauses = %s", got)
	}
	if got := fmt.Sprint(f.node.killed()); got != "[kill3]" {
		t.Errorf("node kills = %s, want only the sandbox without autoPause", got)
	}
	for _, id := range []string{"mem1", "disk2"} {
		if _, err := c.Lookup(context.Background(), id); err == nil {
			t.Errorf("paused %s is still routed", id)
		}
	}
	time.Sleep(50 * time.Millisecond) // more rounds: a paused sandbox has no deadline
	if f.state(t, "mem1") != store.StatePaused || len(f.node.killed()) != 1 {
		t.Error("the evictor touched a paused sandbox")
	}
}

// Concurrent connects to a paused sandbox share one node resume.
func TestConcurrentConnectsResumeOnce(t *testing.T) {
	f := newFixture(t)
	f.pausedSandbox(t, "sb1", true, false, time.Minute)
	gate := make(chan struct{})
	f.node.createGate = gate
	c := control.New(f.config)

	const n = 10
	var wg sync.WaitGroup
	errs := make(chan error, n)
	var resumedCount atomic.Int32
	for range n {
		wg.Go(func() {
			sb, resumed, err := c.Connect(context.Background(), f.teamA, "sb1", 2*time.Minute)
			if err == nil && sb.State != store.StateRunning {
				err = fmt.Errorf("connect = %+v", sb)
			}
			if resumed {
				// A connect that came after the resume (a slow
				// goroutine) finds it running: resumed = false.
				resumedCount.Add(1)
			}
			errs <- err
		})
	}
	time.Sleep(100 * time.Millisecond)
	if len(errs) != 0 {
		t.Fatalf("a connect returned before the resume finished: %v", <-errs)
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := fmt.Sprint(f.node.resumes); got != "[sb1]" {
		t.Errorf("node resumes = %s, want one", got)
	}
	if resumedCount.Load() == 0 {
		t.Error("no connect reported the resume")
	}
	sb, err := f.store.GetSandbox(context.Background(), "sb1")
	must(t, err)
	if sb.Paused != nil || time.Until(sb.EndAt) < time.Minute || time.Since(sb.StartedAt) > time.Minute {
		t.Errorf("resumed row = %+v: want no saved state, a new start and deadline", sb)
	}
}

// Traffic resumes a paused sandbox only with autoResume and a memory
// snapshot, with its create-time timeout of at least five minutes.
func TestAutoResume(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.pausedSandbox(t, "auto1", true, true, time.Minute)
	f.pausedSandbox(t, "noauto2", true, false, time.Minute)
	f.pausedSandbox(t, "disk3", false, true, time.Minute)
	f.pausedSandbox(t, "long4", true, true, 50*time.Minute)
	c := control.New(f.config)

	for _, id := range []string{"noauto2", "disk3", "nosuch"} {
		if _, err := c.Resumable(ctx, id); err != control.ErrNoRoute {
			t.Errorf("Resumable(%s) = %v, want ErrNoRoute", id, err)
		}
		if _, err := c.AutoResume(ctx, id); err != control.ErrNoRoute {
			t.Errorf("AutoResume(%s) = %v, want ErrNoRoute", id, err)
		}
	}
	r, err := c.Resumable(ctx, "auto1")
	if err != nil || r.EnvdToken != "tok-auto1" || r.Host != "" {
		t.Fatalf("Resumable(auto1) = %+v, %v; want its token and no host", r, err)
	}
	r, err = c.AutoResume(ctx, "auto1")
	if err != nil || r.Host == "" || !f.node.isRunning("auto1") {
		t.Fatalf("AutoResume(auto1) = %+v, %v", r, err)
	}
	for id, want := range map[string]time.Duration{"auto1": 5 * time.Minute, "long4": 50 * time.Minute} {
		if id == "long4" {
			if _, err := c.AutoResume(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
		sb, err := f.store.GetSandbox(ctx, id)
		must(t, err)
		if d := time.Until(sb.EndAt); d < want-5*time.Second || d > want {
			t.Errorf("%s: deadline in %s, want %s", id, d, want)
		}
	}
	// Running: Resumable says no (the proxy routes it), AutoResume just routes.
	if _, err := c.Resumable(ctx, "auto1"); err != control.ErrNoRoute {
		t.Errorf("Resumable of a running sandbox = %v", err)
	}
	if r, err := c.AutoResume(ctx, "auto1"); err != nil || r.Host == "" {
		t.Errorf("AutoResume of a running sandbox = %+v, %v", r, err)
	}
	if got := fmt.Sprint(f.node.resumes); got != "[auto1 long4]" {
		t.Errorf("node resumes = %s", got)
	}
}

// A resume that fails at the node leaves the sandbox paused, its saved
// state kept for another try.
func TestFailedResumeStaysPaused(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.pausedSandbox(t, "sb1", true, false, time.Minute)
	f.node.mu.Lock()
	delete(f.node.saved, "paused/sb1") // the node cannot find it: Create fails
	f.node.mu.Unlock()
	c := control.New(f.config)
	if _, _, err := c.Connect(ctx, f.teamA, "sb1", time.Minute); err == nil {
		t.Fatal("connect succeeded without saved state")
	}
	sb, err := f.store.GetSandbox(ctx, "sb1")
	must(t, err)
	if sb.State != store.StatePaused || sb.Paused == nil || sb.Paused.Key != "paused/sb1" {
		t.Errorf("after a failed resume: %+v", sb)
	}
	var ce *control.Error
	if err := c.Pause(ctx, f.teamA, "sb1", true); !errors.As(err, &ce) || ce.Kind != control.Conflict {
		t.Errorf("pause of a paused sandbox = %v, want Conflict", err)
	}
}
