// Package netns gives every sandbox a network slot: its own Linux network namespace, wired to the host and fenced
// with nftables. Everything is done from Go through netlink and nftables; nothing execs ip or nft.
//
// # Layout of slot i (default range 10.200.0.0/16)
//
//	host netns                        slot netns "warren-<i>"                        guest (QEMU)
//	wv<i> range+4i+1/30  <── veth ──>  eth0 range+4i+2/30 = SlotIP
//	                                   tap0 169.254.0.22/30, MAC 06:00:a9:fe:00:16  <──  169.254.0.21/30,
//	                                                                                      MAC 06:00:a9:fe:00:15
//	(slot 0: wv0 10.200.0.1, SlotIP 10.200.0.2; slot 1: wv1 10.200.0.5, SlotIP 10.200.0.6; ...)
//
// The guest looks the same in every slot (address, gateway, both MACs, tap name), so a memory snapshot taken in
// one slot restores in any other. Each slot gets one /30 of the configured range: network+1 is the host end of its
// veth, network+2 the slot end and also the SlotIP the node dials. Carving /30s needs no routes, proxy ARP or
// neighbour tricks: the kernel's connected routes do all the routing, at the cost of 4 addresses per slot (16384
// slots in a /16, far more than a host runs).
//
// Inside the slot, traffic to SlotIP is DNATed to the guest and guest egress is SNATed to SlotIP; the host
// masquerades slot egress out of its own interfaces and has IPv4 forwarding on. The rules, one warren-owned
// nftables table per namespace (installHostTable and installSlotTable show them in nft syntax):
//
//   - host (table inet warren): a slot may not open connections to any host address (127.0.0.0/8 included), to
//     another slot, or to link-local 169.254.0.0/16 (cloud metadata); nothing but the host itself may open
//     connections into a slot. Only replies pass the other way.
//   - slot (table inet warren-slot): the node's connections to SlotIP reach the guest; guest egress passes the
//     per-sandbox egress chain, which accepts everything when Policy.AllowInternet and nothing otherwise; the
//     namespace itself (where QEMU runs) accepts no connections; guest packets with a forged source are dropped.
//
// # Lifecycle
//
// NewPool reclaims leftovers of a crashed node, installs the host table and takes a host-wide lock, since slot
// names are fixed and one pool owns them all. Acquire hands out an idle slot or builds a new one; Release resets the
// per-sandbox state (egress policy, connection tracking) and keeps the namespace for the next sandbox; Close
// removes every slot and the host table.
package netns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config sizes a Pool.
type Config struct {
	// Range is the IPv4 network slot addresses are carved from, one /30 per slot; default 10.200.0.0/16. It must
	// not overlap networks the host reaches otherwise.
	Range netip.Prefix
	// MaxSlots caps how many slots exist at once; default, and at most, the number of /30s in Range.
	MaxSlots int
}

// Policy is what one sandbox's guest may reach; Acquire applies it and Release resets it.
type Policy struct {
	// AllowInternet lets the guest open connections out of the host. Without it the guest can only answer
	// connections the host opened.
	AllowInternet bool
}

// DefaultRange is the slot address range used when Config.Range is unset.
var DefaultRange = netip.MustParsePrefix("10.200.0.0/16")

// ErrExhausted means every slot the pool may have is in use.
var ErrExhausted = errors.New("netns: all network slots are in use")

// ErrClosed means the pool was closed.
var ErrClosed = errors.New("netns: pool is closed")

// lockPath is the host-wide lock one Pool holds for its lifetime: slot names are fixed, so two pools (two nodes, or
// two test binaries) on one host would tear down each other's slots.
const lockPath = "/run/warren/netns.lock"

// Pool hands out network slots and reuses them. It is safe for concurrent use.
type Pool struct {
	cfg  Config
	lock *os.File

	mu       sync.Mutex
	slots    map[int]*Slot // every built slot, idle or in use
	building map[int]bool  // indices reserved by an Acquire that is building the slot
	idle     []*Slot
	closed   bool
	builds   sync.WaitGroup // Acquires building a slot; Close waits for them
}

