package netns

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// These tests build real namespaces and need root. They start no VM; instead a "guest stand-in" namespace plays
// the guest (see attachGuestStandIn), and a "fake internet" namespace plays the world outside the host (see
// newFakeInternet). Probes run in-process: inNetns creates the socket on a thread inside the namespace, and the
// socket stays there for its lifetime. Every probe that must fail uses a short timeout.

const (
	probeTimeout = time.Second
	guestPort    = 8080
)

// Addresses of the fake internet, from TEST-NET-2 (RFC 5737), which no real network uses.
var (
	internetHostSide = netip.MustParsePrefix("198.51.100.1/30")
	internetServer   = netip.MustParsePrefix("198.51.100.2/30")
	metadataIP       = netip.MustParseAddr("169.254.169.254")
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds network namespaces, veth pairs and nftables tables")
	}
}

// newTestPool makes a pool that is closed when the test ends; Close failing fails the test.
func newTestPool(t testing.TB, cfg Config) *Pool {
	t.Helper()
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := NewPool(ctx, cfg)
	if err != nil {
		t.Fatalf("NewPool: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

func acquire(t testing.TB, p *Pool, policy Policy) *Slot {
	t.Helper()
	s, err := p.Acquire(context.Background(), policy)
	if err != nil {
		t.Fatalf("Acquire(%+v): %v", policy, err)
	}
	return s
}

// testNetns is a namespace the test owns, named warren-test-<role>-<random> (never warren-<digits>, so Reclaim
// leaves it alone).
type testNetns struct {
	name string
	ns   vnetns.NsHandle
}

func newTestNetns(t testing.TB, role string) *testNetns {
	t.Helper()
	name := fmt.Sprintf("warren-test-%s-%06x", role, rand.Uint32()&0xffffff)
	ns, err := createNamedNetns(name)
	if err != nil {
		t.Fatalf("create test netns: %v", err)
	}
	n := &testNetns{name: name, ns: ns}
	t.Cleanup(func() {
		ns.Close()
		if err := deleteNamedNetns(name); err != nil {
			t.Errorf("delete test netns: %v", err)
		}
	})
	return n
}

func (n *testNetns) handle(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(n.ns)
	if err != nil {
		t.Fatalf("netlink in %s: %v", n.name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// attachGuestStandIn plays the guest of slot s without a VM. With no QEMU attached, tap0 has no carrier, so the
// stand-in replaces it: a veth pair whose slot end is named tap0 (same name, MAC, address and neighbour entry, so
// every slot rule applies unchanged) and whose other end, "g0", sits in a new namespace with the guest's address
// and MAC and a default route via the tap side — exactly what the guest's kernel would have. Traffic between the
// node and the stand-in therefore takes the real forward path through the slot. The stand-in's loopback stays
// down and 127.0.0.0/8 is routed to the gateway, so it can also send what a hostile guest would: packets to
// 127.0.0.1 through the slot. When the test ends the real tap0 is put back.
func attachGuestStandIn(t testing.TB, s *Slot) *testNetns {
	t.Helper()
	guest := newTestNetns(t, "guest")
	sh, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		t.Fatalf("netlink in %s: %v", s.Name, err)
	}
	t.Cleanup(sh.Close)
	swapTap(t, sh, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: TapName}, PeerName: "g0", PeerNamespace: netlink.NsFd(guest.ns)})
	if err := configureTap(sh); err != nil {
		t.Fatalf("configure stand-in tap: %v", err)
	}
	t.Cleanup(func() { // runs before the guest namespace is deleted
		if err := deleteLinkIn(sh, TapName); err != nil {
			t.Errorf("remove stand-in tap: %v", err)
			return
		}
		if err := s.Do(createTap); err != nil {
			t.Errorf("restore tap: %v", err)
			return
		}
		if err := configureTap(sh); err != nil {
			t.Errorf("restore tap: %v", err)
		}
	})

	gh := guest.handle(t)
	g0, err := gh.LinkByName("g0")
	if err != nil {
		t.Fatalf("find g0: %v", err)
	}
	if err := gh.LinkSetHardwareAddr(g0, s.GuestMAC); err != nil {
		t.Fatalf("set guest MAC: %v", err)
	}
	if err := configureLink(gh, "g0", s.GuestPrefix); err != nil {
		t.Fatal(err)
	}
	if err := waitOperUp(sh, TapName); err != nil {
		t.Fatal(err)
	}
	if err := gh.RouteAdd(&netlink.Route{Gw: s.GuestGateway.AsSlice()}); err != nil {
		t.Fatalf("guest default route: %v", err)
	}
	loopback := &net.IPNet{IP: net.IPv4(127, 0, 0, 0), Mask: net.CIDRMask(8, 32)}
	if err := gh.RouteAdd(&netlink.Route{Dst: loopback, Gw: s.GuestGateway.AsSlice(), LinkIndex: g0.Attrs().Index}); err != nil {
		t.Fatalf("guest route 127.0.0.0/8 via gateway: %v", err)
	}
	return guest
}

func swapTap(t testing.TB, h *netlink.Handle, replacement netlink.Link) {
	t.Helper()
	if err := deleteLinkIn(h, TapName); err != nil {
		t.Fatalf("remove tap: %v", err)
	}
	if err := h.LinkAdd(replacement); err != nil {
		t.Fatalf("create stand-in tap: %v", err)
	}
}

func deleteLinkIn(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	return h.LinkDel(l)
}

// fakeInternet is a namespace standing in for the world outside the host: 198.51.100.2 (routed by the host over a
// veth) and 169.254.169.254, a cloud metadata look-alike. Both serve HTTP on port 80 ("internet") and TCP echo on
// port 7. The metadata address is reachable only by packets from the slot range (a policy routing rule), so
// without warren's rules a slot's probe to 169.254.169.254 would land here, never on a real network.
type fakeInternet struct {
	*testNetns
}

func newFakeInternet(t testing.TB, slotRange netip.Prefix) *fakeInternet {
	t.Helper()
	inet := &fakeInternet{newTestNetns(t, "inet")}
	hostVeth := fmt.Sprintf("wti%06x", rand.Uint32()&0xffffff) // not wv*: warren's host rules must not apply
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostVeth}, PeerName: "eth0", PeerNamespace: netlink.NsFd(inet.ns)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("create fake internet veth: %v", err)
	}
	t.Cleanup(func() {
		if err := deleteLink(hostVeth); err != nil {
			t.Error(err)
		}
	})
	if err := configureLink(nil, hostVeth, internetHostSide); err != nil {
		t.Fatal(err)
	}
	ih := inet.handle(t)
	if err := configureLink(ih, "eth0", internetServer); err != nil {
		t.Fatal(err)
	}
	if err := configureLink(ih, "lo", netip.PrefixFrom(metadataIP, 32)); err != nil {
		t.Fatal(err)
	}

	if err := waitOperUp(nil, hostVeth); err != nil {
		t.Fatal(err)
	}
	if err := waitOperUp(ih, "eth0"); err != nil {
		t.Fatal(err)
	}

	const table = 4242
	link, err := netlink.LinkByName(hostVeth)
	if err != nil {
		t.Fatal(err)
	}
	route := &netlink.Route{Dst: &net.IPNet{IP: metadataIP.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Gw: internetServer.Addr().AsSlice(), LinkIndex: link.Attrs().Index, Table: table}
	if err := netlink.RouteAdd(route); err != nil {
		t.Fatalf("add metadata route: %v", err)
	}
	rule := netlink.NewRule()
	rule.Src = &net.IPNet{IP: slotRange.Addr().AsSlice(), Mask: net.CIDRMask(slotRange.Bits(), 32)}
	rule.Table = table
	rule.Priority = table
	if err := netlink.RuleAdd(rule); err != nil {
		t.Fatalf("add policy routing rule: %v", err)
	}
	t.Cleanup(func() {
		if err := netlink.RuleDel(rule); err != nil {
			t.Errorf("delete policy routing rule: %v", err)
		}
	})

	serveHTTP(t, listenIn(t, inet.ns, "0.0.0.0:80"), "internet")
	serveEcho(t, listenIn(t, inet.ns, "0.0.0.0:7"))
	return inet
}

// listenIn opens a TCP listener inside ns; it is closed when the test ends.
func listenIn(t testing.TB, ns vnetns.NsHandle, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if ns == vnetns.None() {
		l, err := net.Listen("tcp4", addr)
		if err != nil {
			t.Fatalf("listen on %s: %v", addr, err)
		}
		return l
	}
	err := inNetns(ns, func() (err error) {
		l, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	return l
}

// serveGreeting answers every connection with greeting and closes it.
func serveGreeting(t testing.TB, l net.Listener, greeting string) {
	serve(t, l, func(c net.Conn) { io.WriteString(c, greeting+"\n") })
}

func serveEcho(t testing.TB, l net.Listener) {
	serve(t, l, func(c net.Conn) { io.Copy(c, c) })
}

func serve(t testing.TB, l net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				handle(c)
			}()
		}
	}()
}

func serveHTTP(t testing.TB, l net.Listener, body string) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, body) })}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Close(); <-done })
}

// dialIn connects from inside ns (vnetns.None() for the host) within probeTimeout.
func dialIn(ns vnetns.NsHandle, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: probeTimeout}
	if ns == vnetns.None() {
		return d.Dial("tcp4", addr)
	}
	var c net.Conn
	err := inNetns(ns, func() (err error) {
		c, err = d.Dial("tcp4", addr)
		return err
	})
	return c, err
}

// readGreeting connects from ns to addr and returns the first line the server sends.
func readGreeting(ns vnetns.NsHandle, addr string) (string, error) {
	c, err := dialIn(ns, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}

// httpGet fetches url from inside ns and returns the body.
func httpGet(ns vnetns.NsHandle, url string) (string, error) {
	client := &http.Client{Timeout: 2 * probeTimeout, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ns, addr)
		},
	}}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}

// isTimeout reports whether err is what a dropped packet looks like: no answer at all, not even a reset.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, unix.EHOSTUNREACH)
}

func hostPort(a netip.Addr, port int) string { return netip.AddrPortFrom(a, uint16(port)).String() }
