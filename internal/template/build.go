package template

import (
	"context"
	"fmt"
	"time"
)

// BuildRequest is one template build: a source, steps run in a build VM,
// then a start command and a ready check, and a snapshot of the result.
// It is TEMPLATES.md's TemplateBuildStartV2 with references resolved.
type BuildRequest struct {
	// BuildID and TemplateID name the build (UUID) and its template.
	BuildID, TemplateID string
	// From is what the build starts from.
	From Source
	// Steps run in order in the build VM.
	Steps []Step
	// Force rebuilds every step, ignoring the layer cache.
	Force bool
	// StartCmd, when set, is started at the end and keeps running in every
	// sandbox of the template; ReadyCmd is polled until it exits 0 before
	// the snapshot (defaults per TEMPLATES.md when empty).
	StartCmd, ReadyCmd string
	// CPUs and MemoryMiB size the build VM and every sandbox of the template.
	CPUs, MemoryMiB int
	// MinFreeDiskMiB is the free space the template's file system keeps
	// after the steps, at least: the build grows the disk when they left
	// less (minFreeDiskMb). 0: as the source and the steps leave it.
	MinFreeDiskMiB int
	// Files returns the local path of the uploaded tar.gz of a COPY step's
	// files (Step.FilesHash); an error if it was never uploaded.
	Files func(hash string) (string, error)
	// Log receives the build's log entries as they happen.
	Log func(LogEntry)
}

// Source is where a build starts.
type Source struct {
	// Template is a built template's artifact: the build boots its disk
	// (fromTemplate, and fromImage e2bdev/base).
	Template *Artifact
	// RootImage is an ext4 root image to boot (fromImage of any other
	// image, provisioned with E2B's conventions by internal/oci); Env,
	// Workdir and User are the image's defaults.
	RootImage string
	Env       map[string]string
	Workdir   string
	User      string
}

// Step is one build step (TEMPLATES.md §1 step 3).
type Step struct {
	Type      string   `json:"type"` // RUN, COPY, ADD, ENV, ARG, WORKDIR, USER
	Args      []string `json:"args"`
	Force     bool     `json:"force,omitempty"`
	FilesHash string   `json:"filesHash,omitempty"`
}

// LogEntry is one line of a build's log. Step is "base", "1".."n" or
// "finalize" (TEMPLATES.md step 4's reason.step), empty for general lines.
type LogEntry struct {
	Time    time.Time
	Level   string // debug, info, warn, error
	Message string
	Step    string
}

// BuildError is a build that failed: Step says where ("base", "1".."n",
// "finalize"), Message why, in words for the user.
type BuildError struct {
	Step    string
	Message string
}

func (e *BuildError) Error() string {
	if e.Step == "" {
		return e.Message
	}
	return fmt.Sprintf("step %s: %s", e.Step, e.Message)
}

// Builder runs template builds on this host.
type Builder interface {
	// Build runs req to the end and returns the new build's artifact (its
	// directory is the store's Build.Artifact), or a *BuildError.
	Build(ctx context.Context, req BuildRequest) (*Artifact, error)
}
