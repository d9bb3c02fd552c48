package netns

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Table names: one warren-owned table per namespace, so removing warren's rules is dropping a table.
const (
	hostTableName = "warren"
	slotTableName = "warren-slot"
	egressChain   = "egress"
)

// nftConn opens an nftables connection to the namespace ns (vnetns.None() for the host).
func nftConn(ns vnetns.NsHandle) (*nftables.Conn, error) {
	if ns == vnetns.None() {
		return nftables.New()
	}
	return nftables.New(nftables.WithNetNSFd(int(ns)))
}

// installHostTable creates the host's table (ruleset below, in nft syntax). The rules name slots by the host veth
// prefix, so they never change as slots come and go.
//
//	table inet warren {
//	  chain input {       # a slot may not open connections to any address of the host, 127.0.0.0/8 included
//	    type filter hook input priority filter; policy accept;
//	    iifname "wv*" ct state established,related accept
//	    iifname "wv*" drop
//	  }
//	  chain forward {     # only replies enter a slot: no other slot, no LAN peer can open connections into one;
//	    type filter hook forward priority filter; policy accept;
//	    oifname "wv*" ct state established,related accept
//	    oifname "wv*" drop
//	    iifname "wv*" ip daddr 169.254.0.0/16 drop  # link-local, cloud metadata (169.254.169.254)
//	  }
//	  chain postrouting { # slot egress leaves with the host's address
//	    type nat hook postrouting priority srcnat; policy accept;
//	    ip saddr <range> oifname != "wv*" masquerade
//	  }
//	}
func installHostTable(slotRange netip.Prefix) error {
	c, err := nftConn(vnetns.None())
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: hostTableName})
	input := c.AddChain(filterChain(t, "input", nftables.ChainHookInput, nftables.ChainPolicyAccept))
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: join(iifname(hostVethPrefix+"*"), ctState(established|related), accept())})
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: join(iifname(hostVethPrefix+"*"), drop())})

	forward := c.AddChain(filterChain(t, "forward", nftables.ChainHookForward, nftables.ChainPolicyAccept))
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(oifname(hostVethPrefix+"*"), ctState(established|related), accept())})
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(oifname(hostVethPrefix+"*"), drop())})
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(iifname(hostVethPrefix+"*"), ipDaddr(linkLocal), drop())})

	post := c.AddChain(natChain(t, "postrouting", nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource))
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: join(ipSaddr(slotRange), oifnameNot(hostVethPrefix+"*"), masquerade())})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s in host: %w", hostTableName, err)
	}
	return nil
}

// installSlotTable creates a slot's table (ruleset below, in nft syntax). The egress chain holds the per-sandbox
// policy and is rewritten by applyPolicy.
//
//	table inet warren-slot {
//	  chain prerouting {  # the node dials slotIP:port and reaches the guest's port
//	    type nat hook prerouting priority dstnat; policy accept;
//	    iifname "eth0" ip daddr <slotIP> dnat ip to 169.254.0.21
//	  }
//	  chain postrouting { # guest egress leaves with the slot address
//	    type nat hook postrouting priority srcnat; policy accept;
//	    oifname "eth0" ip saddr 169.254.0.21 snat ip to <slotIP>
//	  }
//	  chain input {       # nothing in the slot namespace itself (QEMU) is reachable from the guest or the host
//	    type filter hook input priority filter; policy drop;
//	    ct state established,related accept
//	    iifname "lo" accept
//	  }
//	  chain forward {
//	    type filter hook forward priority filter; policy drop;
//	    ct state established,related accept
//	    iifname "eth0" oifname "tap0" ip saddr <hostIP> ct status dnat accept  # the node dialing slotIP
//	    iifname "tap0" oifname "eth0" ip saddr 169.254.0.21 jump egress       # forged guest sources are dropped
//	  }
//	  chain egress { }    # AllowInternet: "accept"; otherwise empty, so the forward policy drops it
//	}
//
// Only the host's end of the veth (the source the host's routing picks to reach slotIP) may open connections to
// the guest: a stale host conntrack entry of an earlier sandbox in this slot can forward a stranger's packet here,
// and it must not reach the new guest.
func installSlotTable(ns vnetns.NsHandle, hostIP, slotIP netip.Addr) error {
	c, err := nftConn(ns)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: slotTableName})
	pre := c.AddChain(natChain(t, "prerouting", nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest))
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: join(iifname(slotVethName), ipDaddr(netip.PrefixFrom(slotIP, 32)), dnatTo(guestIP))})

	post := c.AddChain(natChain(t, "postrouting", nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource))
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: join(oifname(slotVethName), ipSaddr(netip.PrefixFrom(guestIP, 32)), snatTo(slotIP))})

	input := c.AddChain(filterChain(t, "input", nftables.ChainHookInput, nftables.ChainPolicyDrop))
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: join(ctState(established|related), accept())})
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: join(iifname("lo"), accept())})

	egress := c.AddChain(&nftables.Chain{Table: t, Name: egressChain})
	forward := c.AddChain(filterChain(t, "forward", nftables.ChainHookForward, nftables.ChainPolicyDrop))
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(ctState(established|related), accept())})
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(iifname(slotVethName), oifname(TapName), ipSaddr(netip.PrefixFrom(hostIP, 32)), ctStatus(dstNAT), accept())})
	c.AddRule(&nftables.Rule{Table: t, Chain: forward, Exprs: join(iifname(TapName), oifname(slotVethName), ipSaddr(netip.PrefixFrom(guestIP, 32)), jump(egress.Name))})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", slotTableName, err)
	}
	return nil
}

