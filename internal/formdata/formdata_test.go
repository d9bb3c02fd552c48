package formdata

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
	"net/textproto"
	"strings"
	"testing"
	"testing/iotest"
)

type formPartData struct {
	name, header string
	body         []byte
}

// parseForm reads every part with a Reader fed through wrap.
func parseForm(t *testing.T, body []byte, boundary string, wrap func(io.Reader) io.Reader) ([]formPartData, error) {
	t.Helper()
	r := NewReader(wrap(bytes.NewReader(body)), boundary)
	return collectParts(func() (string, string, io.Reader, error) {
		p, err := r.NextPart()
		if err != nil {
			return "", "", nil, err
		}
		return p.FormName(), p.Header.Get("Content-Disposition"), p, nil
	})
}

// parseStd is the same with mime/multipart, the oracle.
func parseStd(body []byte, boundary string) ([]formPartData, error) {
	r := multipart.NewReader(bytes.NewReader(body), boundary)
	return collectParts(func() (string, string, io.Reader, error) {
		p, err := r.NextPart()
		if err != nil {
			return "", "", nil, err
		}
		return p.FormName(), p.Header.Get("Content-Disposition"), p, nil
	})
}

// collectParts reads the parts next returns until io.EOF.
func collectParts(next func() (name, disposition string, body io.Reader, err error)) ([]formPartData, error) {
	var out []formPartData
	for {
		name, disposition, body, err := next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		b, err := io.ReadAll(body)
		if err != nil {
			return out, err
		}
		out = append(out, formPartData{name, disposition, b})
	}
}

// TestFormReaderMatchesMimeMultipart feeds bodies that mime/multipart.Writer
// made (contents full of near-boundaries, CRLFs and dashes, sizes around
// the buffer) through the Reader in reads of every shape, and wants
// what mime/multipart reads.
func TestFormReaderMatchesMimeMultipart(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const boundary = "warrenBoundary0123456789"
	pieces := [][]byte{[]byte("\r\n--" + boundary[:10]), []byte("\r\n--"), []byte("\r\n"), []byte("--" + boundary[:len(boundary)-1]), []byte("--" + boundary + "X"), []byte("-"), []byte("\r"), []byte("x")}
	content := func(n int) []byte {
		var b bytes.Buffer
		for b.Len() < n {
			if rng.IntN(4) == 0 {
				b.Write(pieces[rng.IntN(len(pieces))])
			} else {
				b.WriteByte(byte(rng.IntN(256)))
			}
		}
		out := b.Bytes()[:n]
		// A real delimiter in the content would end the part for any reader:
		// make every "\r\n--boundary" in it continue as content does.
		delim := []byte("\r\n--" + boundary)
		for off := 0; ; {
			i := bytes.Index(out[off:], delim)
			if i < 0 {
				break
			}
			at := off + i + len(delim)
			if at < len(out) && strings.IndexByte("- \t\r\n", out[at]) >= 0 {
				out[at] = 'X'
			} else if at >= len(out) {
				out[off+i] = 'X' // at the very end: no delimiter at all
			}
			off += i + 1
		}
		return out
	}
	sizes := []int{0, 1, 2, 77, 4095, 4096, 4097, BufferSize - 30, BufferSize, BufferSize + 1, 3*BufferSize + 7}
	wraps := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"halves":   iotest.HalfReader,
		"odd":      func(r io.Reader) io.Reader { return &chunky{r: r, rng: rand.New(rand.NewPCG(3, 4))} },
	}
	for round := range 12 {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		mw.SetBoundary(boundary)
		for i := range 1 + round%3 {
			size := sizes[rng.IntN(len(sizes))]
			if round == 0 {
				size = sizes[i]
			}
			w, err := mw.CreateFormFile("file", fmt.Sprintf("dir/f%d.bin", i))
			if err != nil {
				t.Fatal(err)
			}
			w.Write(content(size))
			fw, _ := mw.CreateFormField("other")
			fw.Write([]byte("field value"))
		}
		mw.Close()
		body := append([]byte("preamble line\r\n"), buf.Bytes()...)
		body = append(body, "epilogue"...)
		want, err := parseStd(body, boundary)
		if err != nil {
			t.Fatalf("round %d: mime/multipart: %v", round, err)
		}
		for name, wrap := range wraps {
			if name == "one byte" && len(body) > 64<<10 {
				continue // slow and no different from halves here
			}
			got, err := parseForm(t, body, boundary, wrap)
			if err != nil {
				t.Fatalf("round %d, %s reads: %v", round, name, err)
			}
			if len(got) != len(want) {
				t.Fatalf("round %d, %s reads: %d parts, want %d", round, name, len(got), len(want))
			}
			for i := range want {
				if got[i].name != want[i].name || got[i].header != want[i].header || !bytes.Equal(got[i].body, want[i].body) {
					t.Errorf("round %d, %s reads, part %d: %q %q %d bytes, want %q %q %d bytes", round, name, i,
						got[i].name, got[i].header, len(got[i].body), want[i].name, want[i].header, len(want[i].body))
				}
			}
		}
	}
}

