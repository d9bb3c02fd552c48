// Package formdata reads multipart/form-data bodies in large pieces: envd
// reads uploads with it in the guest, and warren's proxy turns uploads into
// transfer-disk bodies with it on the host, so both read a body alike.
package formdata

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/quotedprintable"
	"net/textproto"
	"strings"
)

// Reader reads the parts of a multipart/form-data body as
// mime/multipart.Reader does, but in large pieces. multipart.Reader looks
// for the boundary through a 4 KiB window whatever it reads from: under TCG
// that parsing cost ~5 ms per MiB in the guest, 2.5 times the whole rest of
// an octet-stream upload. A Reader hands a part's bytes on straight from
// a buffer of BufferSize bytes, searching it for the boundary at once.
//
// It reads what multipart.Reader reads that clients send: CRLF delimiters,
// a preamble and an epilogue (ignored), transport padding after a boundary,
// quoted-printable parts. Unlike it, it does not take bare-LF delimiters.
type Reader struct {
	br    *bufio.Reader
	dash  []byte // "--" boundary: the first delimiter line
	delim []byte // CRLF "--" boundary: the end of every part's body
	part  *Part
	done  bool // the close delimiter was read
}

// BufferSize is how much of a multipart body envd reads from the connection
// at a time, and the most a part's Read returns at once.
const BufferSize = 1 << 20

func NewReader(r io.Reader, boundary string) *Reader {
	return &Reader{
		br:    bufio.NewReaderSize(r, BufferSize),
		dash:  []byte("--" + boundary),
		delim: []byte("\r\n--" + boundary),
	}
}

// Part is one part: its headers, and its body through Read.
type Part struct {
	Header textproto.MIMEHeader
	r      *Reader
	body   io.Reader // the raw body, or its quoted-printable decoding
	ended  bool      // the raw body's delimiter was read
}

// ErrEOF is a body that ends inside a part or before its first boundary.
var ErrEOF = errors.New("the body ended before the closing boundary")

// NextPart skips what is left of the current part and returns the next, or
// io.EOF after the last.
func (r *Reader) NextPart() (*Part, error) {
	if r.done {
		return nil, io.EOF
	}
	if r.part == nil {
		if err := r.skipPreamble(); err != nil {
			return nil, err
		}
	} else {
		if _, err := io.Copy(io.Discard, rawBody{r.part}); err != nil {
			return nil, err
		}
		line, err := r.readLine()
		if err != nil {
			return nil, err
		}
		if bytes.HasPrefix(line, []byte("--")) {
			r.done = true // the epilogue after it is ignored
			return nil, io.EOF
		}
		if len(bytes.TrimRight(line, " \t\r\n")) != 0 {
			return nil, fmt.Errorf("a boundary is followed by %q", truncate(line))
		}
	}
	header, err := textproto.NewReader(r.br).ReadMIMEHeader()
	if err != nil {
		return nil, fmt.Errorf("part headers: %w", eofIsUnexpected(err))
	}
	p := &Part{Header: header, r: r}
	p.body = rawBody{p}
	if strings.EqualFold(header.Get("Content-Transfer-Encoding"), "quoted-printable") {
		header.Del("Content-Transfer-Encoding")
		p.body = quotedprintable.NewReader(rawBody{p})
	}
	r.part = p
	return p, nil
}

// skipPreamble reads up to and including the first delimiter line.
func (r *Reader) skipPreamble() error {
	for {
		line, err := r.readLine()
		if err != nil {
			return err
		}
		trimmed := bytes.TrimRight(line, " \t\r\n")
		if bytes.Equal(trimmed, r.dash) {
			return nil
		}
		if len(trimmed) == len(r.dash)+2 && bytes.HasPrefix(trimmed, r.dash) && bytes.HasSuffix(trimmed, []byte("--")) {
			r.done = true // a body of no parts
			return io.EOF
		}
	}
}

// readLine reads through the next LF; a line longer than the buffer comes in
// pieces (none of which is then a delimiter line).
func (r *Reader) readLine() ([]byte, error) {
	line, err := r.br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || (err == io.EOF && len(line) > 0) {
		return line, nil // a last line without LF: the close delimiter may end the body
	}
	if err != nil {
		return nil, eofIsUnexpected(err)
	}
	return line, nil
}

