package bench

import (
	"cmp"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"

	processpb "github.com/warren-sh/warren/gen/process"
	"github.com/warren-sh/warren/gen/process/processconnect"
	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/runtime/microvm"
	"github.com/warren-sh/warren/internal/template"
)

// restoreFloor restores n clones of a's snapshot, one at a time after one
// unmeasured warm-up (the first restore reads the memory file into the page
// cache), each in a slot of pool. For each it returns the milliseconds from
// runtime Start to envd's first /health 204 (what any create of the base
// template costs at least), then of the clone's first command, run straight
// through its envd as the SDK runs commands.run('echo ready'): under TCG a
// new QEMU process has translated none of the guest's code, and that first
// command pays for it whoever starts the VM. Each clone is killed before the
// next.
func restoreFloor(ctx context.Context, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, n int) (restore, first []float64, err error) {
	for i := range n + 1 {
		r, f, err := timeRestore(ctx, rt, pool, a, fmt.Sprintf("bench-floor-%d", i))
		if err != nil {
			return nil, nil, err
		}
		if i > 0 {
			restore, first = append(restore, r), append(first, f)
		}
	}
	return restore, first, nil
}

func timeRestore(ctx context.Context, rt *microvm.Runtime, pool *netns.Pool, a *template.Artifact, id string) (restoreMs, firstMs float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	slot, err := pool.Acquire(ctx, netns.Policy{})
	if err != nil {
		return 0, 0, fmt.Errorf("restore floor: acquire a slot: %w", err)
	}
	defer func() {
		if rerr := pool.Release(slot); rerr != nil && err == nil {
			err = fmt.Errorf("restore floor: release slot %s: %w", slot.Name, rerr)
		}
	}()
	began := time.Now()
	vm, err := rt.Start(ctx, a.Spec(id, slot))
	if err != nil {
		return 0, 0, fmt.Errorf("restore floor: restore %s: %w", id, err)
	}
	defer func() {
		if kerr := rt.Kill(context.Background(), vm); kerr != nil && err == nil {
			err = fmt.Errorf("restore floor: kill %s: %w", id, kerr)
		}
	}()
	base := "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983")
	for {
		select {
		case <-vm.Done():
			return 0, 0, fmt.Errorf("restore floor: QEMU of %s exited before envd answered", id)
		case <-ctx.Done():
			return 0, 0, fmt.Errorf("restore floor: envd of %s did not answer /health: %w", id, ctx.Err())
		default:
		}
		if healthy(ctx, base+"/health") {
			restoreMs = float64(time.Since(began).Microseconds()) / 1000
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	began = time.Now()
	if err := echoReady(ctx, base, cmp.Or(a.User, "user")); err != nil {
		return 0, 0, fmt.Errorf("restore floor: first command in %s: %w", id, err)
	}
	return restoreMs, float64(time.Since(began).Microseconds()) / 1000, nil
}

// echoReady runs `echo ready` in a login shell as user through envd at
// base, as the SDK's commands.run does (Basic auth naming the user), and
// waits for it to exit 0.
func echoReady(ctx context.Context, base, user string) error {
	client := processconnect.NewProcessClient(healthClient, base, connect.WithProtoJSON())
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{
		Cmd: "/bin/bash", Args: []string{"-l", "-c", "echo ready"},
	}})
	req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	stream, err := client.Start(ctx, req)
	if err != nil {
		return err
	}
	defer stream.Close()
	for stream.Receive() {
		if end := stream.Msg().GetEvent().GetEnd(); end != nil {
			if !end.GetExited() || end.GetExitCode() != 0 {
				return fmt.Errorf("echo ready ended %s", end.GetStatus())
			}
			return nil
		}
	}
	return fmt.Errorf("echo ready: no end event: %v", stream.Err())
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
