package node

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/template"
)

// A warm pool keeps a few sandboxes of a template restored ahead of the
// creates that will claim them: each in a network slot of its own (without
// internet access until claimed), its envd answering, its /init and command
// paths run once, then frozen (its vCPUs stopped: no CPU while it waits). A
// create that claims one gives the slot the create's egress policy, thaws
// the VM and sends the sandbox's /init (clock, entropy, token, env): the
// restore, the slot and the first run of envd's code under TCG are off its
// path. A background loop refills pools one VM at a time, once claims have
// been quiet for a moment (refillQuiet) and at the host's lowest CPU
// priority (runtime.Spec.Background), so that a refill slows neither the
// creates that emptied the pool nor their first commands.
//
// Warm VMs count against MaxSandboxes only in that the pool is not
// refilled past it: a create always finds room that a warm VM holds.

// refillQuiet is how long a pool waits after its last claim before it
// refills. A refill runs at the lowest CPU priority, yet under TCG on two
// cores a refill running beside a claimed sandbox's first commands still
// doubled them (SDK echo 150-230 ms against 70-100 ms with the refill held
// back 5 s, 2026-11-27): the claimer's first second is left alone.
const refillQuiet = time.Second

// warmVM is one ready, frozen VM of a pool.
type warmVM struct {
	vm       runtime.VM
	slot     *netns.Slot
	agent    *agent // its warm-up connection and transfer disk stay open while it is frozen
	artifact *template.Artifact
	at       time.Time // when it was ready
}

// SetWarmPool keeps size sandboxes of the template build in artifact (a
// SandboxSpec.Artifact) restored and ready. A smaller size kills the warm
// VMs past it before it returns (0 empties the pool).
func (m *Manager) SetWarmPool(artifact string, size int) error {
	a, err := m.artifact(artifact)
	if err != nil {
		return fmt.Errorf("node: warm pool: %w", err)
	}
	var surplus []*warmVM
	defer func() {
		for _, w := range surplus {
			m.discardWarm(context.Background(), w)
		}
	}()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("node: warm pool: the node is closed")
	}
	if pool := m.pools[a.Dir]; len(pool) > size {
		surplus = pool[max(size, 0):]
		m.pools[a.Dir] = pool[:max(size, 0)]
	}
	if m.poolSize == nil {
		m.poolSize = map[string]int{}
		m.pools = map[string][]*warmVM{}
		m.refill = make(chan struct{}, 1)
		m.watchers.Add(1)
		go m.refillLoop()
	}
	m.poolSize[a.Dir] = max(size, 0)
	m.poke()
	return nil
}

// poke wakes the refill loop. m.mu is held.
func (m *Manager) poke() {
	if m.refill == nil {
		return
	}
	select {
	case m.refill <- struct{}{}:
	default:
	}
}

// takeWarm claims a warm VM of the artifact's pool, or returns nil.
func (m *Manager) takeWarm(a *template.Artifact) *warmVM {
	m.mu.Lock()
	defer m.mu.Unlock()
	pool := m.pools[a.Dir]
	if len(pool) == 0 {
		return nil
	}
	w := pool[len(pool)-1]
	m.pools[a.Dir] = pool[:len(pool)-1]
	m.lastClaim = time.Now()
	m.poke()
	return w
}

// discardWarm kills a warm VM and frees its slot.
func (m *Manager) discardWarm(ctx context.Context, w *warmVM) {
	w.agent.close()
	if err := m.rt.Kill(ctx, w.vm); err != nil {
		m.log.Error("kill a warm VM; its slot stays taken", "vm", w.vm.ID(), "err", err)
		return
	}
	if err := m.slots.Release(w.slot); err != nil {
		m.log.Error("release a warm VM's slot", "vm", w.vm.ID(), "err", err)
	}
}

// refillLoop fills the pools whenever poked, until the node closes.
func (m *Manager) refillLoop() {
	defer m.watchers.Done()
	for {
		select {
		case <-m.closing:
			return
		case <-m.refill:
		}
		for {
			if !m.waitQuiet() {
				return
			}
			dir, ok := m.needsWarm()
			if !ok {
				break
			}
			a, err := m.artifact(dir)
			if err == nil {
				err = m.fillWarm(a)
			}
			if err != nil {
				m.log.Warn("warm pool: could not prepare a sandbox; retrying in 10 s", "template", dir, "err", err)
				select {
				case <-m.closing:
					return
				case <-time.After(10 * time.Second):
				}
			}
		}
	}
}

// waitQuiet waits until no warm VM was claimed for refillQuiet; false when
// the node closes meanwhile.
func (m *Manager) waitQuiet() bool {
	for {
		m.mu.Lock()
		wait := refillQuiet - time.Since(m.lastClaim)
		m.mu.Unlock()
		if wait <= 0 {
			return true
		}
		select {
		case <-m.closing:
			return false
		case <-time.After(wait):
		}
	}
}

// needsWarm names a pool below its size while the node has room.
func (m *Manager) needsWarm() (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return "", false
	}
	warm := 0
	for _, p := range m.pools {
		warm += len(p)
	}
	if len(m.sandboxes)+warm >= m.max {
		return "", false
	}
	for dir, size := range m.poolSize {
		if len(m.pools[dir]) < size {
			return dir, true
		}
	}
	return "", false
}

