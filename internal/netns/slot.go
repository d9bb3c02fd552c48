package netns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// What the guest sees is identical in every slot, so a memory snapshot taken in one slot restores in any other:
// the guest's address, its gateway, its own MAC and its gateway's MAC (the guest's neighbour cache is part of the
// snapshot).
const (
	// TapName is the tap device QEMU attaches to, inside every slot's namespace.
	TapName = "tap0"
	// slotVethName is the slot's end of its veth pair, inside the slot's namespace.
	slotVethName = "eth0"
	// hostVethPrefix names the host's end of slot i's veth pair: "wv<i>".
	hostVethPrefix = "wv"
	// netnsPrefix names slot i's namespace: "warren-<i>".
	netnsPrefix = "warren-"
)

var (
	guestIP      = netip.MustParseAddr("169.254.0.21")
	guestGateway = netip.MustParseAddr("169.254.0.22") // tap0's address
	guestBits    = 30
	guestMAC     = net.HardwareAddr{0x06, 0x00, 0xa9, 0xfe, 0x00, 0x15}
	tapMAC       = net.HardwareAddr{0x06, 0x00, 0xa9, 0xfe, 0x00, 0x16}
	linkLocal    = netip.MustParsePrefix("169.254.0.0/16")
)

// Slot is one sandbox's network: a namespace holding the guest's tap device, NATed to a unique slot address that
// the host routes to. Its fields are read-only.
type Slot struct {
	// Name is the namespace's name, as `ip netns` shows it.
	Name string
	// Index numbers the slot within its pool; it picks the slot's addresses and host veth name.
	Index int
	// NetnsPath is the bind mount that pins the namespace, for tools that take a path (nsenter --net=PATH).
	NetnsPath string
	// TapName is the tap device for the guest's virtio-net, inside the namespace.
	TapName string
	// GuestIP is the guest's own address; GuestPrefix is its network (the guest and the tap side).
	GuestIP     netip.Addr
	GuestPrefix netip.Prefix
	// GuestGateway is the guest's default gateway, the tap side's address.
	GuestGateway netip.Addr
	// GuestMAC is the MAC the guest's NIC must use (QEMU's mac=); the namespace has a permanent neighbour entry for it.
	GuestMAC net.HardwareAddr
	// SlotIP is where the host reaches the guest: slotIP:port is DNATed to GuestIP:port.
	SlotIP netip.Addr
	// HostIP is the host's end of the slot's veth (the slot's gateway); the slot may not connect to it.
	HostIP netip.Addr

	ns       vnetns.NsHandle
	hostVeth string
	inUse    bool // guarded by Pool.mu
}

// Do runs fn inside the slot's namespace on a locked OS thread, so processes fn starts (QEMU) live in the
// namespace; goroutines fn starts do not. Call it only while the slot is acquired.
func (s *Slot) Do(fn func() error) error {
	if err := inNetns(s.ns, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", s.Name, err)
	}
	return nil
}

// slotAddrs returns slot i's /30: network+1 is the host side of the veth, network+2 the slot side (= SlotIP).
func slotAddrs(r netip.Prefix, i int) (host, slot netip.Addr) {
	b := r.Masked().Addr().As4()
	base := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n := base + uint32(4*i)
	at := func(v uint32) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return at(n + 1), at(n + 2)
}

// createSlot builds slot i from nothing. On error it removes whatever it made.
func createSlot(r netip.Prefix, i int) (s *Slot, err error) {
	hostIP, slotIP := slotAddrs(r, i)
	s = &Slot{
		Name:         netnsPrefix + strconv.Itoa(i),
		Index:        i,
		TapName:      TapName,
		GuestIP:      guestIP,
		GuestPrefix:  netip.PrefixFrom(guestIP, guestBits),
		GuestGateway: guestGateway,
		GuestMAC:     guestMAC,
		SlotIP:       slotIP,
		HostIP:       hostIP,
		hostVeth:     hostVethPrefix + strconv.Itoa(i),
	}
	s.NetnsPath = filepath.Join(netnsDir, s.Name)
	if s.ns, err = createNamedNetns(s.Name); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, s.destroy())
		}
	}()

	// The slot's veth end is created directly inside the namespace, so "eth0" never clashes with the host's.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.hostVeth}, PeerName: slotVethName, PeerNamespace: netlink.NsFd(s.ns)}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("create veth %s: %w", s.hostVeth, err)
	}
	if err := configureLink(nil, s.hostVeth, netip.PrefixFrom(hostIP, 30)); err != nil {
		return nil, err
	}

	h, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", s.Name, err)
	}
	defer h.Close()
	if err := configureLink(h, "lo", netip.Prefix{}); err != nil {
		return nil, err
	}
	if err := configureLink(h, slotVethName, netip.PrefixFrom(slotIP, 30)); err != nil {
		return nil, err
	}
	if err := h.RouteAdd(&netlink.Route{Gw: hostIP.AsSlice()}); err != nil {
		return nil, fmt.Errorf("add default route via %s in netns %s: %w", hostIP, s.Name, err)
	}
	// The tap must be created from inside the namespace: /dev/net/tun makes the device in the opener's namespace.
	// Forwarding is a per-namespace sysctl, written through this thread's /proc/sys/net.
	err = s.Do(func() error {
		if err := createTap(); err != nil {
			return err
		}
		return writeSysctl("net/ipv4/ip_forward", "1")
	})
	if err != nil {
		return nil, err
	}
	if err := configureTap(h); err != nil {
		return nil, fmt.Errorf("netns %s: %w", s.Name, err)
	}
	if err := installSlotTable(s.ns, hostIP, slotIP); err != nil {
		return nil, fmt.Errorf("netns %s: %w", s.Name, err)
	}
	if err := waitOperUp(nil, s.hostVeth); err != nil {
		return nil, err
	}
	if err := waitOperUp(h, slotVethName); err != nil {
		return nil, fmt.Errorf("netns %s: %w", s.Name, err)
	}
	return s, nil
}

