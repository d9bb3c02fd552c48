package control_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
)

// autoPauseSandbox stores a running sandbox of team A on node-1 created with
// autoPause, saving memory or not; the fake node runs it.
func (f *fixture) autoPauseSandbox(t *testing.T, id string, memory bool) {
	t.Helper()
	must(t, f.store.InsertSandbox(context.Background(), &store.Sandbox{
		ID: id, TeamID: f.teamA.ID, TemplateID: "t", NodeID: "node-1", State: store.StateRunning,
		EnvdAccessToken: "tok-" + id, AutoPause: true, AutoPauseMemory: memory,
		StartedAt: time.Now().Add(-time.Minute), EndAt: time.Now().Add(time.Hour),
	}))
	f.node.run(id)
}

// checkStates fails unless each sandbox is in the state wanted ("" = gone).
func (f *fixture) checkStates(t *testing.T, want map[string]store.SandboxState) {
	t.Helper()
	for id, state := range want {
		sb, err := f.store.GetSandbox(context.Background(), id)
		switch {
		case state == "" && !errors.Is(err, store.ErrNotFound):
			t.Errorf("%s: %v, %v; want it gone", id, sb, err)
		case state != "" && err != nil:
			t.Errorf("%s: %v; want %s", id, err, state)
		case state != "" && sb.State != state:
			t.Errorf("%s: state %s, want %s", id, sb.State, state)
		}
	}
}

// At shutdown the node's running sandboxes with autoPause are paused (memory
// as each asked) and the others killed. Another node's sandboxes sharing the
// store, and paused ones, are not touched.
func TestShutdownPausesAutoPauseAndKillsTheRest(t *testing.T) {
	f := newFixture(t)
	later := time.Now().Add(time.Hour)
	f.autoPauseSandbox(t, "mem1", true)
	f.autoPauseSandbox(t, "disk2", false)
	f.sandbox(t, "kill3", "node-1", store.StateRunning, later)
	f.sandbox(t, "othernode4", "node-2", store.StateRunning, later)
	f.pausedSandbox(t, "paused5", true, false, time.Minute)
	f.node.run("kill3")

	c := control.New(f.config)
	must(t, c.Reconcile(context.Background()))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c.Shutdown(ctx, 2)

	f.checkStates(t, map[string]store.SandboxState{
		"mem1": store.StatePaused, "disk2": store.StatePaused, "kill3": "",
		"othernode4": store.StateRunning, "paused5": store.StatePaused,
	})
	for id, memory := range map[string]bool{"mem1": true, "disk2": false} {
		sb, err := f.store.GetSandbox(ctx, id)
		must(t, err)
		if sb.Paused == nil || sb.Paused.Memory != memory {
			t.Errorf("%s: saved state %+v, want memory %v", id, sb.Paused, memory)
		}
		if _, err := c.Lookup(ctx, id); err == nil {
			t.Errorf("%s is paused but still routed", id)
		}
	}
	if got := fmt.Sprint(f.node.killed()); got != "[kill3]" {
		t.Errorf("node kills = %s, want only the sandbox without autoPause", got)
	}
	if got := slices.Sorted(slices.Values(f.node.paused())); fmt.Sprint(got) != "[disk2 memory=false mem1 memory=true]" {
		t.Errorf("node pauses = %v", got)
	}
	// The paused sandbox resumes, as after a restart.
	if _, resumed, err := c.Connect(ctx, f.teamA, "mem1", time.Minute); err != nil || !resumed {
		t.Errorf("connect after the shutdown: resumed %v, %v", resumed, err)
	}
}

// A pause that fails, or that the deadline cuts short or finds not begun,
// ends in a kill: every sandbox ends paused or gone, none pausing.
func TestShutdownKillsWhatItCannotPause(t *testing.T) {
	f := newFixture(t)
	for _, id := range []string{"fails1", "slow2", "fine3"} {
		f.autoPauseSandbox(t, id, true)
	}
	f.node.pauseHook = func(ctx context.Context, id string) error {
		switch id {
		case "fails1":
			return errors.New("disk full")
		case "slow2":
			<-ctx.Done() // a runtime gives up when ctx ends, the VM running on
			return ctx.Err()
		}
		return nil
	}
	c := control.New(f.config)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	began := time.Now()
	c.Shutdown(ctx, 3)
	if took := time.Since(began); took > 5*time.Second {
		t.Errorf("Shutdown took %s past a 200 ms deadline", took)
	}
	f.checkStates(t, map[string]store.SandboxState{"fails1": "", "slow2": "", "fine3": store.StatePaused})
	if got := fmt.Sprint(f.node.killed()); got != "[fails1 slow2]" {
		t.Errorf("node kills = %s", got)
	}

	// Past the deadline no pause begins: the sandbox is killed.
	f.autoPauseSandbox(t, "late4", true)
	f.node.pauseHook = func(ctx context.Context, id string) error {
		t.Errorf("a pause of %s began after the deadline", id)
		return nil
	}
	c.Shutdown(ctx, 3)
	f.checkStates(t, map[string]store.SandboxState{"late4": ""})
	if f.node.isRunning("late4") {
		t.Error("late4 still runs")
	}
}

// Pauses at shutdown run at most parallel at a time.
func TestShutdownPausesAFewAtATime(t *testing.T) {
	f := newFixture(t)
	ids := []string{"sb1", "sb2", "sb3", "sb4", "sb5", "sb6"}
	for _, id := range ids {
		f.autoPauseSandbox(t, id, true)
	}
	var mu sync.Mutex
	now, most := 0, 0
	f.node.pauseHook = func(ctx context.Context, id string) error {
		mu.Lock()
		now++
		most = max(most, now)
		mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		now--
		mu.Unlock()
		return nil
	}
	c := control.New(f.config)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c.Shutdown(ctx, 2)
	for _, id := range ids {
		f.checkStates(t, map[string]store.SandboxState{id: store.StatePaused})
	}
	if most != 2 {
		t.Errorf("%d pauses ran at once, want 2", most)
	}
}
