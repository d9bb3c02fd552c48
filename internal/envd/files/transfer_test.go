package files_test

import (
	"bytes"
	"net/http"
	"net/url"
	"path/filepath"
	"testing"

	"github.com/warren-sh/warren/internal/envd/envdtest"
	"github.com/warren-sh/warren/internal/transfer"
)

// postFramed uploads a framed body (package transfer), as warren's proxy does.
func postFramed(t *testing.T, a *envdtest.Agent, q url.Values, body []byte) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, filesURL(a, q), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", transfer.ContentType)
	return do(t, req)
}

// TestTransfer uploads through a transfer disk (here a file on the host; in a
// VM the virtio disk): files whose bytes are in the disk's slots, inline, or
// both, with the multipart body's rules for where each goes.
func TestTransfer(t *testing.T) {
	diskPath := filepath.Join(t.TempDir(), "transfer.disk")
	if err := transfer.Create(diskPath, 16*transfer.SlotSize); err != nil {
		t.Fatal(err)
	}
	disk, err := transfer.Open(diskPath)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	a := envdtest.Start(t, envdtest.Options{Env: []string{"WARREN_ENVD_TRANSFER_DISK=" + diskPath}})
	dir, rel := testDir(t)

	// frame writes data as the proxy does: whole slots on the disk, the
	// tail inline.
	frame := func(t *testing.T, w *transfer.Writer, data []byte) {
		t.Helper()
		for len(data) >= transfer.SlotSize {
			off, ok, err := disk.Put(data[:transfer.SlotSize])
			if err != nil || !ok {
				t.Fatalf("Put: %v, %v", ok, err)
			}
			w.Extent(off, transfer.SlotSize)
			data = data[transfer.SlotSize:]
		}
		w.Inline(data)
	}

	t.Run("files from slots and inline, named by their parts", func(t *testing.T) {
		big := randomBytes(t, 5*transfer.SlotSize+777)
		var body bytes.Buffer
		w := transfer.NewWriter(&body)
		w.File(rel + "/framed/big.bin")
		frame(t, w, big)
		w.File(filepath.Join(dir, "framed", "small.txt"))
		frame(t, w, []byte("small"))
		w.File(rel + "/framed/empty")
		es := entries(t, postFramed(t, a, url.Values{}, body.Bytes()))
		if len(es) != 3 || es[0].Path != filepath.Join(dir, "framed", "big.bin") || es[1].Name != "small.txt" || es[2].Name != "empty" {
			t.Fatalf("answer %+v", es)
		}
		wantFile(t, filepath.Join(dir, "framed", "big.bin"), big, userUID, 0o644)
		wantFile(t, filepath.Join(dir, "framed", "small.txt"), []byte("small"), userUID, 0o644)
		wantFile(t, filepath.Join(dir, "framed", "empty"), nil, userUID, 0o644)
		wantEntries(t, filepath.Join(dir, "framed"), "big.bin", "empty", "small.txt")
	})
	t.Run("one file to path", func(t *testing.T) {
		data := randomBytes(t, 2*transfer.SlotSize)
		var body bytes.Buffer
		w := transfer.NewWriter(&body)
		w.File("")
		frame(t, w, data)
		p := filepath.Join(dir, "to-path.bin")
		es := entries(t, postFramed(t, a, url.Values{"path": {p}}, body.Bytes()))
		if len(es) != 1 || es[0].Path != p {
			t.Fatalf("answer %+v", es)
		}
		wantFile(t, p, data, userUID, 0o644)
	})
	t.Run("the sender's error, nothing written", func(t *testing.T) {
		var body bytes.Buffer
		w := transfer.NewWriter(&body)
		w.File(rel + "/failed/a.txt")
		frame(t, w, randomBytes(t, transfer.SlotSize+10))
		w.Fail("malformed multipart body at part 2: boom")
		wantError(t, postFramed(t, a, url.Values{}, body.Bytes()), http.StatusBadRequest, "malformed multipart body at part 2: boom")
		wantEntries(t, dir, "framed", "to-path.bin")
	})
	t.Run("a body cut short", func(t *testing.T) {
		var body bytes.Buffer
		w := transfer.NewWriter(&body)
		w.File(rel + "/cut.txt")
		w.Inline([]byte("0123456789"))
		wantError(t, postFramed(t, a, url.Values{}, body.Bytes()[:body.Len()-4]), http.StatusBadRequest, "malformed transfer body")
		wantEntries(t, dir, "framed", "to-path.bin")
	})
	t.Run("a file without a name or path", func(t *testing.T) {
		var body bytes.Buffer
		w := transfer.NewWriter(&body)
		w.File("")
		w.Inline([]byte("x"))
		wantError(t, postFramed(t, a, url.Values{}, body.Bytes()), http.StatusBadRequest, "nowhere to write it")
	})
}

func TestTransferWithoutDisk(t *testing.T) {
	a := envdtest.Start(t, envdtest.Options{})
	var body bytes.Buffer
	w := transfer.NewWriter(&body)
	w.File("/tmp/x")
	w.Inline([]byte("x"))
	wantError(t, postFramed(t, a, url.Values{}, body.Bytes()), http.StatusBadRequest, "needs a transfer disk")
}
