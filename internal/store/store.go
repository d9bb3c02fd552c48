// Package store persists warren's control-plane state: teams, API keys,
// templates (with builds, aliases and tags) and sandboxes.
//
// One interface, two implementations: SQLite (embedded, the default; package
// store/sqlite) and Postgres (several warren processes share it; package
// store/postgres). Both run the same goose migrations, written once per SQL
// dialect, and pass the same tests (storetest).
//
// Sandbox state changes go through UpdateSandbox, which runs a caller's
// function on the current row inside a transaction that locks it (SELECT ...
// FOR UPDATE on Postgres, a write transaction on SQLite), so concurrent kills,
// timeouts and connects, even from different processes, see and change one
// consistent row.
//
// Conventions shared by every method and both implementations:
//   - Times are kept to the microsecond (Postgres' precision) and come back in
//     UTC. Create, Insert and Update methods round the times of the value they
//     are given the same way, in place, so the caller holds what a Get returns.
//   - Metadata and EnvVars come back as non-nil maps; nil and empty are stored
//     alike, so a caller may add to them (in UpdateSandbox's fn) without a check.
//   - ErrNotFound (wrapped, with the missing ID) means the row asked for is
//     missing, or a row a new one refers to (a key's team, an alias's
//     template, a tag's build of that template).
//   - ErrConflict (wrapped) means a unique name or ID is taken.
package store

import (
	"context"
	"errors"
	"time"
)

// ErrNotFound is returned when the requested row does not exist.
var ErrNotFound = errors.New("not found")

// ErrConflict is returned when a unique constraint is violated (an alias or
// key that is already taken).
var ErrConflict = errors.New("already exists")

// Team owns API keys, templates and sandboxes.
type Team struct {
	ID   string
	Name string
	Slug string // the namespace of the team's template aliases
	// MaxSandboxes caps concurrently running sandboxes (0 = no limit).
	MaxSandboxes int
	// MaxLifetime caps how long a sandbox may live from its start (0 = no limit).
	MaxLifetime time.Duration
	CreatedAt   time.Time
}

// APIKey authenticates a team. Only a hash of the key is stored.
type APIKey struct {
	ID         string
	TeamID     string
	Name       string
	Hash       string // hex SHA-256 of the whole key
	Mask       string // what may be shown again, e.g. "e2b_1a2b...9f0e"
	CreatedAt  time.Time
	LastUsedAt *time.Time
}

// Template is a named sandbox image; its builds hold the artifacts.
type Template struct {
	ID            string
	TeamID        string
	Public        bool
	CreatedAt     time.Time
	UpdatedAt     time.Time
	LastSpawnedAt *time.Time
	SpawnCount    int64
	// SourceSandboxID is, for a snapshot (a template taken from a running
	// sandbox, REST.md §6), the sandbox it was taken from; empty for built
	// templates. It stays set after that sandbox is gone.
	SourceSandboxID string
}

// Alias names a template within a namespace ("" is global, e.g. "base").
type Alias struct {
	Namespace  string
	Alias      string
	TemplateID string
}

// BuildStatus is where a template build is.
type BuildStatus string

// Build statuses, with E2B's names.
const (
	BuildWaiting  BuildStatus = "waiting"
	BuildBuilding BuildStatus = "building"
	BuildReady    BuildStatus = "ready"
	BuildError    BuildStatus = "error"
)

// Build is one build of a template: its resources and where its artifacts are.
type Build struct {
	ID          string // UUID
	TemplateID  string
	Status      BuildStatus
	CPUCount    int
	MemoryMB    int
	DiskSizeMB  int
	EnvdVersion string
	// Artifact locates the build's root image and snapshot in blob storage
	// (opaque to the store).
	Artifact string
	// Reason says why a failed build failed, ReasonStep in which step
	// ("base", "1".."n", "finalize"; TEMPLATES.md step 4).
	Reason     string
	ReasonStep string
	// Spec is what was asked of the build (JSON, opaque to the store):
	// its steps, source, start and ready commands and tags.
	Spec       string
	CreatedAt  time.Time
	UpdatedAt  time.Time
	FinishedAt *time.Time
}

// Tag points a name at one build of a template ("default" is the latest).
type Tag struct {
	TemplateID string
	Tag        string
	BuildID    string
	CreatedAt  time.Time
}

