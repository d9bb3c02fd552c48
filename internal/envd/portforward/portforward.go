// Package portforward makes servers that listen only on the guest's loopback
// reachable from outside the sandbox, as E2B's envd does (ENVD.md §12): a
// dev server bound to 127.0.0.1:3000 must answer at <3000-sandboxID>.
//
// A Forwarder scans the kernel's TCP socket tables every Interval. For every
// port that something listens on at 127.0.0.1 or ::1 only, it listens on the
// guest's external address at the same port and copies each connection to
// the loopback listener; when that listener goes away, so does the forward.
// Only for use inside a sandbox VM: on a host it would expose private services.
package portforward

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Listener is a listening TCP socket from the kernel's tables.
type Listener struct {
	Addr netip.Addr
	Port uint16
}

// Forwarder re-exposes loopback-only listeners on an external address.
type Forwarder struct {
	// External is the address forwards listen on (the guest's eth0 address).
	External netip.Addr
	// Interval between scans; one second when zero.
	Interval time.Duration
	// Skip lists ports never forwarded (envd's own).
	Skip []uint16
	// Scan lists listening sockets; ReadProcNet when nil.
	Scan func() ([]Listener, error)
	Log  *slog.Logger

	mu     sync.Mutex
	active map[uint16]net.Listener
}

// Run scans and forwards until ctx is done, then closes every forward.
func (f *Forwarder) Run(ctx context.Context) {
	if f.Interval <= 0 {
		f.Interval = time.Second
	}
	if f.Scan == nil {
		f.Scan = ReadProcNet
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	f.active = map[uint16]net.Listener{}
	defer f.closeAll()
	t := time.NewTicker(f.Interval)
	defer t.Stop()
	for {
		f.sync()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sync opens forwards for new loopback-only ports and closes stale ones.
func (f *Forwarder) sync() {
	listeners, err := f.Scan()
	if err != nil {
		f.Log.Warn("scan listening sockets", "err", err)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := LoopbackOnly(listeners, f.External, f.active)
	for _, p := range f.Skip {
		delete(want, p)
	}
	for port, ln := range f.active {
		if !want[port] {
			ln.Close()
			delete(f.active, port)
			f.Log.Debug("stopped forwarding", "port", port)
		}
	}
	for port := range want {
		if _, ok := f.active[port]; ok {
			continue
		}
		ln, err := net.Listen("tcp", netip.AddrPortFrom(f.External, port).String())
		if err != nil {
			f.Log.Debug("forward loopback port", "port", port, "err", err)
			continue
		}
		f.active[port] = ln
		f.Log.Debug("forwarding loopback port", "port", port, "on", f.External)
		go serve(ln, port)
	}
}

func (f *Forwarder) closeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for port, ln := range f.active {
		ln.Close()
		delete(f.active, port)
	}
}

// serve copies each accepted connection to the loopback listener until ln closes.
func serve(ln net.Listener, port uint16) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go pipe(c, port)
	}
}

func pipe(c net.Conn, port uint16) {
	defer c.Close()
	var up net.Conn
	var err error
	for _, host := range []string{"127.0.0.1", "::1"} {
		if up, err = net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(int(port))), 2*time.Second); err == nil {
			break
		}
	}
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	copyHalf := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go copyHalf(up, c)
	go copyHalf(c, up)
	<-done
	<-done
}

// LoopbackOnly returns the ports that have a loopback listener and no
// listener that already answers on external (a wildcard or external itself),
// not counting the forwards already open (ours).
func LoopbackOnly[V any](listeners []Listener, external netip.Addr, ours map[uint16]V) map[uint16]bool {
	loop := map[uint16]bool{}
	reachable := map[uint16]bool{}
	for _, l := range listeners {
		_, forwarded := ours[l.Port]
		switch {
		case l.Addr == external && forwarded:
			// our own forward
		case l.Addr.IsLoopback():
			loop[l.Port] = true
		case l.Addr.IsUnspecified() || l.Addr == external:
			reachable[l.Port] = true
		}
	}
	for p := range reachable {
		delete(loop, p)
	}
	return loop
}

// ReadProcNet lists listening TCP sockets from /proc/net/tcp and /proc/net/tcp6.
func ReadProcNet() ([]Listener, error) {
	var all []Listener
	for _, path := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // no IPv6
		}
		if err != nil {
			return nil, err
		}
		ls, err := ParseProcNet(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		all = append(all, ls...)
	}
	return all, nil
}

// ParseProcNet reads the LISTEN rows of a /proc/net/tcp or tcp6 table.
func ParseProcNet(r io.Reader) ([]Listener, error) {
	const listenState = "0A"
	var out []Listener
	sc := bufio.NewScanner(r)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || fields[3] != listenState {
			continue
		}
		hexAddr, hexPort, ok := strings.Cut(fields[1], ":")
		if !ok {
			continue
		}
		port, err := strconv.ParseUint(hexPort, 16, 16)
		if err != nil {
			continue
		}
		addr, err := parseHexAddr(hexAddr)
		if err != nil {
			continue
		}
		out = append(out, Listener{Addr: addr, Port: uint16(port)})
	}
	return out, sc.Err()
}

// parseHexAddr decodes the kernel's address format: the address bytes as
// 32-bit words, each printed in host (little-endian) order.
func parseHexAddr(s string) (netip.Addr, error) {
	raw, err := hex.DecodeString(s)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.Addr{}, fmt.Errorf("bad address %q", s)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	a, _ := netip.AddrFromSlice(raw)
	return a.Unmap(), nil
}
