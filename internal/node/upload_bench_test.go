package node_test

// Upload throughput into a real sandbox, split by layer so a slow upload can
// be placed (BENCHMARKS.md, "upload 100 MiB"):
//
//	disk          the guest writes 100 MiB to its root disk (dd): the floor of any upload
//	net           100 MiB from the host to a socket in the guest that discards them
//	envd/octet    POST /files, application/octet-stream, straight to envd at the slot address
//	envd/multipart  the same body as one multipart/form-data part (the SDK's ArrayBuffer/Blob form)
//	proxy/octet   the octet-stream POST through warren's proxy on loopback, as the SDK sends it
//	proxy/octet-chunked  the same without a length (chunked), as the SDK sends a ReadableStream
//	proxy+transfer/...   the same two through the sandbox's transfer disk (internal/transfer)
//
// Each reports MiB/s; run a few iterations:
//
//	go test ./internal/node/ -run '^$' -bench Upload -benchtime 3x

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/node"
	"github.com/warren-sh/warren/internal/proxy"
	"github.com/warren-sh/warren/internal/transfer"
)

const uploadSize = 100 << 20

func BenchmarkUpload(b *testing.B) {
	m := newManager(b, node.Config{})
	info := create(b, m, spec("benchupload"))
	token := "token-" + info.ID
	logLoad(b)
	b.Logf("guest eth0 features: %s", strings.TrimSpace(run(b, info, guestNetInfo)))

	payload := make([]byte, uploadSize)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(payload)
	envd := "http://" + net.JoinHostPort(info.Host, "49983")
	const target = "/home/user/upload.bin"

	b.Run("disk", func(b *testing.B) {
		var took time.Duration
		for b.Loop() {
			out := run(b, info, fmt.Sprintf("dd if=/dev/zero of=%s bs=1M count=%d 2>&1 && rm %s", target, uploadSize>>20, target))
			took += ddSeconds(b, out)
		}
		reportMiBps(b, took)
	})

	b.Run("net", func(b *testing.B) {
		var took time.Duration
		for b.Loop() {
			took += sinkIn(b, info, token, payload)
		}
		reportMiBps(b, took)
	})

	// post sends body with its length, or chunked (as the SDK sends a
	// ReadableStream) when chunked.
	post := func(b *testing.B, base, contentType string, body []byte, header http.Header, chunked bool) {
		b.Helper()
		var r io.Reader = bytes.NewReader(body)
		if chunked {
			r = struct{ io.Reader }{r} // hides the length
		}
		req, err := http.NewRequest(http.MethodPost, base+"/files?path="+target, r)
		if err != nil {
			b.Fatal(err)
		}
		for k, v := range header {
			req.Header[k] = v
		}
		req.Header.Set("Content-Type", contentType)
		req.Header.Set("X-Access-Token", token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			b.Fatalf("POST /files: %v", err)
		}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("POST /files answered %s: %s", resp.Status, answer)
		}
	}
	// check fails unless the guest's file holds the payload (after the
	// timing: a checksum of 100 MiB takes the guest a few seconds).
	sum := sha256.Sum256(payload)
	check := func(b *testing.B) {
		b.Helper()
		if got := strings.TrimSpace(run(b, info, "sha256sum "+target+" | cut -d' ' -f1 && rm "+target)); got != hex.EncodeToString(sum[:]) {
			b.Fatalf("%s has sha256 %s, the payload %x", target, got, sum)
		}
	}

	b.Run("envd/octet", func(b *testing.B) {
		for b.Loop() {
			post(b, envd, "application/octet-stream", payload, nil, false)
		}
		reportMiBps(b, b.Elapsed())
		check(b)
	})

	b.Run("envd/multipart", func(b *testing.B) {
		var form bytes.Buffer
		mw := multipart.NewWriter(&form)
		part, _ := mw.CreateFormFile("file", target)
		part.Write(payload)
		mw.Close()
		for b.Loop() {
			post(b, envd, mw.FormDataContentType(), form.Bytes(), nil, false)
		}
		reportMiBps(b, b.Elapsed())
		check(b)
	})

	// Through the proxy as the body came, then through the sandbox's
	// transfer disk as warren's proxy sends it.
	for _, via := range []struct {
		name string
		disk *transfer.Disk
	}{{"proxy", nil}, {"proxy+transfer", m.TransferDisk(info.ID)}} {
		p := proxy.New(proxy.Config{Router: fixedRouter{&proxy.Target{SandboxID: info.ID, Host: info.Host, EnvdToken: token, Transfer: via.disk}}})
		srv := httptest.NewServer(p.Wrap(http.NotFoundHandler()))
		routed := http.Header{"E2b-Sandbox-Id": {info.ID}, "E2b-Sandbox-Port": {"49983"}}
		for _, chunked := range []bool{false, true} {
			name := via.name + map[bool]string{false: "/octet", true: "/octet-chunked"}[chunked]
			b.Run(name, func(b *testing.B) {
				for b.Loop() {
					post(b, srv.URL, "application/octet-stream", payload, routed, chunked)
				}
				reportMiBps(b, b.Elapsed())
				check(b)
			})
		}
		srv.Close()
		p.Close()
	}
}

