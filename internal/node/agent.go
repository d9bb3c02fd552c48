package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/warren-sh/warren/internal/runtime"
	"github.com/warren-sh/warren/internal/transfer"
)

// agentIdleTimeout is how long an idle connection into a guest's envd is
// kept. It must be shorter than envd's own idle timeout (640 s of guest
// time, which stands still while a warm VM is frozen), so that the host side
// always closes first and a request never goes out on a connection the
// guest is closing.
const agentIdleTimeout = 5 * time.Minute

// agent is the way into one VM's envd: its address, a pool of kept-alive
// connections and the VM's transfer disk, which live and die with the VM. A
// slot's address is reused by the next VM, which must never receive a dead
// one's connection, so the pool is the VM's, not the host's: closed when the
// VM goes. So is the transfer disk, whose file goes with the VM's state.
//
// Under TCG a new connection costs a fresh guest ~10 ms (the guest kernel's
// accept, envd's first read of it), on the path of every create and of the
// first command after it. So one connection is carried through a VM's life:
// waitListening's probe becomes /init's connection; a warm VM's warm-up
// connection stays open while it is frozen and serves the claim's /init; and
// the proxy forwards the sandbox's agent traffic over the same pool
// (Manager.AgentTransport), so the client's first command finds it open.
type agent struct {
	base      string // http://<slot address>:49983
	addr      string
	transport *http.Transport
	client    *http.Client
	probe     chan net.Conn // a connection waitListening made, for the next dial
	closed    atomic.Bool
	// transfer is the VM's transfer disk, for the proxy's uploads
	// (Manager.TransferDisk); nil until openTransfer, and for a VM without
	// one. Set before the sandbox (or warm VM) is handed out.
	transfer *transfer.Disk
}

// errAgentClosed fails requests through the pool of a VM that is gone: its
// slot address may already belong to another VM.
var errAgentClosed = errors.New("the sandbox's VM is gone")

var (
	// agentDialer dials envd for requests. No TCP keepalive: the peer is a
	// local VM whose death the node sees (the pool closes with it), and a
	// frozen warm VM cannot answer probes, so keepalive would only kill the
	// connection the claim wants to reuse. The timeout allows for a host
	// whose CPUs are saturated by other guests (under TCG, 20 idle clones
	// fill 2 cores).
	agentDialer = &net.Dialer{Timeout: 10 * time.Second, KeepAlive: -1}
	// probeDialer is the poll for envd's port: quick to give up, so the
	// next try comes soon.
	probeDialer = &net.Dialer{Timeout: 100 * time.Millisecond, KeepAlive: -1}
)

func newAgent(ip netip.Addr) *agent {
	addr := netip.AddrPortFrom(ip, envdPort).String()
	a := &agent{base: "http://" + addr, addr: addr, probe: make(chan net.Conn, 1)}
	a.transport = &http.Transport{
		Proxy:       nil, // never HTTP_PROXY: the guest is reached directly
		DialContext: a.dial,
		// The proxy forwards bodies as the guest sent them.
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     agentIdleTimeout,
		ReadBufferSize:      32 << 10,
		WriteBufferSize:     32 << 10,
	}
	a.client = &http.Client{Transport: a.transport}
	return a
}

// dial hands out waitListening's connection first, then dials.
func (a *agent) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if a.closed.Load() {
		return nil, errAgentClosed
	}
	if addr == a.addr {
		select {
		case c := <-a.probe:
			return c, nil
		default:
		}
	}
	return agentDialer.DialContext(ctx, network, addr)
}

// waitListening polls until envd accepts TCP connections, the VM exits or ctx
// ends, and keeps the connection that got through for the next request. A
// TCP accept is the guest kernel's work alone: under TCG every clone
// translates guest code anew, so an HTTP /health probe would make the clone
// run envd's HTTP path once more before /init, which runs it anyway.
func (a *agent) waitListening(ctx context.Context, vm runtime.VM) error {
	var last error
	for {
		c, err := probeDialer.DialContext(ctx, "tcp", a.addr)
		if err == nil {
			select {
			case a.probe <- c:
			default:
				c.Close()
			}
			return nil
		}
		last = err
		select {
		case <-vm.Done():
			return errors.New("the VM exited before envd listened")
		case <-ctx.Done():
			return fmt.Errorf("envd did not listen: %w (last: %v)", ctx.Err(), last)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// openTransfer opens vm's transfer disk, if it has one, once vm started.
func (a *agent) openTransfer(vm runtime.VM) error {
	p := vm.TransferDisk()
	if p == "" {
		return nil
	}
	d, err := transfer.Open(p)
	if err != nil {
		return fmt.Errorf("open the transfer disk: %w", err)
	}
	a.transfer = d
	return nil
}

// close drops the pool's idle connections and fails later dials and Puts
// on the transfer disk. Call it when the VM is gone or about to be:
// requests in flight end with the VM.
func (a *agent) close() {
	a.closed.Store(true)
	if a.transfer != nil {
		a.transfer.Close()
	}
	a.transport.CloseIdleConnections()
	select {
	case c := <-a.probe:
		c.Close()
	default:
	}
}
