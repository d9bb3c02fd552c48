package template

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"
)

// progress prints a build's phases, each with the time since the build
// started: "[  4.1s] base: envd answered 3.2s after QEMU started".
type progress struct {
	w     io.Writer
	start time.Time
	mu    sync.Mutex // one line at a time
}

func (p *progress) phase(format string, args ...any) {
	p.line(fmt.Sprintf(format, args...))
}

func (p *progress) line(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "[%6.1fs] base: %s\n", time.Since(p.start).Seconds(), s)
}

// tool is a writer for a step's own output (guest, image): each line becomes
// a progress line prefixed with the step's name.
func (p *progress) tool(name string) io.Writer { return &toolLines{p: p, name: name} }

type toolLines struct {
	p    *progress
	name string
	buf  []byte
}

func (t *toolLines) Write(b []byte) (int, error) {
	t.buf = append(t.buf, b...)
	for {
		i := bytes.IndexByte(t.buf, '\n')
		if i < 0 {
			break
		}
		t.p.line(t.name + ": " + string(t.buf[:i]))
		t.buf = t.buf[i+1:]
	}
	return len(b), nil
}

// dropTime removes slog's timestamp: progress lines carry the elapsed time.
func dropTime(groups []string, a slog.Attr) slog.Attr {
	if a.Key == slog.TimeKey && len(groups) == 0 {
		return slog.Attr{}
	}
	return a
}
