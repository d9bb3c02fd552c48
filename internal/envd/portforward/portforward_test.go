package portforward

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// A /proc/net/tcp excerpt: 127.0.0.1:8080 and 0.0.0.0:22 listening, one
// established connection.
const procTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 1500FEA9:C383 1600FEA9:0050 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0 20 4 30 10 -1
`

// /proc/net/tcp6: ::1:3000 and [::]:5000 listening.
const procTCP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4 1 0 100 0 0 10 0
   1: 00000000000000000000000000000000:1388 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 100 0 0 10 0
`

func TestParseProcNet(t *testing.T) {
	got, err := ParseProcNet(strings.NewReader(procTCP))
	if err != nil {
		t.Fatal(err)
	}
	got6, err := ParseProcNet(strings.NewReader(procTCP6))
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, got6...)
	want := []Listener{
		{netip.MustParseAddr("127.0.0.1"), 8080},
		{netip.MustParseAddr("0.0.0.0"), 22},
		{netip.MustParseAddr("::1"), 3000},
		{netip.MustParseAddr("::"), 5000},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("listener %d = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestLoopbackOnly(t *testing.T) {
	ext := netip.MustParseAddr("169.254.0.21")
	l := func(a string, p uint16) Listener { return Listener{netip.MustParseAddr(a), p} }
	listeners := []Listener{
		l("127.0.0.1", 3000), // loopback only: forward
		l("::1", 3001),       // loopback only (IPv6): forward
		l("127.0.0.1", 4000), // also on the wildcard: already reachable
		l("0.0.0.0", 4000),
		l("127.0.0.1", 5000), // also on the external address
		l("169.254.0.21", 5000),
		l("127.0.0.1", 6000), // forwarded by us already: keep
		l("169.254.0.21", 6000),
	}
	got := LoopbackOnly(listeners, ext, map[uint16]bool{6000: true})
	want := map[uint16]bool{3000: true, 3001: true, 6000: true}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for p := range want {
		if !got[p] {
			t.Errorf("port %d not forwarded (got %v)", p, got)
		}
	}
}

// The forwarder serves a loopback-only HTTP server on another address, and
// stops when the server's listener disappears from the scan.
func TestForwarderFollowsListeners(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "loopback only") })}
	go srv.Serve(ln)
	defer srv.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	var mu sync.Mutex
	listening := []Listener{{netip.MustParseAddr("127.0.0.1"), port}}
	f := &Forwarder{
		External: netip.MustParseAddr("127.0.0.2"), Interval: 20 * time.Millisecond,
		Scan: func() ([]Listener, error) {
			mu.Lock()
			defer mu.Unlock()
			return append([]Listener(nil), listening...), nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	url := "http://127.0.0.2:" + strconv.Itoa(int(port)) + "/"
	var body string
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if body != "loopback only" {
		t.Fatalf("through the forward: %q, want the loopback server's answer", body)
	}

	mu.Lock()
	listening = nil // the server went away
	mu.Unlock()
	deadline = time.Now().Add(3 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", "127.0.0.2:"+strconv.Itoa(int(port)), 200*time.Millisecond)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("forward still listening after its loopback listener disappeared")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