// chunky reads in pieces of random sizes.
type chunky struct {
	r   io.Reader
	rng *rand.Rand
}

func (c *chunky) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1+c.rng.IntN(min(len(p), 9000))]
	}
	return c.r.Read(p)
}

func TestFormReaderEdges(t *testing.T) {
	const b = "XyZ"
	whole := func(r io.Reader) io.Reader { return r }
	for _, tc := range []struct {
		name, body string
		want       []string // bodies; nil with wantErr
		wantErr    bool
	}{
		{"no parts", "--XyZ--\r\n", nil, false},
		{"transport padding after boundaries", "--XyZ  \t\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XyZ \r\n\r\ndef\r\n--XyZ--", []string{"abc", "def"}, false},
		{"empty body", "--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\r\n--XyZ--\r\n", []string{""}, false},
		{"quoted-printable", "--XyZ\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3Db=\r\nc\r\n--XyZ--", []string{"a=bc"}, false},
		{"cut inside a part", "--XyZ\r\n\r\nabcdef", nil, true},
		{"cut inside the headers", "--XyZ\r\nContent-Dispo", nil, true},
		{"no boundary at all", "just text\r\n", nil, true},
		{"a boundary followed by more is content", "--XyZ\r\n\r\nabc\r\n--XyZjunk\r\n--XyZ--", []string{"abc\r\n--XyZjunk"}, false},
		{"garbage after a boundary", "--XyZ\r\n\r\nabc\r\n--XyZ junk\r\n\r\n", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseForm(t, []byte(tc.body), b, whole)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("read %d parts without an error", len(got))
				}
				if tc.name == "cut inside a part" && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("error %v does not say io.ErrUnexpectedEOF", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var bodies []string
			for _, p := range got {
				bodies = append(bodies, string(p.body))
			}
			if strings.Join(bodies, "|") != strings.Join(tc.want, "|") || len(bodies) != len(tc.want) {
				t.Errorf("bodies %q, want %q", bodies, tc.want)
			}
		})
	}
	// The header survives as textproto keys.
	r := NewReader(strings.NewReader("--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a/b.txt\"\r\n\r\nx\r\n--XyZ--"), b)
	p, err := r.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if p.FormName() != "file" || p.Header.Get(textproto.CanonicalMIMEHeaderKey("Content-Disposition")) == "" {
		t.Errorf("FormName %q, header %v", p.FormName(), p.Header)
	}
}

// BenchmarkFormParse reads one 32 MiB part with the Reader and with
// mime/multipart (what envd used before; behind a 256 KiB bufio.Reader as it
// had it), from memory, into 1 MiB chunks as writeUpload does.
func BenchmarkFormParse(b *testing.B) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	w, _ := mw.CreateFormFile("file", "big.bin")
	data := make([]byte, 32<<20)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	w.Write(data)
	mw.Close()
	body, boundary := buf.Bytes(), mw.Boundary()
	b.Run("Reader", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			p, err := NewReader(bytes.NewReader(body), boundary).NextPart()
			if err != nil {
				b.Fatal(err)
			}
			drain(b, p)
		}
	})
	b.Run("mime-multipart", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			p, err := multipart.NewReader(bufio.NewReaderSize(bytes.NewReader(body), 256<<10), boundary).NextPart()
			if err != nil {
				b.Fatal(err)
			}
			drain(b, p)
		}
	})
}

// drain reads r to its end in 1 MiB pieces, as envd fills its write chunks.
func drain(b *testing.B, r io.Reader) {
	buf := make([]byte, 1<<20)
	for {
		_, err := io.ReadFull(r, buf)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}