// SandboxState is a sandbox's place in its lifecycle.
type SandboxState string

// Sandbox states. A sandbox is inserted running (only once it answers) and
// leaves through killing (row deleted once the node has cleaned up), or goes
// running → pausing → paused (no VM; Paused says what the node saved) →
// resuming → running again, under the same ID.
const (
	StateRunning  SandboxState = "running"
	StatePausing  SandboxState = "pausing"
	StatePaused   SandboxState = "paused"
	StateResuming SandboxState = "resuming"
	StateKilling  SandboxState = "killing"
)

// Sandbox is a sandbox as the control plane tracks it.
type Sandbox struct {
	ID          string
	TeamID      string
	TemplateID  string
	BuildID     string
	Alias       string // the template name the client used, shown as "alias"
	NodeID      string
	State       SandboxState
	Metadata    map[string]string
	EnvVars     map[string]string
	CPUCount    int
	MemoryMB    int
	DiskSizeMB  int
	EnvdVersion string
	// EnvdAccessToken authorises calls to the sandbox's agent.
	EnvdAccessToken string
	AllowInternet   bool
	// AutoPause pauses the sandbox at EndAt instead of killing it; the pause
	// saves memory too when AutoPauseMemory, else the disk only.
	AutoPause       bool
	AutoPauseMemory bool
	// AutoResume lets traffic through the proxy resume the paused sandbox.
	AutoResume bool
	// Timeout is the lifetime asked for at create; an auto-resume grants it
	// again (PROXY.md §5).
	Timeout   time.Duration
	StartedAt time.Time
	EndAt     time.Time
	// Paused is what the node saved when the sandbox paused: set while it is
	// paused or resuming (and killing from there), nil otherwise.
	Paused *PausedState
}

// PausedState locates a paused sandbox's saved state (node.PausedSandbox).
type PausedState struct {
	// Key is the node's handle of the saved state (never empty).
	Key string
	// Memory tells whether RAM was saved; without it a resume cold boots.
	Memory bool
	Bytes  int64
	At     time.Time
}

// SandboxFilter selects sandboxes for ListSandboxes and CountSandboxes. Zero
// fields match all; set fields must all match.
type SandboxFilter struct {
	TeamID       string
	States       []SandboxState
	Metadata     map[string]string // every pair must match exactly
	TemplateID   string
	StartedAfter time.Time // inclusive
	EndBefore    time.Time // exclusive; for the evictor
	NodeID       string
	Ascending    bool // by StartedAt then ID; default newest first
	// After continues a listing after the sandbox with this (StartedAt, ID)
	// position, in the listing's order (the API's opaque cursor).
	// CountSandboxes ignores it, and Limit.
	After *SandboxCursor
	Limit int // 0 = no limit
}

// SandboxCursor is a position in a sandbox listing.
type SandboxCursor struct {
	StartedAt time.Time
	ID        string
}

