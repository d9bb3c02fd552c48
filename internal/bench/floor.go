package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/template"
)

// restoreFloor restores n clones of a's snapshot, one at a time after one
// unmeasured warm-up (the first restore reads the memory file into the page
// cache), each in a slot of pool, and returns the milliseconds from runtime
// Start to envd's first /health 204: what any create of the base template
// costs at least. Each clone is killed before the next.
func restoreFloor(ctx context.Context, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, n int) ([]float64, error) {
	var out []float64
	for i := range n + 1 {
		ms, err := timeRestore(ctx, rt, pool, a, fmt.Sprintf("bench-floor-%d", i))
		if err != nil {
			return nil, err
		}
		if i > 0 {
			out = append(out, ms)
		}
	}
	return out, nil
}

func timeRestore(ctx context.Context, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, id string) (ms float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	slot, err := pool.Acquire(ctx, netns.Policy{})
	if err != nil {
		return 0, fmt.Errorf("restore floor: acquire a slot: %w", err)
	}
	defer func() {
		if rerr := pool.Release(slot); rerr != nil && err == nil {
			err = fmt.Errorf("restore floor: release slot %s: %w", slot.Name, rerr)
		}
	}()
	began := time.Now()
	vm, err := rt.Start(ctx, a.Spec(id, slot))
	if err != nil {
		return 0, fmt.Errorf("restore floor: restore %s: %w", id, err)
	}
	defer func() {
		if kerr := rt.Kill(context.Background(), vm); kerr != nil && err == nil {
			err = fmt.Errorf("restore floor: kill %s: %w", id, kerr)
		}
	}()
	url := "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983") + "/health"
	for {
		select {
		case <-vm.Done():
			return 0, fmt.Errorf("restore floor: QEMU of %s exited before envd answered", id)
		case <-ctx.Done():
			return 0, fmt.Errorf("restore floor: envd of %s did not answer /health: %w", id, ctx.Err())
		default:
		}
		if healthy(ctx, url) {
			return float64(time.Since(began).Microseconds()) / 1000, nil
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// healthClient polls as the node benchmarks do: a short connect timeout, since
// a SYN sent before the guest runs is lost and retried only after a second.
var healthClient = &http.Client{Transport: &http.Transport{
	DisableKeepAlives: true,
	DialContext:       (&net.Dialer{Timeout: 50 * time.Millisecond}).DialContext,
}}

func healthy(ctx context.Context, url string) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := healthClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusNoContent
}

// loopbackServer is the floor of file transfers: an HTTP server on 127.0.0.1
// that keeps the body of the last POST (answering its length) and serves it
// back on GET. The SDK script copies the same bytes through it with the same
// fetch it uses for the SDK.
type loopbackServer struct {
	URL string
	srv *http.Server

	mu   sync.Mutex
	body []byte
}

func startLoopback() (*loopbackServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("loopback floor server: %w", err)
	}
	l := &loopbackServer{URL: "http://" + ln.Addr().String() + "/blob"}
	l.srv = &http.Server{Handler: l, ReadHeaderTimeout: 10 * time.Second}
	go l.srv.Serve(ln)
	return l, nil
}

func (l *loopbackServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodPost:
		l.mu.Lock()
		defer l.mu.Unlock()
		buf := l.body[:0]
		if r.ContentLength > 0 && int64(cap(buf)) < r.ContentLength {
			buf = make([]byte, 0, r.ContentLength)
		}
		var err error
		for {
			if len(buf) == cap(buf) {
				buf = append(buf, 0)[:len(buf)]
			}
			var n int
			n, err = r.Body.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+n]
			if err != nil {
				break
			}
		}
		if err != io.EOF {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		l.body = buf
		io.WriteString(w, strconv.Itoa(len(buf)))
	case http.MethodGet:
		l.mu.Lock()
		body := l.body
		l.mu.Unlock()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	default:
		http.Error(w, "POST or GET", http.StatusMethodNotAllowed)
	}
}

func (l *loopbackServer) Close() error { return l.srv.Close() }