// NewPool takes the host-wide slot lock (waiting for another pool to close, until ctx ends), removes leftovers of
// a crashed pool and installs the host's rules.
func NewPool(ctx context.Context, cfg Config) (*Pool, error) {
	if !cfg.Range.IsValid() {
		cfg.Range = DefaultRange
	}
	if !cfg.Range.Addr().Is4() || cfg.Range.Bits() > 30 {
		return nil, fmt.Errorf("netns: slot range %s is not an IPv4 network of /30 or larger", cfg.Range)
	}
	cfg.Range = cfg.Range.Masked()
	capacity := 1 << (30 - cfg.Range.Bits())
	if cfg.MaxSlots == 0 {
		cfg.MaxSlots = capacity
	}
	if cfg.MaxSlots < 0 || cfg.MaxSlots > capacity {
		return nil, fmt.Errorf("netns: max slots %d is not between 1 and %d, the /30s in %s", cfg.MaxSlots, capacity, cfg.Range)
	}

	lock, err := takeLock(ctx)
	if err != nil {
		return nil, err
	}
	p := &Pool{cfg: cfg, lock: lock, slots: map[int]*Slot{}, building: map[int]bool{}}
	if err := p.setup(); err != nil {
		lock.Close()
		return nil, err
	}
	return p, nil
}

func (p *Pool) setup() error {
	if err := reclaim(); err != nil {
		return err
	}
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return fmt.Errorf("netns: enable forwarding in host: %w", err)
	}
	if err := installHostTable(p.cfg.Range); err != nil {
		return fmt.Errorf("netns: %w", err)
	}
	return nil
}

// takeLock takes the exclusive host-wide lock, polling because flock cannot be interrupted by a context.
func takeLock(ctx context.Context) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(lockPath), 0o755); err != nil {
		return nil, fmt.Errorf("netns: create lock dir: %w", err)
	}
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("netns: open lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("netns: lock %s: %w", lockPath, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("netns: another warren pool holds the network slots (lock %s): %w", lockPath, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Acquire returns a slot with policy applied: an idle one if there is one (well under a millisecond), else a
// newly built one (a few milliseconds; ctx is checked before, not during, the build).
func (p *Pool) Acquire(ctx context.Context, policy Policy) (*Slot, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if n := len(p.idle); n > 0 {
		s := p.idle[n-1]
		p.idle = p.idle[:n-1]
		s.inUse = true
		p.mu.Unlock()
		if err := applyPolicy(s.ns, policy); err != nil {
			p.discard(s)
			return nil, fmt.Errorf("netns %s: %w", s.Name, err)
		}
		return s, nil
	}
	i := p.freeIndex()
	if i < 0 {
		p.mu.Unlock()
		return nil, ErrExhausted
	}
	p.building[i] = true
	p.builds.Add(1)
	p.mu.Unlock()

	s, err := p.build(i, policy)
	p.mu.Lock()
	delete(p.building, i)
	if err == nil && p.closed {
		err = errors.Join(ErrClosed, s.destroy())
	} else if err == nil {
		s.inUse = true
		p.slots[i] = s
	}
	p.mu.Unlock()
	p.builds.Done()
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (p *Pool) build(i int, policy Policy) (*Slot, error) {
	s, err := createSlot(p.cfg.Range, i)
	if err != nil {
		return nil, fmt.Errorf("netns: build slot %d: %w", i, err)
	}
	if err := applyPolicy(s.ns, policy); err != nil {
		return nil, errors.Join(fmt.Errorf("netns %s: %w", s.Name, err), s.destroy())
	}
	return s, nil
}

// freeIndex returns the lowest index neither built nor being built, or -1. Called with p.mu held.
func (p *Pool) freeIndex() int {
	for i := 0; i < p.cfg.MaxSlots; i++ {
		if p.slots[i] == nil && !p.building[i] {
			return i
		}
	}
	return -1
}

// SetPolicy changes what the guest of s, a slot in use, may reach (a warm
// VM's slot takes the policy of the create that claims it). Taking internet
// access away also drops the connections the guest had opened.
func (p *Pool) SetPolicy(s *Slot, policy Policy) error {
	p.mu.Lock()
	inUse := p.slots[s.Index] == s && s.inUse && !p.closed
	p.mu.Unlock()
	if !inUse {
		return fmt.Errorf("netns: set the policy of %s: slot is not in use by this pool", s.Name)
	}
	if policy.AllowInternet {
		if err := applyPolicy(s.ns, policy); err != nil {
			return fmt.Errorf("netns %s: %w", s.Name, err)
		}
		return nil
	}
	return s.reset()
}

// Release resets s for the next sandbox and makes it idle. The sandbox's processes in the namespace must have
// exited. If the reset fails the slot is destroyed instead, so a half-reset slot is never handed out.
func (p *Pool) Release(s *Slot) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil // Close removed every slot
	}
	if p.slots[s.Index] != s || !s.inUse {
		p.mu.Unlock()
		return fmt.Errorf("netns: release %s: slot is not in use by this pool", s.Name)
	}
	s.inUse = false
	p.mu.Unlock()

	if err := s.reset(); err != nil {
		return errors.Join(fmt.Errorf("netns: release: %w", err), p.discard(s))
	}
	p.mu.Lock()
	if !p.closed {
		p.idle = append(p.idle, s)
	}
	p.mu.Unlock()
	return nil
}

