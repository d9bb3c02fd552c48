package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func TestHostReachesGuestAtSlotIP(t *testing.T) {
	p := newTestPool(t, Config{})
	// Without internet access: the node must still reach the guest's ports.
	a := acquire(t, p, Policy{AllowInternet: false})
	b := acquire(t, p, Policy{AllowInternet: false})
	for _, s := range []*Slot{a, b} {
		guest := attachGuestStandIn(t, s)
		serveGreeting(t, listenIn(t, guest.ns, hostPort(s.GuestIP, guestPort)), "guest of "+s.Name)
	}
	for _, s := range []*Slot{a, b} {
		got, err := readGreeting(vnetns.None(), hostPort(s.SlotIP, guestPort))
		if err != nil {
			t.Fatalf("host → %s (%s): %v", s.SlotIP, s.Name, err)
		}
		if want := "guest of " + s.Name; got != want {
			t.Errorf("host → %s: got %q, want %q", s.SlotIP, got, want)
		}
	}
}

func TestGuestCannotReachHostOtherSlotsOrMetadata(t *testing.T) {
	p := newTestPool(t, Config{})
	// Internet access on, so every refusal below comes from isolation, not from the egress policy.
	a := acquire(t, p, Policy{AllowInternet: true})
	b := acquire(t, p, Policy{AllowInternet: true})
	newFakeInternet(t, p.cfg.Range)
	guestA := attachGuestStandIn(t, a)
	guestB := attachGuestStandIn(t, b)

	hostVethA := listenIn(t, vnetns.None(), hostPort(a.HostIP, 0))
	serveGreeting(t, hostVethA, "host veth of A")
	hostLoopback := listenIn(t, vnetns.None(), "127.0.0.1:0")
	serveGreeting(t, hostLoopback, "host loopback")
	hostVethB := listenIn(t, vnetns.None(), hostPort(b.HostIP, 0))
	serveGreeting(t, hostVethB, "host veth of B")
	serveGreeting(t, listenIn(t, guestB.ns, hostPort(b.GuestIP, guestPort)), "guest of B")
	slotA := listenIn(t, a.ns, "0.0.0.0:0") // something in slot A's namespace itself, as QEMU would be
	serveGreeting(t, slotA, "slot namespace of A")

	// Controls: each target answers when asked by someone allowed to, so a failed probe means blocked, not absent.
	controls := []struct {
		name  string
		from  func() (string, error)
		wants string
	}{
		{"host → B's guest", func() (string, error) { return readGreeting(vnetns.None(), hostPort(b.SlotIP, guestPort)) }, "guest of B"},
		{"guest A → the internet", func() (string, error) { return httpGet(guestA.ns, "http://"+internetServer.Addr().String()) }, "internet"},
		{"slot-range source → metadata look-alike", func() (string, error) {
			d := net.Dialer{Timeout: probeTimeout, LocalAddr: &net.TCPAddr{IP: a.HostIP.AsSlice()}}
			c, err := d.Dial("tcp4", hostPort(metadataIP, 7))
			if err != nil {
				return "", err
			}
			c.Close()
			return "connected", nil
		}, "connected"},
	}
	for _, c := range controls {
		got, err := c.from()
		if err != nil || got != c.wants {
			t.Fatalf("control %s: got %q, %v; want %q", c.name, got, err, c.wants)
		}
	}

	port := func(l net.Listener) int { return l.Addr().(*net.TCPAddr).Port }
	blocked := []struct {
		name string
		addr string
	}{
		{"host side of its own veth", hostPort(a.HostIP, port(hostVethA))},
		{"host loopback through the gateway", fmt.Sprintf("127.0.0.1:%d", port(hostLoopback))},
		{"host side of another slot's veth", hostPort(b.HostIP, port(hostVethB))},
		{"another slot's guest at its SlotIP", hostPort(b.SlotIP, guestPort)},
		{"its own slot namespace via the tap gateway", hostPort(a.GuestGateway, port(slotA))},
		{"its own slot namespace via SlotIP", hostPort(a.SlotIP, port(slotA))},
		{"cloud metadata 169.254.169.254", hostPort(metadataIP, 7)},
	}
	for _, c := range blocked {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel() // each probe waits out its timeout
			conn, err := dialIn(guestA.ns, c.addr)
			if err == nil {
				conn.Close()
				t.Fatalf("guest A connected to %s", c.addr)
			}
			if !isTimeout(err) {
				t.Errorf("guest A → %s: %v; want a timeout (packets dropped), an answer means the target saw it", c.addr, err)
			}
		})
	}
}

