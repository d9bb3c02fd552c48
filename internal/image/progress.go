package image

import (
	"bytes"
	"log/slog"
	"regexp"
	"strings"
	"time"
)

// progress reports a build's phases and its tools' output, each with the time
// since the build began: the first build takes minutes and should not look hung.
type progress struct {
	log   *slog.Logger
	start time.Time
}

func (p *progress) elapsed() time.Duration {
	return time.Since(p.start).Round(100 * time.Millisecond)
}

// phase logs the start of a build phase.
func (p *progress) phase(name string, args ...any) {
	p.log.Info("image build: "+name, append([]any{"elapsed", p.elapsed()}, args...)...)
}

// toolOutput is the io.Writer a tool's stdout and stderr go to. It logs whole
// lines, at most one per interval (warnings and errors always, since those are
// the lines a reader needs), and keeps the last lines for the error message
// when the tool fails.
type toolOutput struct {
	p        *progress
	tool     string
	interval time.Duration
	now      func() time.Time

	// quiet keeps the lines for errors but logs none: output a build parses.
	quiet      bool
	lastLogged time.Time
	// dropped is the last line the interval held back, logged at the end so
	// a tool's final word (e2fsck's summary) is seen.
	dropped string
	partial []byte
	tail    []string
}

// versionBanner matches the version line every e2fsprogs tool prints first.
var versionBanner = regexp.MustCompile(`^(mke2fs|debugfs|dumpe2fs|e2fsck|resize2fs) \d+\.\d+`)

// tailLines is how many of a tool's last output lines a failure reports.
const tailLines = 25

func newToolOutput(p *progress, tool string) *toolOutput {
	return &toolOutput{p: p, tool: tool, interval: 2 * time.Second, now: time.Now}
}

// Write splits b into lines. exec.Cmd calls it from one goroutine at a time when
// Stdout and Stderr are the same *toolOutput, so it needs no lock.
func (o *toolOutput) Write(b []byte) (int, error) {
	o.partial = append(o.partial, b...)
	for {
		i := bytes.IndexByte(o.partial, '\n')
		if i < 0 {
			break
		}
		o.line(string(o.partial[:i]))
		o.partial = o.partial[i+1:]
	}
	return len(b), nil
}

// flush handles a last line without a newline and logs a held-back last line.
func (o *toolOutput) flush() {
	if len(o.partial) > 0 {
		o.line(string(o.partial))
		o.partial = nil
	}
	if o.dropped != "" && !o.quiet {
		o.p.log.Info("image build: "+o.tool, "elapsed", o.p.elapsed(), "line", o.dropped)
	}
	o.dropped = ""
}

func (o *toolOutput) line(s string) {
	s = strings.TrimRight(s, "\r")
	if strings.TrimSpace(s) == "" {
		return
	}
	o.tail = append(o.tail, s)
	if len(o.tail) > tailLines {
		o.tail = o.tail[len(o.tail)-tailLines:]
	}
	if o.quiet || versionBanner.MatchString(s) {
		return
	}
	now := o.now()
	important := strings.HasPrefix(s, "W:") || strings.HasPrefix(s, "E:")
	if !important && now.Sub(o.lastLogged) < o.interval {
		o.dropped = s
		return
	}
	o.lastLogged = now
	o.dropped = ""
	o.p.log.Info("image build: "+o.tool, "elapsed", o.p.elapsed(), "line", s)
}

// lastLines returns the tool's last output lines, for an error message.
func (o *toolOutput) lastLines() string {
	o.flush()
	return strings.Join(o.tail, "\n")
}