// Store is warren's persistence. Methods return ErrNotFound (wrapped) for
// missing rows and ErrConflict for taken unique names.
type Store interface {
	// CreateTeam stores a team; ErrConflict if its ID or Slug is taken.
	CreateTeam(ctx context.Context, t *Team) error
	GetTeam(ctx context.Context, id string) (*Team, error)
	// ListTeams returns every team, oldest first.
	ListTeams(ctx context.Context) ([]*Team, error)
	// UpdateTeamLimits writes a team's MaxSandboxes and MaxLifetime.
	UpdateTeamLimits(ctx context.Context, id string, maxSandboxes int, maxLifetime time.Duration) error

	// CreateAPIKey stores a key of an existing team; ErrConflict if its ID or
	// Hash is taken.
	CreateAPIKey(ctx context.Context, k *APIKey) error
	// APIKeyByHash finds a key by the hex SHA-256 of its text.
	APIKeyByHash(ctx context.Context, hash string) (*APIKey, error)
	// ListAPIKeys returns a team's keys, oldest first.
	ListAPIKeys(ctx context.Context, teamID string) ([]*APIKey, error)
	// DeleteAPIKey deletes a team's key; ErrNotFound if the team has no such key.
	DeleteAPIKey(ctx context.Context, teamID, id string) error
	// TouchAPIKey sets a key's LastUsedAt.
	TouchAPIKey(ctx context.Context, id string, usedAt time.Time) error

	// CreateTemplate stores a template of an existing team; ErrConflict if
	// its ID is taken.
	CreateTemplate(ctx context.Context, t *Template) error
	GetTemplate(ctx context.Context, id string) (*Template, error)
	// ListTemplates returns a team's templates and, with public, every public
	// one, oldest first.
	ListTemplates(ctx context.Context, teamID string, public bool) ([]*Template, error)
	// UpdateTemplate writes t's Public and UpdatedAt; the spawn fields belong
	// to RecordSpawn, so a concurrent spawn is never lost.
	UpdateTemplate(ctx context.Context, t *Template) error
	// DeleteTemplate deletes a template with its aliases, builds and tags.
	// Sandboxes started from it keep running and keep their row.
	DeleteTemplate(ctx context.Context, id string) error
	// ListSnapshots returns a team's snapshot templates (SourceSandboxID
	// set), only those of sandboxID when it is not empty, oldest first.
	ListSnapshots(ctx context.Context, teamID, sandboxID string) ([]*Template, error)
	// RecordSpawn counts one sandbox started from a template at a time.
	RecordSpawn(ctx context.Context, templateID string, at time.Time) error

	// SetAlias points namespace/alias at a template; ErrConflict when another
	// template holds it (setting it again for the same template is no error).
	SetAlias(ctx context.Context, a *Alias) error
	GetAlias(ctx context.Context, namespace, alias string) (*Alias, error)
	// ListAliases returns a template's aliases by namespace, then alias.
	ListAliases(ctx context.Context, templateID string) ([]*Alias, error)
	DeleteAlias(ctx context.Context, namespace, alias string) error

	// CreateBuild stores a build of an existing template; ErrConflict if its
	// ID is taken.
	CreateBuild(ctx context.Context, b *Build) error
	GetBuild(ctx context.Context, id string) (*Build, error)
	// UpdateBuild writes every field of b but ID, TemplateID and CreatedAt.
	UpdateBuild(ctx context.Context, b *Build) error
	// ListBuilds returns a template's builds, newest first.
	ListBuilds(ctx context.Context, templateID string) ([]*Build, error)
	// ListBuildsByStatus returns every template's builds in one of the
	// statuses, oldest first (at start, to find builds a restart cut short).
	ListBuildsByStatus(ctx context.Context, statuses ...BuildStatus) ([]*Build, error)
	// DeleteBuild deletes a build and the tags that name it. Sandboxes
	// started from it keep running and keep their row.
	DeleteBuild(ctx context.Context, id string) error

	// SetTag points templateID:tag at a build of that template (replacing
	// any earlier target and its CreatedAt).
	SetTag(ctx context.Context, t *Tag) error
	GetTag(ctx context.Context, templateID, tag string) (*Tag, error)
	// ListTags returns a template's tags by name.
	ListTags(ctx context.Context, templateID string) ([]*Tag, error)
	DeleteTag(ctx context.Context, templateID, tag string) error

	// InsertSandbox records a new sandbox of an existing team; ErrConflict if
	// the ID is taken. The template is not checked: a sandbox outlives it.
	InsertSandbox(ctx context.Context, s *Sandbox) error
	GetSandbox(ctx context.Context, id string) (*Sandbox, error)
	// ListSandboxes returns the sandboxes f selects, in f's order.
	ListSandboxes(ctx context.Context, f SandboxFilter) ([]*Sandbox, error)
	// CountSandboxes counts the sandboxes f selects, ignoring paging.
	CountSandboxes(ctx context.Context, f SandboxFilter) (int, error)
	// UpdateSandbox runs fn on the current row under a row lock and writes
	// back what fn leaves in it (every field but ID), returning the written
	// row. An error from fn aborts without writing and is returned as is.
	// fn must not call the store: it runs inside the locking transaction
	// (which, on SQLite, holds the only write connection).
	UpdateSandbox(ctx context.Context, id string, fn func(*Sandbox) error) (*Sandbox, error)
	DeleteSandbox(ctx context.Context, id string) error

	// Close releases the database; the store is unusable afterwards.
	Close() error
}