// fillWarm restores one VM of a, warms envd's paths and freezes it.
func (m *Manager) fillWarm(a *template.Artifact) (err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	go func() {
		select {
		case <-m.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	slot, err := m.slots.Acquire(ctx, netns.Policy{})
	if err != nil {
		return err
	}
	w := &warmVM{slot: slot, agent: newAgent(slot.SlotIP), artifact: a}
	defer func() {
		if err != nil {
			if w.vm != nil {
				m.discardWarm(context.WithoutCancel(ctx), w)
			} else {
				w.agent.close()
				if rerr := m.slots.Release(slot); rerr != nil {
					m.log.Error("release a warm VM's slot", "err", rerr)
				}
			}
		}
	}()
	suffix := make([]byte, 6)
	rand.Read(suffix)
	spec := a.Spec("warm-"+hex.EncodeToString(suffix), slot)
	spec.Background = true // the refill must not slow the creates that emptied the pool
	if w.vm, err = m.rt.Start(ctx, spec); err != nil {
		return err
	}
	if err := w.agent.openTransfer(w.vm); err != nil {
		return err
	}
	if err := w.agent.waitListening(ctx, w.vm); err != nil {
		return withConsole(err, w.vm)
	}
	// Under TCG every clone translates guest code anew: run the /init and
	// the command path once here, so the claim's run them warm.
	if _, err := m.initEnvd(ctx, w.agent, a.InitSecret, withTemplateDefaults(SandboxSpec{}, a)); err != nil {
		return withConsole(err, w.vm)
	}
	// As the SDK sends a command: Basic auth naming the user, a login shell.
	if err := m.runGuest(ctx, w.agent, "", cmp.Or(a.User, defaultUser), "/bin/bash", "-l", "-c", "echo ready"); err != nil {
		return err
	}
	if err := m.rt.Freeze(ctx, w.vm); err != nil {
		return err
	}
	w.at = time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	warm := 0
	for _, p := range m.pools {
		warm += len(p)
	}
	if m.closed || len(m.pools[a.Dir]) >= m.poolSize[a.Dir] || len(m.sandboxes)+warm >= m.max {
		err = errors.New("the pool is full, the node has no room left or it closed meanwhile")
		return err
	}
	m.pools[a.Dir] = append(m.pools[a.Dir], w)
	m.log.Debug("warm pool: sandbox ready", "template", filepath.Base(a.Dir), "vm", w.vm.ID(), "slot", slot.Name)
	return nil
}

// closeWarm kills every warm VM (Close).
func (m *Manager) closeWarm() {
	m.mu.Lock()
	var all []*warmVM
	for dir, p := range m.pools {
		all = append(all, p...)
		delete(m.pools, dir)
	}
	m.mu.Unlock()
	for _, w := range all {
		m.discardWarm(context.Background(), w)
	}
}

// runGuest runs a command through the guest's envd (as user, when set;
// else the default user) and waits for it to exit 0.
func (m *Manager) runGuest(ctx context.Context, ag *agent, token, user, cmd string, args ...string) error {
	proc := processconnect.NewProcessClient(ag.client, ag.base, connect.WithProtoJSON())
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: cmd, Args: args}})
	if token != "" {
		req.Header().Set("X-Access-Token", token)
	}
	if user != "" {
		req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	}
	stream, err := proc.Start(ctx, req)
	if err != nil {
		return fmt.Errorf("run %s in the guest: %w", cmd, err)
	}
	defer stream.Close()
	var (
		stderr bytes.Buffer
		end    *processpb.ProcessEvent_EndEvent
	)
	// Read to the stream's end, past the end event: a response read to its
	// end leaves its connection open for the next request (the agent's
	// pool), one closed early does not.
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			stderr.Write(d.GetStderr())
		}
		if e := ev.GetEnd(); e != nil {
			end = e
		}
	}
	switch {
	case end == nil:
		return fmt.Errorf("run %s in the guest: no end event: %v", cmd, stream.Err())
	case !end.GetExited() || end.GetExitCode() != 0:
		return fmt.Errorf("run %s in the guest: it ended %s: %s", cmd, end.GetStatus(), bytes.TrimSpace(stderr.Bytes()))
	}
	return nil
}

// PoolStatus is one warm pool.
type PoolStatus struct {
	// Artifact is the pool's template build directory (absolute).
	Artifact    string
	Ready, Size int
}

// WarmPools reports every warm pool that has a size or VMs, by artifact.
func (m *Manager) WarmPools() []PoolStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []PoolStatus
	for dir, size := range m.poolSize {
		if ready := len(m.pools[dir]); size > 0 || ready > 0 {
			out = append(out, PoolStatus{Artifact: dir, Ready: ready, Size: size})
		}
	}
	slices.SortFunc(out, func(a, b PoolStatus) int { return strings.Compare(a.Artifact, b.Artifact) })
	return out
}

// WarmPool reports how many VMs of the artifact's pool are ready, and its size.
func (m *Manager) WarmPool(artifact string) (ready, size int) {
	a, err := m.artifact(artifact)
	if err != nil {
		return 0, 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pools[a.Dir]), m.poolSize[a.Dir]
}
