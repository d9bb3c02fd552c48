package templatecli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// BuildOptions is one template build.
type BuildOptions struct {
	// Name is "alias" or "alias:tag" (TEMPLATES.md §1 step 1); Tags are
	// extra tags for this build.
	Name string
	Tags []string
	// CPUCount and MemoryMB size the template; 0 leaves the server's
	// defaults (2 and 1024).
	CPUCount, MemoryMB int
	// Spec is what to build; its COPY steps get their FilesHash here.
	Spec *Spec
	// ContextDir holds the COPY sources; its .dockerignore applies.
	ContextDir string
	// Progress receives the build's progress as text lines; nil discards.
	Progress io.Writer
	// PollInterval is the wait between status polls (default 200 ms, the
	// SDK's).
	PollInterval time.Duration
}

// BuildResult is a finished, successful build.
type BuildResult struct {
	TemplateID, BuildID string
	Tags                []string
	Duration            time.Duration
}

// BuildFailedError is a build the server reports as failed.
type BuildFailedError struct {
	TemplateID, BuildID string
	// Step is where it failed: "base", "1".."n" (Steps[n-1]), "finalize",
	// or empty; StepDesc the step as a line, when known.
	Step, StepDesc string
	Message        string
}

func (e *BuildFailedError) Error() string {
	where := ""
	switch {
	case e.Step != "" && e.StepDesc != "":
		where = fmt.Sprintf(" at step %s (%s)", e.Step, e.StepDesc)
	case e.Step != "":
		where = " at step " + e.Step
	}
	return fmt.Sprintf("build %s of template %s failed%s: %s", e.BuildID, e.TemplateID, where, e.Message)
}

// Build runs a whole build the way the SDK's Template.build does: compute
// COPY hashes, POST /v3/templates, upload the COPY archives the server does
// not have, start the build, and poll its status (printing log entries)
// until it is ready (nil error) or failed (*BuildFailedError).
func (c *Client) Build(ctx context.Context, o BuildOptions) (*BuildResult, error) {
	out := o.Progress
	if out == nil {
		out = io.Discard
	}
	interval := o.PollInterval
	if interval == 0 {
		interval = 200 * time.Millisecond
	}
	start := time.Now()
	// Absolute, as the SDK's paths: "/..." ignore patterns match them.
	dir, err := filepath.Abs(o.ContextDir)
	if err != nil {
		return nil, err
	}
	ignore, err := ReadDockerignore(dir)
	if err != nil {
		return nil, fmt.Errorf("read .dockerignore: %w", err)
	}
	spec := *o.Spec
	spec.Steps = append([]Step(nil), o.Spec.Steps...)
	for i, s := range spec.Steps {
		if s.Type != "COPY" || len(s.Args) < 2 {
			continue
		}
		if spec.Steps[i].FilesHash, err = FilesHash(dir, s.Args[0], s.Args[1], ignore); err != nil {
			return nil, fmt.Errorf("step %d (%s): %w", i+1, s, err)
		}
	}

	created, err := c.RequestBuild(ctx, BuildRequest{Name: o.Name, Tags: o.Tags, CPUCount: o.CPUCount, MemoryMB: o.MemoryMB})
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "Template created with ID: %s, Build ID: %s\n", created.TemplateID, created.BuildID)

	uploaded := map[string]bool{}
	for _, s := range spec.Steps {
		if s.FilesHash == "" || uploaded[s.FilesHash] {
			continue
		}
		uploaded[s.FilesHash] = true
		if err := c.uploadFiles(ctx, created.TemplateID, s, dir, ignore, out); err != nil {
			return nil, err
		}
	}

	if err := c.StartBuild(ctx, created.TemplateID, created.BuildID, &spec); err != nil {
		return nil, err
	}
	from := spec.FromImage
	if from == "" {
		from = "template " + spec.FromTemplate
	}
	fmt.Fprintf(out, "Building from %s:\n", from)
	for i, s := range spec.Steps {
		fmt.Fprintf(out, "  step %d/%d: %s\n", i+1, len(spec.Steps), s)
	}
	if spec.StartCmd != "" {
		fmt.Fprintf(out, "  start command: %s (ready when: %s)\n", spec.StartCmd, spec.ReadyCmd)
	}

	if err := c.follow(ctx, created, &spec, interval, start, out); err != nil {
		return nil, err
	}
	return &BuildResult{TemplateID: created.TemplateID, BuildID: created.BuildID, Tags: created.Tags, Duration: time.Since(start)}, nil
}