// guestNetInfo prints what decides the guest's receive path: eth0's MTU and
// the virtio feature bits the guest negotiated.
const guestNetInfo = `echo "mtu $(cat /sys/class/net/eth0/mtu)"; for d in /sys/bus/virtio/devices/*; do ` +
	`[ "$(cat $d/device)" = 0x0001 ] && echo "virtio-net features $(cat $d/features)"; done; true`

// reportMiBps reports uploadSize per iteration over took as MiB/s.
func reportMiBps(b *testing.B, took time.Duration) {
	b.ReportMetric(float64(b.N)*uploadSize/(1<<20)/took.Seconds(), "MiB/s")
}

var ddCopied = regexp.MustCompile(`copied, ([0-9.]+) s`)

// ddSeconds is the time dd reports for its copy.
func ddSeconds(b *testing.B, out string) time.Duration {
	b.Helper()
	m := ddCopied.FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("dd printed no time: %q", out)
	}
	s, _ := strconv.ParseFloat(m[1], 64)
	return time.Duration(s * float64(time.Second))
}

// sinkPort is where the guest's discarding listener waits.
const sinkPort = 40123

// sinkScript accepts one connection, reads it to the end into nothing and
// answers the byte count.
var sinkScript = fmt.Sprintf(`python3 -c '
import socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", %d)); l.listen(1); print("listening", flush=True)
c, _ = l.accept(); buf = bytearray(1 << 20); n = 0
while True:
    k = c.recv_into(buf)
    if k == 0: break
    n += k
c.sendall(str(n).encode()); c.close()
'`, sinkPort)

// sinkIn sends payload to a discarding listener in the guest and returns the
// time from connecting to its byte count.
func sinkIn(b *testing.B, info *node.SandboxInfo, token string, payload []byte) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		r, err := execIn(ctx, info, token, sinkScript)
		if err == nil && (!r.exited || r.exitCode != 0) {
			err = fmt.Errorf("sink ended with %d (%s): %s", r.exitCode, r.status, r.out)
		}
		done <- err
	}()
	addr := net.JoinHostPort(info.Host, strconv.Itoa(sinkPort))
	var conn net.Conn
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		if conn, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("dial the guest's sink: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer conn.Close()
	began := time.Now()
	if _, err := conn.Write(payload); err != nil {
		b.Fatalf("send to the sink: %v", err)
	}
	conn.(*net.TCPConn).CloseWrite()
	got, err := bufio.NewReader(conn).ReadString(0)
	if err != io.EOF || got != strconv.Itoa(len(payload)) {
		b.Fatalf("the sink counted %q (%v), want %d", got, err, len(payload))
	}
	took := time.Since(began)
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	return took
}

// fixedRouter routes to one running sandbox.
type fixedRouter struct{ t *proxy.Target }

func (f fixedRouter) Lookup(_ context.Context, id string) (*proxy.Target, error) {
	if id != f.t.SandboxID {
		return nil, proxy.ErrSandboxNotFound
	}
	return f.t, nil
}

func (f fixedRouter) Running(context.Context) ([]*proxy.Target, error) {
	return []*proxy.Target{f.t}, nil
}