func TestEgressPolicy(t *testing.T) {
	p := newTestPool(t, Config{})
	newFakeInternet(t, p.cfg.Range)
	for _, allow := range []bool{true, false} {
		t.Run(fmt.Sprintf("AllowInternet=%v", allow), func(t *testing.T) {
			s := acquire(t, p, Policy{AllowInternet: allow})
			t.Cleanup(func() { p.Release(s) })
			guest := attachGuestStandIn(t, s)
			serveGreeting(t, listenIn(t, guest.ns, hostPort(s.GuestIP, guestPort)), "guest")

			body, err := httpGet(guest.ns, "http://"+internetServer.Addr().String())
			if allow && (err != nil || body != "internet") {
				t.Errorf("guest → internet: got %q, %v; want %q", body, err, "internet")
			}
			if !allow && err == nil {
				t.Errorf("guest → internet: got %q; want no connection", body)
			}
			if got, err := readGreeting(vnetns.None(), hostPort(s.SlotIP, guestPort)); err != nil || got != "guest" {
				t.Errorf("host → guest: got %q, %v; the node must always reach the guest", got, err)
			}
		})
	}
}

func TestSetPolicyOnASlotInUse(t *testing.T) {
	p := newTestPool(t, Config{})
	newFakeInternet(t, p.cfg.Range)
	s := acquire(t, p, Policy{}) // as a warm pool's VM waits
	t.Cleanup(func() { p.Release(s) })
	guest := attachGuestStandIn(t, s)
	serveGreeting(t, listenIn(t, guest.ns, hostPort(s.GuestIP, guestPort)), "guest")
	if _, err := httpGet(guest.ns, "http://"+internetServer.Addr().String()); err == nil {
		t.Fatal("guest reached the internet before SetPolicy allowed it")
	}

	if err := p.SetPolicy(s, Policy{AllowInternet: true}); err != nil {
		t.Fatalf("SetPolicy(allow): %v", err)
	}
	if body, err := httpGet(guest.ns, "http://"+internetServer.Addr().String()); err != nil || body != "internet" {
		t.Errorf("guest → internet after SetPolicy(allow): got %q, %v", body, err)
	}
	conn := openEcho(t, guest.ns, "allowed")

	if err := p.SetPolicy(s, Policy{}); err != nil {
		t.Fatalf("SetPolicy(deny): %v", err)
	}
	if _, err := httpGet(guest.ns, "http://"+internetServer.Addr().String()); err == nil {
		t.Error("guest reached the internet after SetPolicy took it away")
	}
	if err := echo(conn, "denied"); err == nil {
		t.Error("a connection opened while allowed still passes after SetPolicy took internet access away")
	}
	if got, err := readGreeting(vnetns.None(), hostPort(s.SlotIP, guestPort)); err != nil || got != "guest" {
		t.Errorf("host → guest after SetPolicy(deny): got %q, %v; the node must always reach the guest", got, err)
	}

	idle := acquire(t, p, Policy{})
	if err := p.Release(idle); err != nil {
		t.Fatal(err)
	}
	if err := p.SetPolicy(idle, Policy{AllowInternet: true}); err == nil {
		t.Error("SetPolicy on an idle slot succeeded; want an error")
	}
}

func TestReleaseThenAcquireReusesAndResetsSlot(t *testing.T) {
	p := newTestPool(t, Config{})
	newFakeInternet(t, p.cfg.Range)
	first := acquire(t, p, Policy{AllowInternet: true})
	guest := attachGuestStandIn(t, first)

	// A connection the first sandbox opened, still open when its slot is released.
	conn := openEcho(t, guest.ns, "before release")

	if err := p.Release(first); err != nil {
		t.Fatalf("Release: %v", err)
	}
	second := acquire(t, p, Policy{AllowInternet: false})
	if second != first || second.Name != first.Name {
		t.Fatalf("Acquire after Release built %s; want the released %s reused", second.Name, first.Name)
	}
	if _, err := httpGet(guest.ns, "http://"+internetServer.Addr().String()); err == nil {
		t.Error("reused slot kept the last sandbox's internet access")
	}
	if err := echo(conn, "after release"); err == nil {
		t.Error("a connection of the last sandbox still passes: connection tracking was not reset")
	}

	if err := p.Release(second); err != nil {
		t.Fatalf("Release: %v", err)
	}
	third := acquire(t, p, Policy{AllowInternet: true})
	if third != first {
		t.Fatalf("second reuse built %s; want %s", third.Name, first.Name)
	}
	if body, err := httpGet(guest.ns, "http://"+internetServer.Addr().String()); err != nil || body != "internet" {
		t.Errorf("reused slot with AllowInternet: got %q, %v", body, err)
	}
	if err := p.Release(third); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := p.Release(third); err == nil {
		t.Error("releasing an idle slot again succeeded; want an error")
	}
}