// FormName is the name parameter of the part's form-data
// Content-Disposition, or "".
func (p *Part) FormName() string {
	d, params, err := mime.ParseMediaType(p.Header.Get("Content-Disposition"))
	if err != nil || d != "form-data" {
		return ""
	}
	return params["name"]
}

// FileName is the filename parameter of the part's Content-Disposition as the
// client sent it, directories included (multipart.Part.FileName drops them:
// E2B's SDK names a batch upload's targets there).
func (p *Part) FileName() (string, error) {
	_, params, err := mime.ParseMediaType(p.Header.Get("Content-Disposition"))
	if err != nil {
		return "", fmt.Errorf("malformed Content-Disposition: %v", err)
	}
	return params["filename"], nil
}

// Read reads the part's body (decoded when quoted-printable).
func (p *Part) Read(b []byte) (int, error) { return p.body.Read(b) }

// rawBody reads a part's bytes up to its delimiter, which it consumes.
type rawBody struct{ p *Part }

func (rb rawBody) Read(b []byte) (int, error) {
	p, r := rb.p, rb.p.r
	if p.ended {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	want := len(r.delim) + 2 // a delimiter and what tells it from content
	for {
		_, err := r.br.Peek(want)
		eof := err != nil
		if eof && r.br.Buffered() < len(r.delim) {
			return 0, eofIsUnexpected(err)
		}
		data, _ := r.br.Peek(r.br.Buffered())
		// Only what this Read may return, and what tells a delimiter there:
		// a small b must not search the whole buffer again every time.
		if limit := len(b) + want; limit < len(data) {
			data, eof = data[:limit], false
		}
		end, safe := r.findDelim(data, eof)
		if end >= 0 {
			n := copy(b, data[:end])
			r.br.Discard(n)
			if n == end {
				r.br.Discard(len(r.delim))
				p.ended = true
				if n == 0 {
					return 0, io.EOF
				}
			}
			return n, nil
		}
		if safe > 0 {
			n := copy(b, data[:safe])
			r.br.Discard(n)
			return n, nil
		}
		// Undecided at the start of what is buffered: read more.
		want = len(data) + 1
	}
}

// findDelim looks for the part's delimiter in data. It returns the index of
// one (end), or -1 and how many bytes of data are certainly content (safe).
// As mime/multipart, a delimiter counts only when "--", white space or a
// line end follows it; else it is content ("\r\n--boundaryX").
func (r *Reader) findDelim(data []byte, eof bool) (end, safe int) {
	safe = max(len(data)-(len(r.delim)-1), 0) // the tail may begin a delimiter
	for off := 0; off < len(data); {
		j := bytes.Index(data[off:], r.delim)
		if j < 0 {
			break
		}
		i := off + j
		switch afterDelim(data[i+len(r.delim):], eof) {
		case 1:
			return i, 0
		case 0:
			return -1, min(safe, i)
		}
		off = i + 1
	}
	return -1, safe
}

// afterDelim tells what follows a delimiter: 1 a real one, -1 content, 0
// not known yet.
func afterDelim(rest []byte, eof bool) int {
	if len(rest) == 0 {
		if eof {
			return 1
		}
		return 0
	}
	switch rest[0] {
	case ' ', '\t', '\r', '\n':
		return 1
	case '-':
		if len(rest) == 1 {
			if eof {
				return 1
			}
			return 0
		}
		if rest[1] == '-' {
			return 1
		}
	}
	return -1
}

// eofIsUnexpected turns io.EOF inside a body into an error that says so.
func eofIsUnexpected(err error) error {
	if err == io.EOF {
		return fmt.Errorf("%w (%w)", ErrEOF, io.ErrUnexpectedEOF)
	}
	return err
}

// truncate shortens a line quoted in an error message.
func truncate(b []byte) []byte {
	if len(b) > 40 {
		return b[:40]
	}
	return b
}

// Fill reads from src until p is full or src ends. Unlike io.ReadFull it
// passes src's own errors on unchanged: a part cut short says so (ErrEOF, or
// io.ErrUnexpectedEOF from a quoted-printable one), which must stay an error,
// while io.EOF is the end.
func Fill(src io.Reader, p []byte) (int, error) {
	n := 0
	for n < len(p) {
		k, err := src.Read(p[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
