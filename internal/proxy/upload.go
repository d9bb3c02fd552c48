package proxy

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warren-sh/warren/internal/formdata"
	"github.com/warren-sh/warren/internal/transfer"
)

// Uploads (POST /files on the agent port) to a sandbox with a transfer disk
// do not send their bytes over the guest's network: the proxy writes them
// into the disk's slots and sends envd a framed body that says where they
// are (package transfer). The client sees envd's answer as always.

// minTransfer is the smallest body with a known length sent through the
// transfer disk; a smaller one goes to envd as it is.
const minTransfer = 1 << 20

// viaTransfer reports whether r is an upload to send through t's transfer
// disk: a POST /files of an octet-stream body with a path, or of a multipart
// body, not compressed, of at least minTransfer bytes when its length is known.
// Everything else, malformed requests included, goes to envd as it is, which
// answers it as it would.
func viaTransfer(r *http.Request, t *Target) (boundary string, ok bool) {
	if t.Transfer == nil || r.Method != http.MethodPost || r.URL.Path != "/files" {
		return "", false
	}
	if r.ContentLength >= 0 && r.ContentLength < minTransfer {
		return "", false
	}
	if enc := strings.TrimSpace(r.Header.Get("Content-Encoding")); enc != "" && !strings.EqualFold(enc, "identity") {
		return "", false
	}
	mediaType, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch {
	case err != nil:
		return "", false
	case mediaType == "application/octet-stream":
		return "", r.URL.Query().Get("path") != ""
	case strings.HasPrefix(mediaType, "multipart/") && params["boundary"] != "":
		return params["boundary"], true
	}
	return "", false
}

// isFramed reports whether r carries a framed body itself: only the proxy
// may send those.
func isFramed(r *http.Request) bool {
	mediaType, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	return mediaType == transfer.ContentType
}

// slotBuffers recycles the SlotSize buffers uploads read into.
var slotBuffers = sync.Pool{New: func() any { b := make([]byte, transfer.SlotSize); return &b }}

// forwardUpload forwards the upload r to target's agent with its body framed
// (boundary: a multipart body's; "" for octet-stream). The body is framed
// while envd reads it; the slots it took are released once envd answered.
func (p *Proxy) forwardUpload(w http.ResponseWriter, r *http.Request, target *Target, boundary string) {
	pr, pw := io.Pipe()
	out := r.Clone(r.Context())
	out.Header.Set("Content-Type", transfer.ContentType)
	out.Header.Del("Content-Length")
	out.ContentLength = -1
	out.Body = pr

	s := &uploadSender{disk: target.Transfer, w: transfer.NewWriter(pw)}
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		body := &eofReader{r: r.Body}
		err := s.send(body, boundary, r.URL.Query().Get("path"))
		if err == nil && !body.eof {
			// A multipart body's epilogue, after its closing boundary.
			io.CopyN(io.Discard, body, maxEpilogue)
		}
		s.readAll.Store(body.eof)
		pw.CloseWithError(err)
	}()
	p.forward(&earlyAnswer{w, s}, out, target, EnvdPort)
	// When envd answered (or failed) before reading all, the sender stops
	// at its next write; one still waiting for a client that has stopped
	// sending is cut off (the connection cannot serve another request then).
	pr.CloseWithError(errUploadAnswered)
	select {
	case <-sent:
	case <-time.After(senderGrace):
		http.NewResponseController(w).SetReadDeadline(time.Now())
		<-sent
	}
	target.Transfer.Release(s.slots...)
}

var errUploadAnswered = errors.New("the upload was answered")

// maxEpilogue is how much after a multipart body's closing boundary the proxy
// reads so that the connection can carry the next request.
const maxEpilogue = 64 << 10

// eofReader notes when its reader ended.
type eofReader struct {
	r   io.Reader
	eof bool
}

func (e *eofReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err == io.EOF {
		e.eof = true
	}
	return n, err
}

// senderGrace is how long an answered upload waits for the client's next
// bytes before it cuts the connection's reading.
const senderGrace = time.Second

// uploadSender frames one upload body.
type uploadSender struct {
	disk  *transfer.Disk
	w     *transfer.Writer
	slots []int64 // taken, released once envd has answered
	// readAll: the client's whole body was read. Set before the framed body
	// ends, so before envd can answer it.
	readAll atomic.Bool
}

// earlyAnswer is the client's ResponseWriter while an upload is forwarded.
// An answer that comes before the client's whole body was read (envd refused
// the upload at once) closes the connection: the rest of the body is never
// read, so the connection cannot carry another request. (net/http says so
// itself, but not for a full-duplex request.)
type earlyAnswer struct {
	http.ResponseWriter
	s *uploadSender
}

func (e *earlyAnswer) WriteHeader(code int) {
	if !e.s.readAll.Load() {
		e.Header().Set("Connection", "close")
	}
	e.ResponseWriter.WriteHeader(code)
}

func (e *earlyAnswer) Unwrap() http.ResponseWriter { return e.ResponseWriter }

// send frames body: one file for an octet-stream body, the parts named
// "file" of a multipart one. A malformed multipart body ends with the error
// envd would have answered.
func (s *uploadSender) send(body io.Reader, boundary, path string) error {
	if boundary == "" {
		if err := s.w.File(""); err != nil {
			return err
		}
		return s.data(body, "")
	}
	mr := formdata.NewReader(body, boundary)
	for n := 1; ; n++ {
		part, err := mr.NextPart()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return s.w.Fail(fmt.Sprintf("malformed multipart body at part %d: %v", n, err))
		}
		if part.FormName() != "file" {
			continue
		}
		name := ""
		if path == "" {
			// envd answers a part without a name itself.
			if name, err = part.FileName(); err != nil {
				return s.w.Fail(fmt.Sprintf("part %d: %v", n, err))
			}
		}
		if err := s.w.File(name); err != nil {
			return err
		}
		label := name
		if label == "" {
			label = path
		}
		if err := s.data(part, label); err != nil {
			return err
		}
	}
}

// data frames the bytes of src, one file, as slots on the disk (inline when
// the disk is full or for a short tail). part names a multipart part's file
// in errors; "" for an octet-stream body.
func (s *uploadSender) data(src io.Reader, part string) error {
	bp := slotBuffers.Get().(*[]byte)
	defer slotBuffers.Put(bp)
	buf := *bp
	for {
		n, rerr := formdata.Fill(src, buf)
		if n > 0 {
			if err := s.put(buf[:n]); err != nil {
				return err
			}
		}
		switch {
		case rerr == nil:
			continue
		case rerr == io.EOF:
			return nil
		case part != "":
			// A multipart body cut short or malformed: say so as envd would.
			return s.w.Fail(fmt.Sprintf("read upload body for '%s': %v", part, rerr))
		}
		return rerr
	}
}

// minSlot is the shortest piece put on the disk; shorter ones go inline.
const minSlot = 64 << 10

// put frames p: in a slot when it is long enough and one is free.
func (s *uploadSender) put(p []byte) error {
	if len(p) >= minSlot {
		off, ok, err := s.disk.Put(p)
		if err != nil {
			return err
		}
		if ok {
			s.slots = append(s.slots, off)
			return s.w.Extent(off, len(p))
		}
	}
	return s.w.Inline(p)
}