// applyPolicy replaces the slot's egress chain with the rules for p, atomically.
func applyPolicy(ns vnetns.NsHandle, p Policy) error {
	c, err := nftConn(ns)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: slotTableName}
	egress := &nftables.Chain{Table: t, Name: egressChain}
	c.FlushChain(egress)
	if p.AllowInternet {
		c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: accept()})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("set egress policy: %w", err)
	}
	return nil
}

// deleteHostTable drops the host's table; a missing table is not an error.
func deleteHostTable() error {
	c, err := nftConn(vnetns.None())
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == hostTableName {
			c.DelTable(t)
			if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete nftables table inet %s: %w", hostTableName, err)
			}
		}
	}
	return nil
}

func filterChain(t *nftables.Table, name string, hook *nftables.ChainHook, policy nftables.ChainPolicy) *nftables.Chain {
	return &nftables.Chain{Table: t, Name: name, Type: nftables.ChainTypeFilter, Hooknum: hook,
		Priority: nftables.ChainPriorityFilter, Policy: &policy}
}

func natChain(t *nftables.Table, name string, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
	return &nftables.Chain{Table: t, Name: name, Type: nftables.ChainTypeNAT, Hooknum: hook, Priority: prio}
}

// The helpers below each build one nft match or statement, so a rule reads like its nft text.

func join(parts ...[]expr.Any) []expr.Any {
	var all []expr.Any
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}

// ifnameData encodes an interface name the way nft does: "wv*" compares only the prefix, a full name is
// compared NUL-padded to IFNAMSIZ.
func ifnameData(name string) []byte {
	if n := len(name); n > 0 && name[n-1] == '*' {
		return []byte(name[:n-1])
	}
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func iifname(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameData(name)},
	}
}

func oifname(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameData(name)},
	}
}

func oifnameNot(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifnameData(name)},
	}
}

func ipSaddr(p netip.Prefix) []expr.Any { return ipAddrMatch(12, p) }
func ipDaddr(p netip.Prefix) []expr.Any { return ipAddrMatch(16, p) }

// ipAddrMatch matches the IPv4 header field at offset against p; in an inet table it first checks the packet is
// IPv4, as nft does implicitly.
func ipAddrMatch(offset uint32, p netip.Prefix) []expr.Any {
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
	}
	if p.Bits() < 32 {
		m := prefixMask(p.Bits())
		e = append(e, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m[:], Xor: make([]byte, 4)})
	}
	network := p.Masked().Addr().As4()
	return append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: network[:]})
}

func prefixMask(bits int) [4]byte {
	var m [4]byte
	for i := 0; i < bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// Conntrack bits as the kernel defines them (uapi nf_conntrack_common.h).
const (
	established = expr.CtStateBitESTABLISHED
	related     = expr.CtStateBitRELATED
	dstNAT      = 1 << 5 // IPS_DST_NAT
)

func ctState(bits uint32) []expr.Any  { return ctBits(expr.CtKeySTATE, bits) }
func ctStatus(bits uint32) []expr.Any { return ctBits(expr.CtKeySTATUS, bits) }

func ctBits(key expr.CtKey, bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: key},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func dnatTo(a netip.Addr) []expr.Any { return natTo(expr.NATTypeDestNAT, a) }
func snatTo(a netip.Addr) []expr.Any { return natTo(expr.NATTypeSourceNAT, a) }

func natTo(typ expr.NATType, a netip.Addr) []expr.Any {
	b := a.As4()
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: b[:]},
		&expr.NAT{Type: typ, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() []expr.Any   { return []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}} }
func jump(chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chain}}
}
func masquerade() []expr.Any { return []expr.Any{&expr.Masq{}} }