// uploadFiles uploads the archive of one COPY step unless the server has
// its files already.
func (c *Client) uploadFiles(ctx context.Context, templateID string, s Step, dir string, ignore []string, out io.Writer) error {
	src := s.Args[0]
	link, err := c.FileUploadLink(ctx, templateID, s.FilesHash)
	if err != nil {
		return err
	}
	if link.Present || link.URL == "" {
		fmt.Fprintf(out, "Skipping upload of '%s', already cached\n", src)
		return nil
	}
	tmp, err := os.MkdirTemp("", "warren-template-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	archive := filepath.Join(tmp, "context.tar.gz")
	f, err := os.Create(archive)
	if err != nil {
		return err
	}
	err = WriteTarGz(f, dir, src, ignore)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("archive %s: %w", src, err)
	}
	info, err := os.Stat(archive)
	if err != nil {
		return err
	}
	if err := c.Upload(ctx, link, archive); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	fmt.Fprintf(out, "Uploaded '%s' (%d bytes)\n", src, info.Size())
	return nil
}

// follow polls the build's status, printing new log entries, until it
// ends; after the end it drains the remaining pages as the SDK does.
func (c *Client) follow(ctx context.Context, b *BuildCreated, spec *Spec, interval time.Duration, start time.Time, out io.Writer) error {
	offset := 0
	poll := func() (*BuildStatus, error) {
		st, err := c.BuildStatus(ctx, b.TemplateID, b.BuildID, offset)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("stopped following build %s (it goes on; `warren template ls` shows its status): %w", b.BuildID, ctx.Err())
			}
			return nil, err
		}
		offset += len(st.LogEntries)
		for _, e := range st.LogEntries {
			fmt.Fprintln(out, formatEntry(e, len(spec.Steps), time.Since(start)))
		}
		return st, nil
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopped following build %s (it goes on; `warren template ls` shows its status): %w", b.BuildID, ctx.Err())
		case <-timer.C:
		}
		st, err := poll()
		if err != nil {
			return err
		}
		switch st.Status {
		case "ready", "error":
			for tail := st; len(tail.LogEntries) > 0; {
				if tail, err = poll(); err != nil {
					return err
				}
			}
			if st.Status == "ready" {
				return nil
			}
			e := &BuildFailedError{TemplateID: b.TemplateID, BuildID: b.BuildID, Message: "unknown error"}
			if st.Reason != nil {
				e.Message, e.Step = st.Reason.Message, st.Reason.Step
				if n, err := strconv.Atoi(e.Step); err == nil && n >= 1 && n <= len(spec.Steps) {
					e.StepDesc = spec.Steps[n-1].String()
				}
			}
			return e
		}
		timer.Reset(interval)
	}
}

// formatEntry is one log line: time since the start, step, level, message.
func formatEntry(e LogEntry, steps int, elapsed time.Duration) string {
	step := ""
	switch {
	case e.Step == "":
	case isNumber(e.Step):
		step = fmt.Sprintf("[%s/%d]", e.Step, steps)
	default:
		step = "[" + e.Step + "]"
	}
	level := strings.ToUpper(e.Level)
	if level == "" {
		level = "INFO"
	}
	return fmt.Sprintf("%7.1fs %-10s %-5s %s", elapsed.Seconds(), step, level, strings.TrimRight(e.Message, "\n"))
}

func isNumber(s string) bool {
	_, err := strconv.Atoi(s)
	return err == nil
}
