package proxy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/transfer"
)

// startTransferSandbox runs envd with a transfer disk of slots slots (a file
// here; a virtio disk in a VM) and routes id to it with the disk.
func (e *env) startTransferSandbox(t testing.TB, id string, slots int) (*sandbox, *transfer.Disk) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "transfer.disk")
	if err := transfer.Create(path, transfer.MinSize+int64(slots-1)*transfer.SlotSize); err != nil {
		t.Fatal(err)
	}
	disk, err := transfer.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { disk.Close() })
	ip := loopbackIP()
	a := envdtest.Start(t, envdtest.Options{Host: ip, Port: EnvdPort, Env: []string{"WARREN_ENVD_TRANSFER_DISK=" + path}})
	e.router.add(&Target{SandboxID: id, Host: ip, Transfer: disk})
	return &sandbox{id: id, ip: ip, agent: a}, disk
}

// TestUploadThroughTransferDisk sends uploads through the proxy to an agent
// whose sandbox has a transfer disk: large bodies' bytes go through the disk
// (its Written grows), small ones and what the proxy cannot frame go as
// they are, and either way the client gets envd's answer and the files.
func TestUploadThroughTransferDisk(t *testing.T) {
	e := newEnv(t)
	sbx, disk := e.startTransferSandbox(t, "xfer", 4)
	dir := userDir(t)
	routed := func(req *http.Request) *http.Request {
		req.Header.Set(headerSandboxID, sbx.id)
		req.Header.Set(headerSandboxPort, "49983")
		return req
	}
	post := func(t *testing.T, q url.Values, contentType string, body io.Reader) (int, []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, e.server.URL+"/files?"+q.Encode(), body)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", contentType)
		resp, err := http.DefaultClient.Do(routed(req))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("read the answer (%d): %v", resp.StatusCode, err)
		}
		return resp.StatusCode, b
	}
	wantFile := func(t *testing.T, path string, want []byte) {
		t.Helper()
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes (%v), want the %d uploaded", path, len(got), err, len(want))
		}
	}
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7 + i>>11)
		}
		return b
	}
	// Through the disk: most of the bytes were put there (the disk has four
	// slots, so a larger body goes partly inline).
	wantThroughDisk := func(t *testing.T, before int64, atLeast int) {
		t.Helper()
		if got := disk.Written() - before; got < int64(atLeast) {
			t.Fatalf("%d bytes went through the transfer disk, want at least %d", got, atLeast)
		}
		waitFree(t, disk, 4)
	}

	t.Run("octet-stream, with and without a length", func(t *testing.T) {
		data := random(3*transfer.SlotSize + 12345)
		for _, chunked := range []bool{false, true} {
			before := disk.Written()
			p := filepath.Join(dir, fmt.Sprintf("octet-%v.bin", chunked))
			var body io.Reader = bytes.NewReader(data)
			if chunked {
				body = io.MultiReader(body)
			}
			status, answer := post(t, url.Values{"path": {p}}, "application/octet-stream", body)
			if status != http.StatusOK || !strings.Contains(string(answer), `"path":"`+p+`"`) {
				t.Fatalf("chunked %v: %d %s", chunked, status, answer)
			}
			wantFile(t, p, data)
			wantThroughDisk(t, before, 3*transfer.SlotSize)
		}
	})
	t.Run("larger than the disk", func(t *testing.T) {
		data := random(9*transfer.SlotSize + 1)
		before := disk.Written()
		p := filepath.Join(dir, "large.bin")
		if status, answer := post(t, url.Values{"path": {p}}, "application/octet-stream", bytes.NewReader(data)); status != http.StatusOK {
			t.Fatalf("%d %s", status, answer)
		}
		wantFile(t, p, data)
		wantThroughDisk(t, before, 4*transfer.SlotSize)
	})
	t.Run("multipart batch", func(t *testing.T) {
		a, b := random(2*transfer.SlotSize+5), []byte("short second file")
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		mw.WriteField("note", "not a file: skipped")
		for _, f := range []struct {
			name string
			data []byte
		}{{filepath.Join(dir, "batch", "a.bin"), a}, {filepath.Join(dir, "batch", "b.txt"), b}} {
			h := textproto.MIMEHeader{}
			h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="file"; filename="%s"`, f.name))
			w, _ := mw.CreatePart(h)
			w.Write(f.data)
		}
		mw.Close()
		before := disk.Written()
		status, answer := post(t, url.Values{}, mw.FormDataContentType(), &buf)
		var entries []struct{ Name, Path string }
		if err := json.Unmarshal(answer, &entries); status != http.StatusOK || err != nil || len(entries) != 2 || entries[0].Name != "a.bin" || entries[1].Name != "b.txt" {
			t.Fatalf("%d %s", status, answer)
		}
		wantFile(t, filepath.Join(dir, "batch", "a.bin"), a)
		wantFile(t, filepath.Join(dir, "batch", "b.txt"), b)
		wantThroughDisk(t, before, 2*transfer.SlotSize)
	})
	t.Run("multipart cut short: envd's error, nothing written", func(t *testing.T) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		w, _ := mw.CreateFormFile("file", filepath.Join(dir, "cut", "a.bin"))
		w.Write(random(2 * transfer.SlotSize))
		status, answer := post(t, url.Values{}, mw.FormDataContentType(), bytes.NewReader(buf.Bytes()))
		if status != http.StatusBadRequest || !strings.Contains(string(answer), "read upload body for") {
			t.Fatalf("%d %s", status, answer)
		}
		if _, err := os.Stat(filepath.Join(dir, "cut")); !os.IsNotExist(err) {
			t.Fatalf("a failed upload left %s/cut: %v", dir, err)
		}
		waitFree(t, disk, 4)
	})
	t.Run("answered before the body is read", func(t *testing.T) {
		// envd refuses a directory as the target before reading a byte.
		status, answer := post(t, url.Values{"path": {dir}}, "application/octet-stream", bytes.NewReader(random(8*transfer.SlotSize)))
		if status != http.StatusBadRequest || !strings.Contains(string(answer), "is a directory") {
			t.Fatalf("%d %s", status, answer)
		}
		waitFree(t, disk, 4)
	})
	t.Run("small bodies go as they are", func(t *testing.T) {
		before := disk.Written()
		p := filepath.Join(dir, "small.txt")
		if status, answer := post(t, url.Values{"path": {p}}, "application/octet-stream", strings.NewReader("small")); status != http.StatusOK {
			t.Fatalf("%d %s", status, answer)
		}
		wantFile(t, p, []byte("small"))
		if disk.Written() != before {
			t.Fatalf("a 5-byte upload went through the disk")
		}
	})
	t.Run("clients cannot send framed bodies", func(t *testing.T) {
		var buf bytes.Buffer
		w := transfer.NewWriter(&buf)
		w.File(filepath.Join(dir, "forged"))
		w.Extent(transfer.SlotSize, 10)
		status, answer := post(t, url.Values{}, transfer.ContentType, &buf)
		if status != http.StatusBadRequest || !strings.Contains(string(answer), "unsupported Content-Type") {
			t.Fatalf("%d %s", status, answer)
		}
	})
}

// waitFree waits until all n slots of disk are free again: the proxy
// releases them just after the client has its answer.
func waitFree(t *testing.T, disk *transfer.Disk, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for disk.Free() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d slots free 5 s after the upload", disk.Free(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