// openEcho opens a connection from ns to the fake internet's echo port,
// checks that msg comes back and leaves it open until the test ends.
func openEcho(t *testing.T, ns vnetns.NsHandle, msg string) net.Conn {
	t.Helper()
	conn, err := dialIn(ns, hostPort(internetServer.Addr(), 7))
	if err != nil {
		t.Fatalf("guest → internet echo: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := echo(conn, msg); err != nil {
		t.Fatalf("echo %q: %v", msg, err)
	}
	return conn
}

func echo(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(probeTimeout))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := c.Read(buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo returned %q, want %q", buf, msg)
	}
	return nil
}

func TestReclaimRemovesCrashLeftovers(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Cleanup(func() { // whatever the test left, with a context of its own: ctx is gone by now
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := Reclaim(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := Reclaim(ctx); err != nil {
		t.Fatalf("Reclaim with nothing to reclaim: %v", err)
	}
	bystander := newTestNetns(t, "keep") // shares the warren- prefix, but is not a slot

	crashed, err := NewPool(ctx, Config{})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		acquire(t, crashed, Policy{AllowInternet: true})
	}
	// The process "dies": its file descriptors close, its lock goes, everything it built stays.
	for _, s := range crashed.slots {
		s.ns.Close()
	}
	// Counted while the lock is still held: a pool of another process
	// waiting for it (a VM test elsewhere) reclaims as soon as it goes.
	if n := len(leftovers(t)); n != 7 { // 3 namespaces, 3 veths, 1 table
		t.Fatalf("before Reclaim: %d leftovers %v; want 7", n, leftovers(t))
	}
	crashed.lock.Close()
	if err := Reclaim(ctx); err != nil {
		t.Fatalf("Reclaim: %v", err)
	}
	if l := leftovers(t); len(l) != 0 {
		t.Errorf("after Reclaim: %v remain", l)
	}
	if !strings.Contains(run(t, "ip", "netns", "list"), bystander.name) {
		t.Errorf("Reclaim removed %s, which is not a slot", bystander.name)
	}
	if err := Reclaim(ctx); err != nil {
		t.Errorf("second Reclaim: %v", err)
	}

	// A new pool starts from scratch at index 0.
	p := newTestPool(t, Config{})
	if s := acquire(t, p, Policy{}); s.Index != 0 {
		t.Errorf("first slot after reclaim has index %d; want 0", s.Index)
	}
}

// leftovers lists what `ip netns list`, `ip link` and the host's nftables tables show of warren.
func leftovers(t *testing.T) []string {
	t.Helper()
	var found []string
	for _, line := range strings.Split(run(t, "ip", "netns", "list"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && slotNetnsName.MatchString(f[0]) {
			found = append(found, "netns "+f[0])
		}
	}
	for _, line := range strings.Split(run(t, "ip", "-o", "link"), "\n") {
		if f := strings.Fields(line); len(f) > 1 && hostVethName.MatchString(strings.Split(f[1], "@")[0]) {
			found = append(found, "link "+f[1])
		}
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if strings.HasPrefix(tb.Name, "warren") {
			found = append(found, "nft table "+tb.Name)
		}
	}
	return found
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestConcurrentAcquireGetsDistinctSlots(t *testing.T) {
	p := newTestPool(t, Config{})
	const n = 8
	acquireAll := func() []*Slot {
		slots := make([]*Slot, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { slots[i], errs[i] = p.Acquire(context.Background(), Policy{AllowInternet: i%2 == 0}) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("concurrent Acquire: %v", err)
		}
		return slots
	}
	distinct := func(slots []*Slot) map[int]bool {
		indices, names, ips := map[int]bool{}, map[string]bool{}, map[netip.Addr]bool{}
		for _, s := range slots {
			indices[s.Index], names[s.Name], ips[s.SlotIP] = true, true, true
		}
		if len(indices) != n || len(names) != n || len(ips) != n {
			t.Fatalf("%d acquires got %d indices, %d names, %d slot IPs; want all distinct", n, len(indices), len(names), len(ips))
		}
		return indices
	}
	slots := acquireAll()
	first := distinct(slots)

	var wg sync.WaitGroup
	for _, s := range slots {
		wg.Go(func() {
			if err := p.Release(s); err != nil {
				t.Errorf("Release %s: %v", s.Name, err)
			}
		})
	}
	wg.Wait()
	second := distinct(acquireAll())
	for i := range second {
		if !first[i] {
			t.Errorf("after releasing all, Acquire built slot %d instead of reusing one of %v", i, first)
		}
	}
}

func TestAcquireStopsAtMaxSlots(t *testing.T) {
	p := newTestPool(t, Config{Range: netip.MustParsePrefix("10.200.0.0/16"), MaxSlots: 2})
	acquire(t, p, Policy{})
	acquire(t, p, Policy{})
	if _, err := p.Acquire(context.Background(), Policy{}); !errors.Is(err, ErrExhausted) {
		t.Errorf("third Acquire with MaxSlots 2: %v; want ErrExhausted", err)
	}
}

func TestNewPoolRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Range: netip.MustParsePrefix("fd00::/64")},
		{Range: netip.MustParsePrefix("10.200.0.0/31")},
		{Range: netip.MustParsePrefix("10.200.0.0/24"), MaxSlots: 65},
		{MaxSlots: -1},
	} {
		if p, err := NewPool(context.Background(), cfg); err == nil {
			p.Close()
			t.Errorf("NewPool(%+v) succeeded; want an error", cfg)
		}
	}
}

func TestSlotAddresses(t *testing.T) {
	r := netip.MustParsePrefix("10.200.0.0/16")
	for _, c := range []struct {
		index        int
		host, slotIP string
	}{
		{0, "10.200.0.1", "10.200.0.2"},
		{1, "10.200.0.5", "10.200.0.6"},
		{64, "10.200.1.1", "10.200.1.2"},
		{16383, "10.200.255.253", "10.200.255.254"},
	} {
		host, slot := slotAddrs(r, c.index)
		if host.String() != c.host || slot.String() != c.slotIP {
			t.Errorf("slot %d: host %s, slot %s; want %s, %s", c.index, host, slot, c.host, c.slotIP)
		}
	}
}

// BenchmarkAcquire measures building a new slot, handing out an idle one, and Release (off the sandbox's critical
// path; it deletes the egress rule, and nftables waits for an RCU grace period to delete rules).
func BenchmarkAcquire(b *testing.B) {
	b.Run("build", func(b *testing.B) {
		p := newTestPool(b, Config{})
		for b.Loop() {
			acquire(b, p, Policy{AllowInternet: true})
		}
	})
	b.Run("reuse", func(b *testing.B) {
		p := newTestPool(b, Config{})
		s := acquire(b, p, Policy{})
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			if err := p.Release(s); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			s = acquire(b, p, Policy{AllowInternet: true})
		}
	})
	b.Run("release", func(b *testing.B) {
		p := newTestPool(b, Config{})
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			s := acquire(b, p, Policy{AllowInternet: true})
			b.StartTimer()
			if err := p.Release(s); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestDoRunsInsideTheSlot(t *testing.T) {
	p := newTestPool(t, Config{})
	s := acquire(t, p, Policy{})
	var st unix.Stat_t
	if err := unix.Stat(s.NetnsPath, &st); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)

	var child string
	var tap error
	err := s.Do(func() error {
		_, tap = net.InterfaceByName(s.TapName)
		out, err := exec.Command("readlink", "/proc/self/ns/net").Output()
		child = strings.TrimSpace(string(out))
		return err
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if child != want {
		t.Errorf("process started in Do is in %s; want the slot's %s", child, want)
	}
	if tap != nil {
		t.Errorf("inside Do: %s not found: %v", s.TapName, tap)
	}
	if _, err := net.InterfaceByName(s.TapName); err == nil {
		t.Errorf("after Do: %s is visible in the caller's namespace", s.TapName)
	}
	if err := s.Do(func() error { return errors.New("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("Do returned %v; want fn's error", err)
	}
}