// waitOperUp waits until the kernel reports the named link operationally up. A link that just got its carrier
// still drops what it sends until the kernel's link watcher attaches its queueing discipline (it sets the
// operational state in the same step), so the node's first packet to a new slot would be lost and retried a
// second later.
func waitOperUp(h *netlink.Handle, name string) error {
	if h == nil {
		h = &netlink.Handle{}
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find link %s: %w", name, err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("link %s is still %s after 2s", name, link.Attrs().OperState)
		}
		time.Sleep(time.Millisecond)
	}
}

// createTap creates the persistent tap device in the calling thread's namespace.
func createTap() error {
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: TapName}, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("create tap %s: %w", TapName, err)
	}
	for _, f := range tap.Fds { // the device is persistent; QEMU opens it again by name
		f.Close()
	}
	return nil
}

// configureTap gives tap0 the fixed gateway MAC and address and a permanent neighbour entry for the guest, which
// spares the first packet to a freshly started or restored guest a 1 s ARP retry.
func configureTap(h *netlink.Handle) error {
	tap, err := h.LinkByName(TapName)
	if err != nil {
		return fmt.Errorf("find %s: %w", TapName, err)
	}
	if err := h.LinkSetHardwareAddr(tap, tapMAC); err != nil {
		return fmt.Errorf("set %s MAC: %w", TapName, err)
	}
	if err := configureLink(h, TapName, netip.PrefixFrom(guestGateway, guestBits)); err != nil {
		return err
	}
	neigh := &netlink.Neigh{LinkIndex: tap.Attrs().Index, State: netlink.NUD_PERMANENT, Family: unix.AF_INET,
		IP: guestIP.AsSlice(), HardwareAddr: guestMAC}
	if err := h.NeighSet(neigh); err != nil {
		return fmt.Errorf("add neighbour %s %s on %s: %w", guestIP, guestMAC, TapName, err)
	}
	return nil
}

// configureLink sets an address (unless addr is the zero Prefix) on the named link and brings it up. A nil handle
// works in the host namespace.
func configureLink(h *netlink.Handle, name string, addr netip.Prefix) error {
	if h == nil {
		h = &netlink.Handle{}
	}
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if addr.IsValid() {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}
		if err := h.AddrAdd(link, a); err != nil {
			return fmt.Errorf("add address %s to %s: %w", addr, name, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// reset prepares an idle slot for the next sandbox: default-deny egress and no connection state of the last one.
// Without the conntrack flush, a flow the previous guest had opened would still count as established and let
// traffic through to (or from) the next guest, which has the same addresses. The host's own entries for such flows
// may stay: whatever they let through arrives at the slot as a new connection from a stranger, which the slot drops.
func (s *Slot) reset() error {
	if err := applyPolicy(s.ns, Policy{}); err != nil {
		return fmt.Errorf("netns %s: %w", s.Name, err)
	}
	h, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		return fmt.Errorf("netlink in netns %s: %w", s.Name, err)
	}
	defer h.Close()
	if err := h.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		return fmt.Errorf("flush conntrack in netns %s: %w", s.Name, err)
	}
	return nil
}

// destroy removes the slot's namespace and host veth. It is safe on a half-built slot.
func (s *Slot) destroy() error {
	if s.ns.IsOpen() {
		s.ns.Close()
	}
	var errs []error
	// Deleting the host end removes the pair at once, even if a leftover process still holds the namespace.
	if err := deleteLink(s.hostVeth); err != nil {
		errs = append(errs, err)
	}
	if err := deleteNamedNetns(s.Name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// deleteLink deletes a host link by name; a missing link is not an error.
func deleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		if errors.As(err, &netlink.LinkNotFoundError{}) {
			return nil
		}
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}