// discard destroys a slot and forgets it.
func (p *Pool) discard(s *Slot) error {
	p.mu.Lock()
	if p.closed { // Close owns the teardown now
		p.mu.Unlock()
		return nil
	}
	delete(p.slots, s.Index)
	p.building[s.Index] = true // keep the index until its links are gone
	p.mu.Unlock()
	err := s.destroy()
	p.mu.Lock()
	delete(p.building, s.Index)
	p.mu.Unlock()
	return err
}

// Close removes every slot, idle or in use, and the host's rules, then gives up the host-wide lock.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	p.builds.Wait()

	var errs []error
	for _, s := range p.slots {
		if err := s.destroy(); err != nil {
			errs = append(errs, err)
		}
	}
	p.slots, p.idle = nil, nil
	if err := deleteHostTable(); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, p.lock.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("netns: close pool: %w", err)
	}
	return nil
}

// Reclaim removes what a crashed pool left behind: every slot namespace, every slot veth and the host's table.
// It does nothing when nothing is left, and waits (until ctx ends) while a live pool holds the slots.
func Reclaim(ctx context.Context) error {
	lock, err := takeLock(ctx)
	if err != nil {
		return err
	}
	defer lock.Close()
	return reclaim()
}

var (
	slotNetnsName = regexp.MustCompile(`^` + netnsPrefix + `[0-9]+$`)
	hostVethName  = regexp.MustCompile(`^` + hostVethPrefix + `[0-9]+$`)
)

// reclaim matches names exactly (warren-<digits>, wv<digits>), so namespaces and links that merely share the
// prefix are left alone. Called with the host-wide lock held.
func reclaim() error {
	var errs []error
	// Links first: a namespace whose last reference goes away is torn down in the background, taking its veth pair
	// with it, so a link listed a moment ago may be gone by the time it is deleted.
	links, err := netlink.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("list links: %w", err))
	}
	for _, l := range links {
		if l.Type() == "veth" && hostVethName.MatchString(l.Attrs().Name) {
			if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete link %s: %w", l.Attrs().Name, err))
			}
		}
	}
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("list %s: %w", netnsDir, err))
	}
	for _, e := range entries {
		if slotNetnsName.MatchString(e.Name()) {
			errs = append(errs, deleteNamedNetns(e.Name()))
		}
	}
	errs = append(errs, deleteHostTable())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("netns: reclaim: %w", err)
	}
	return nil
}
