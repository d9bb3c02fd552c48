package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
	"github.com/warren-sh/warren/internal/version"
)

// Template builds (TEMPLATES.md §1). A build's life:
//
//	RequestBuild   POST /v3/templates: a build row, status waiting, with the
//	               tags asked for in its spec
//	FileUpload     COPY steps' files, uploaded once per team and hash
//	StartBuild     the steps, source and commands are checked and added to the
//	               spec; the build is queued (still waiting)
//	Run            a worker takes it (building) and calls the Builder; the
//	               build ends ready (artifact, default and requested tags) or
//	               error (reason and step)
//
// Log entries of a build go to memory while it runs and to a JSONL file,
// <data-dir>/builds/<buildID>.log, that outlives it and a restart. A restart
// ends builds it finds waiting or building as errors (NewTemplates).

// Defaults of a template build (TEMPLATES.md step 1) and upstream's bounds.
const (
	defaultBuildCPUs     = 2
	defaultBuildMemoryMB = 1024
	maxBuildCPUs         = 32
	minBuildMemoryMB     = 128
	maxTemplateNameLen   = 128
	// defaultTag names a template's latest successful build.
	defaultTag = "default"
)

// DefaultMaxUploadBytes caps one COPY step's upload unless configured.
const DefaultMaxUploadBytes = 1 << 30

// interruptedReason is the reason of builds a restart cut short.
const interruptedReason = "interrupted by a warren restart"

// ImageResolver turns an OCI image reference into an ext4 root image
// provisioned with E2B's conventions (internal/oci), for fromImage builds of
// any image but e2bdev/base.
type ImageResolver interface {
	// RootImage pulls ref (with creds, if any) and returns the root image's
	// path and the image's defaults. The image is the caller's to boot, not
	// to change: builds copy it.
	RootImage(ctx context.Context, ref string, creds *RegistryCredentials) (path string, meta ImageMeta, err error)
}

// ImageMeta is an image's configured defaults.
type ImageMeta struct {
	Env     map[string]string
	Workdir string
	User    string
}

// RegistryCredentials log in to a private registry (TemplateBuildStartV2's
// fromImageRegistry): Type is "registry" (Username, Password), "aws" (ECR)
// or "gcp" (Artifact Registry).
type RegistryCredentials struct {
	Type                  string
	Username, Password    string
	AWSAccessKeyID        string
	AWSSecretAccessKey    string
	AWSRegion             string
	GCPServiceAccountJSON string
}

// TemplatesConfig wires Templates.
type TemplatesConfig struct {
	Store store.Store
	// DataDir is warren's data directory: uploads go to build-files/, build
	// logs to builds/; a build's artifact directory (the Builder's choice) is
	// stored relative to it.
	DataDir string
	// Builder runs builds; nil fails every build, saying builds are not
	// available.
	Builder template.Builder
	// Images resolves fromImage references other than e2bdev/base; nil
	// fails such builds.
	Images ImageResolver
	// Concurrency is how many builds run at once (default 1); the others
	// wait, status waiting.
	Concurrency int
	// MaxUploadBytes caps one COPY upload (default DefaultMaxUploadBytes).
	MaxUploadBytes int64
	// GC, when set, collects template storage while Run runs: at start,
	// after each build and template deletion, and every hour.
	GC  *TemplateGC
	Log *slog.Logger
}

// Templates runs user template builds and manages templates' tags, names
// and deletion.
type Templates struct {
	cfg       TemplatesConfig
	store     store.Store
	log       *slog.Logger
	uploadKey []byte

	mu      sync.Mutex
	pending []*queuedBuild       // started builds waiting for a worker, oldest first
	queued  map[string]bool      // build IDs started in this process and not finished
	logs    map[string]*buildLog // logs of builds in flight, by build ID
	wake    chan struct{}
	gcWake  chan struct{} // asks for a collection of template storage
}

// queuedBuild is a started build waiting for a worker.
type queuedBuild struct {
	buildID string
	team    *store.Team
	spec    buildSpec
	creds   *RegistryCredentials // kept in memory only: never stored
}

// buildSpec is what a build was asked for (store.Build.Spec).
type buildSpec struct {
	// Tags are the tags asked for at request time, given on success.
	Tags []string `json:"tags,omitempty"`
	// Started is set by StartBuild; the rest comes with it.
	Started      bool            `json:"started,omitempty"`
	FromImage    string          `json:"fromImage,omitempty"`
	FromTemplate string          `json:"fromTemplate,omitempty"`
	FromBuildID  string          `json:"fromBuildID,omitempty"` // what FromTemplate resolved to
	Force        bool            `json:"force,omitempty"`
	Steps        []template.Step `json:"steps,omitempty"`
	StartCmd     string          `json:"startCmd,omitempty"`
	ReadyCmd     string          `json:"readyCmd,omitempty"`
	// MinFreeDiskMB comes with the request (TemplateBuildRequestV3).
	MinFreeDiskMB int `json:"minFreeDiskMb,omitempty"`
}

func decodeSpec(b *store.Build) (buildSpec, error) {
	var s buildSpec
	if b.Spec == "" {
		return s, nil
	}
	if err := json.Unmarshal([]byte(b.Spec), &s); err != nil {
		return s, fmt.Errorf("build %s: spec: %w", b.ID, err)
	}
	return s, nil
}

func encodeSpec(s buildSpec) string {
	b, _ := json.Marshal(s) // plain strings and slices: cannot fail
	return string(b)
}

// NewTemplates prepares the data directory, and ends as errors the builds a
// previous run left waiting or building (their VMs died with it). Call it
// before the API serves: builds requested from then on are this process's.
func NewTemplates(ctx context.Context, cfg TemplatesConfig) (*Templates, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if cfg.DataDir == "" {
		return nil, errors.New("templates: no data directory")
	}
	abs, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("templates: %w", err)
	}
	cfg.DataDir = abs
	for _, dir := range []string{filesDir, logsDir} {
		if err := os.MkdirAll(filepath.Join(cfg.DataDir, dir), 0o700); err != nil {
			return nil, fmt.Errorf("templates: %w", err)
		}
	}
	key, err := loadUploadKey(filepath.Join(cfg.DataDir, uploadKeyFile))
	if err != nil {
		return nil, err
	}
	t := &Templates{
		cfg: cfg, store: cfg.Store, log: cfg.Log, uploadKey: key,
		queued: map[string]bool{}, logs: map[string]*buildLog{}, wake: make(chan struct{}, 1),
		gcWake: make(chan struct{}, 1),
	}
	if err := t.failInterrupted(ctx); err != nil {
		return nil, err
	}
	return t, nil
}

// Data directory entries of template builds.
const (
	filesDir      = "build-files" // <teamID>/<hash>.tar.gz: COPY steps' uploads
	logsDir       = "builds"      // <buildID>.log: build logs, JSON lines
	uploadKeyFile = "upload-key"  // signs upload URLs
)

// failInterrupted ends the builds a previous run left unfinished.
func (t *Templates) failInterrupted(ctx context.Context) error {
	left, err := t.store.ListBuildsByStatus(ctx, store.BuildWaiting, store.BuildBuilding)
	if err != nil {
		return fmt.Errorf("templates: find interrupted builds: %w", err)
	}
	for _, b := range left {
		t.log.Warn("template build interrupted by a restart", "template", b.TemplateID, "build", b.ID, "status", b.Status)
		l := t.openLog(b.ID)
		l.add(template.LogEntry{Level: "error", Message: "Build failed: " + interruptedReason})
		l.close()
		if err := t.finishFailed(ctx, b, interruptedReason, ""); err != nil {
			return fmt.Errorf("templates: %w", err)
		}
	}
	return nil
}

// MaxUploadBytes is the largest COPY upload accepted.
func (t *Templates) MaxUploadBytes() int64 { return t.cfg.MaxUploadBytes }

// maxMinFreeDiskMB bounds a build's minFreeDiskMb: 256 GiB.
const maxMinFreeDiskMB = 256 << 10

// NewBuild is a request for a template build (TemplateBuildRequestV3).
type NewBuild struct {
	// Name is "[namespace/]alias[:tag]"; a tag counts as one of Tags.
	Name string
	Tags []string
	// CPUCount and MemoryMB size the build and its sandboxes; nil: defaults.
	CPUCount, MemoryMB *int
	// MinFreeDiskMB is the free disk to leave after the steps; nil: as the
	// source leaves it.
	MinFreeDiskMB *int
}

// RequestedBuild is a build RequestBuild created (TemplateRequestResponseV3).
type RequestedBuild struct {
	TemplateID, BuildID string
	Public              bool
	Names, Aliases      []string
	Tags                []string
}

// RequestBuild creates a waiting build of the template req.Name names: the
// team's template of that name, or else a new template in the team's
// namespace (a name only another team or the global namespace has does not
// count).
func (t *Templates) RequestBuild(ctx context.Context, team *store.Team, req NewBuild) (*RequestedBuild, error) {
	name := strings.TrimSpace(req.Name)
	if name == "" {
		return nil, errorf(Invalid, "Name is required")
	}
	if len(name) > maxTemplateNameLen {
		return nil, errorf(Invalid, "Invalid name: %q is longer than %d characters", name, maxTemplateNameLen)
	}
	ident, tag, hasTag := strings.Cut(strings.ToLower(name), ":")
	ns, alias, namespaced := strings.Cut(ident, "/")
	if !namespaced {
		ns, alias = "", ident
	}
	if !namePattern.MatchString(alias) || (namespaced && !namePattern.MatchString(ns)) {
		return nil, errorf(Invalid, "Invalid name: %q (want [namespace/]alias[:tag]; lower-case letters, digits, '-' and '_')", name)
	}
	if namespaced && ns != team.Slug {
		return nil, errorf(Invalid, "Invalid name: namespace '%s' must match your team '%s'", ns, team.Slug)
	}
	var asked []string
	if hasTag {
		asked = append(asked, tag)
	}
	tags, err := cleanTags(append(asked, req.Tags...))
	if err != nil {
		return nil, err
	}
	tags = slices.DeleteFunc(tags, func(s string) bool { return s == defaultTag }) // always given
	minFree := 0
	if req.MinFreeDiskMB != nil {
		if minFree = *req.MinFreeDiskMB; minFree < 0 || minFree > maxMinFreeDiskMB {
			return nil, errorf(Invalid, "minFreeDiskMb must be between 0 and %d, got %d", maxMinFreeDiskMB, minFree)
		}
	}
	cpus, memMB, err := buildResources(req.CPUCount, req.MemoryMB)
	if err != nil {
		return nil, err
	}

	now := time.Now().UTC()
	var tmpl *store.Template
	a, err := t.store.GetAlias(ctx, team.Slug, alias)
	switch {
	case err == nil:
		if tmpl, err = t.store.GetTemplate(ctx, a.TemplateID); err != nil {
			return nil, fmt.Errorf("template %s of alias %s/%s: %w", a.TemplateID, team.Slug, alias, err)
		}
		if tmpl.TeamID != team.ID {
			return nil, errorf(Conflict, "Template name '%s/%s' belongs to another team", team.Slug, alias)
		}
	case errors.Is(err, store.ErrNotFound):
		id, err := newTemplateID()
		if err != nil {
			return nil, err
		}
		tmpl = &store.Template{ID: id, TeamID: team.ID, CreatedAt: now, UpdatedAt: now}
		if err := t.store.CreateTemplate(ctx, tmpl); err != nil {
			return nil, fmt.Errorf("create template %s: %w", alias, err)
		}
		err = t.store.SetAlias(ctx, &store.Alias{Namespace: team.Slug, Alias: alias, TemplateID: id})
		if err != nil {
			// A concurrent request took the name first.
			if derr := t.store.DeleteTemplate(context.WithoutCancel(ctx), id); derr != nil {
				t.log.Error("delete template after a lost name race", "template", id, "err", derr)
			}
			if errors.Is(err, store.ErrConflict) {
				return nil, errorf(Conflict, "Template name '%s' is being created by another request; try again", alias)
			}
			return nil, fmt.Errorf("name template %s: %w", id, err)
		}
	default:
		return nil, fmt.Errorf("look up template name %s/%s: %w", team.Slug, alias, err)
	}

	buildID, err := newUUID()
	if err != nil {
		return nil, err
	}
	b := &store.Build{
		ID: buildID, TemplateID: tmpl.ID, Status: store.BuildWaiting, CPUCount: cpus, MemoryMB: memMB,
		Spec: encodeSpec(buildSpec{Tags: tags, MinFreeDiskMB: minFree}), CreatedAt: now, UpdatedAt: now,
	}
	if err := t.store.CreateBuild(ctx, b); err != nil {
		return nil, fmt.Errorf("create build of template %s: %w", tmpl.ID, err)
	}
	shown := tags
	if len(shown) == 0 {
		shown = []string{defaultTag}
	}
	return &RequestedBuild{
		TemplateID: tmpl.ID, BuildID: buildID, Public: tmpl.Public,
		Names: []string{ident}, Aliases: []string{alias}, Tags: shown,
	}, nil
}

// buildResources checks the CPU count and memory of a build, with upstream's
// messages (the SDK shows them as they are).
func buildResources(cpuCount, memoryMB *int) (cpus, memMB int, err error) {
	cpus, memMB = defaultBuildCPUs, defaultBuildMemoryMB
	if cpuCount != nil {
		cpus = *cpuCount
		switch {
		case cpus < 1:
			return 0, 0, errorf(Invalid, "CPU count must be at least 1")
		case cpus > maxBuildCPUs:
			return 0, 0, errorf(Invalid, "CPU count must be at most %d", maxBuildCPUs)
		case cpus != 1 && cpus%2 != 0:
			return 0, 0, errorf(Invalid, "CPU count must be 1 or an even number")
		}
	}
	if memoryMB != nil {
		memMB = *memoryMB
		switch {
		case memMB < minBuildMemoryMB:
			return 0, 0, errorf(Invalid, "Memory must be at least %d MiB", minBuildMemoryMB)
		case memMB%2 != 0:
			return 0, 0, errorf(Invalid, "Memory must be divisible by 2")
		}
	}
	return cpus, memMB, nil
}

// uuidPattern matches a UUID as upstream's parser accepts it (with or
// without dashes): tags must not look like build IDs.
var uuidPattern = regexp.MustCompile(`^(urn:uuid:)?\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?$`)

// cleanTags lower-cases, checks and deduplicates tags, keeping their order.
func cleanTags(tags []string) ([]string, error) {
	out := []string{}
	for _, raw := range tags {
		tag := strings.ToLower(strings.TrimSpace(raw))
		if !tagPattern.MatchString(tag) {
			return nil, errorf(Invalid, "Invalid tag: %q (want lower-case letters, digits, '-', '_' and '.')", raw)
		}
		if uuidPattern.MatchString(tag) {
			return nil, errorf(Invalid, "Invalid tag: '%s' cannot be a UUID", raw)
		}
		if !slices.Contains(out, tag) {
			out = append(out, tag)
		}
	}
	return out, nil
}

// StartRequest is the body of a build start (TemplateBuildStartV2).
type StartRequest struct {
	// Exactly one of FromImage and FromTemplate.
	FromImage    string
	FromTemplate string
	Registry     *RegistryCredentials
	Force        bool
	Steps        []template.Step
	StartCmd     string
	ReadyCmd     string
}

// stepTypes are the step types a build runs (TEMPLATES.md step 3).
var stepTypes = []string{"RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER"}

// StartBuild checks a waiting build's steps and source and queues it. COPY
// steps' files must be uploaded first.
func (t *Templates) StartBuild(ctx context.Context, team *store.Team, templateRef, buildID string, req StartRequest) error {
	tmpl, b, err := t.ownBuild(ctx, team, templateRef, buildID)
	if err != nil {
		return err
	}
	spec, err := decodeSpec(b)
	if err != nil {
		return err
	}
	switch {
	case b.Status == store.BuildError && !spec.Started:
		return errorf(Invalid, "Build '%s' failed before it started (%s); request a new build with POST /v3/templates", buildID, b.Reason)
	case b.Status != store.BuildWaiting || spec.Started:
		return errorf(Invalid, "Build '%s' was already started (status %s); request a new build with POST /v3/templates", buildID, b.Status)
	}
	switch {
	case req.FromImage != "" && req.FromTemplate != "":
		return errorf(Invalid, "Set either fromImage or fromTemplate, not both")
	case req.FromImage == "" && req.FromTemplate == "":
		return errorf(Invalid, "Either fromImage or fromTemplate must be set")
	case req.FromTemplate != "":
		from, err := resolveTemplate(ctx, t.store, team, req.FromTemplate)
		if err != nil {
			return err
		}
		spec.FromTemplate, spec.FromBuildID = req.FromTemplate, from.Build.ID
	default:
		if strings.ContainsAny(req.FromImage, " \t\n") {
			return errorf(Invalid, "Invalid fromImage %q: want an image reference such as python:3.12-slim", req.FromImage)
		}
		if err := checkCredentials(req.Registry); err != nil {
			return err
		}
		spec.FromImage = req.FromImage
	}
	for i, s := range req.Steps {
		if err := t.checkStep(team, i+1, s); err != nil {
			return err
		}
	}
	spec.Started, spec.Force, spec.Steps = true, req.Force, req.Steps
	spec.StartCmd, spec.ReadyCmd = req.StartCmd, req.ReadyCmd

	t.mu.Lock()
	if t.queued[b.ID] {
		t.mu.Unlock()
		return errorf(Invalid, "Build '%s' was already started", buildID)
	}
	t.queued[b.ID] = true
	t.mu.Unlock()
	b.Spec, b.UpdatedAt = encodeSpec(spec), time.Now().UTC()
	if err := t.store.UpdateBuild(ctx, b); err != nil {
		t.mu.Lock()
		delete(t.queued, b.ID)
		t.mu.Unlock()
		return fmt.Errorf("start build %s of template %s: %w", b.ID, tmpl.ID, err)
	}
	l := t.openLog(b.ID)
	l.add(template.LogEntry{Level: "info", Message: fmt.Sprintf("Build %s of template %s queued", b.ID, tmpl.ID)})
	t.mu.Lock()
	t.logs[b.ID] = l
	t.pending = append(t.pending, &queuedBuild{buildID: b.ID, team: team, spec: spec, creds: req.Registry})
	t.mu.Unlock()
	select {
	case t.wake <- struct{}{}:
	default:
	}
	return nil
}

// checkStep checks step n of a build.
func (t *Templates) checkStep(team *store.Team, n int, s template.Step) error {
	if !slices.Contains(stepTypes, s.Type) {
		return errorf(Invalid, "Step %d: unknown type %q (want one of %s)", n, s.Type, strings.Join(stepTypes, ", "))
	}
	bad := func(format string, args ...any) error {
		return errorf(Invalid, "Step %d (%s): %s", n, s.Type, fmt.Sprintf(format, args...))
	}
	switch s.Type {
	case "RUN":
		if len(s.Args) == 0 || strings.TrimSpace(s.Args[0]) == "" {
			return bad("no command to run")
		}
	case "COPY", "ADD":
		if len(s.Args) < 2 || s.Args[0] == "" || s.Args[1] == "" {
			return bad("want args [source, destination, owner?, mode?], got %q", s.Args)
		}
		if s.FilesHash == "" {
			return bad("no filesHash: the SDK sends the hash of the uploaded files")
		}
		if !hashPattern.MatchString(s.FilesHash) {
			return bad("invalid filesHash %q", s.FilesHash)
		}
		if _, err := os.Stat(t.filePath(team.ID, s.FilesHash)); err != nil {
			return bad("the files of %s (hash %s) were not uploaded; upload them first (GET /templates/{templateID}/files/%s)", s.Args[0], s.FilesHash, s.FilesHash)
		}
	case "ENV", "ARG":
		if len(s.Args) == 0 || (s.Type == "ENV" && len(s.Args)%2 != 0) {
			return bad("want args [name, value, ...], got %q", s.Args)
		}
	case "WORKDIR":
		if len(s.Args) != 1 || s.Args[0] == "" {
			return bad("want args [path], got %q", s.Args)
		}
	case "USER":
		if len(s.Args) == 0 || s.Args[0] == "" {
			return bad("want args [name, sudo?], got %q", s.Args)
		}
	}
	return nil
}

func checkCredentials(c *RegistryCredentials) error {
	if c == nil {
		return nil
	}
	var missing []string
	need := func(name, v string) {
		if v == "" {
			missing = append(missing, name)
		}
	}
	switch c.Type {
	case "registry":
		need("username", c.Username)
		need("password", c.Password)
	case "aws":
		need("awsAccessKeyId", c.AWSAccessKeyID)
		need("awsSecretAccessKey", c.AWSSecretAccessKey)
		need("awsRegion", c.AWSRegion)
	case "gcp":
		need("serviceAccountJson", c.GCPServiceAccountJSON)
	default:
		return errorf(Invalid, "fromImageRegistry: unknown type %q (want registry, aws or gcp)", c.Type)
	}
	if len(missing) > 0 {
		return errorf(Invalid, "fromImageRegistry of type %s: missing %s", c.Type, strings.Join(missing, ", "))
	}
	return nil
}

// ownTemplate finds a template of the team by ID or name; other teams'
// templates are not found.
func (t *Templates) ownTemplate(ctx context.Context, team *store.Team, ref string) (*store.Template, error) {
	r, err := parseTemplateRef(ref)
	if err != nil {
		return nil, err
	}
	tmpl, _, err := findTemplate(ctx, t.store, team, r)
	if err != nil {
		return nil, err
	}
	if tmpl.TeamID != team.ID {
		return nil, errorf(NotFound, "template '%s' not found", ref)
	}
	return tmpl, nil
}

// ownBuild finds a build of one of the team's templates.
func (t *Templates) ownBuild(ctx context.Context, team *store.Team, templateRef, buildID string) (*store.Template, *store.Build, error) {
	tmpl, err := t.ownTemplate(ctx, team, templateRef)
	if err != nil {
		return nil, nil, err
	}
	b, err := t.store.GetBuild(ctx, buildID)
	if errors.Is(err, store.ErrNotFound) || (err == nil && b.TemplateID != tmpl.ID) {
		return nil, nil, errorf(NotFound, "Build '%s' of template '%s' not found", buildID, templateRef)
	}
	if err != nil {
		return nil, nil, err
	}
	return tmpl, b, nil
}

// Run runs queued builds, Concurrency at a time, and collects template
// storage (TemplatesConfig.GC), until ctx is done. Builds cut short by ctx
// end as errors; queued ones stay waiting and are failed by the next start.
func (t *Templates) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	if t.cfg.GC != nil {
		wg.Go(func() { t.collectLoop(ctx) })
	}
	for range t.cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				q := t.next(ctx)
				if q == nil {
					return
				}
				t.run(ctx, q)
			}
		}()
	}
	wg.Wait()
	return nil
}

// next waits for a queued build; nil when ctx is done.
func (t *Templates) next(ctx context.Context) *queuedBuild {
	for {
		t.mu.Lock()
		if len(t.pending) > 0 {
			q := t.pending[0]
			t.pending = t.pending[1:]
			more := len(t.pending) > 0
			t.mu.Unlock()
			if more { // another worker may be idle
				select {
				case t.wake <- struct{}{}:
				default:
				}
			}
			return q
		}
		t.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-t.wake:
		}
	}
}

// run takes one build from waiting to ready or error.
func (t *Templates) run(ctx context.Context, q *queuedBuild) {
	t.mu.Lock()
	l := t.logs[q.buildID]
	t.mu.Unlock()
	defer func() {
		l.close()
		t.mu.Lock()
		delete(t.logs, q.buildID)
		delete(t.queued, q.buildID)
		t.mu.Unlock()
		// What the build made is recorded (or failed): what it replaced
		// or left may go.
		t.collectSoon()
	}()
	b, err := t.store.GetBuild(ctx, q.buildID)
	if err != nil || b.Status != store.BuildWaiting {
		// Deleted with its template while it waited, or the store failed.
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			t.log.Error("template build: reload", "build", q.buildID, "err", err)
		}
		return
	}
	start := time.Now()
	b.Status, b.UpdatedAt = store.BuildBuilding, start.UTC()
	if err := t.store.UpdateBuild(ctx, b); err != nil {
		t.log.Error("template build: mark building", "build", b.ID, "err", err)
		return
	}
	t.log.Info("template build started", "template", b.TemplateID, "build", b.ID)
	l.add(template.LogEntry{Level: "info", Message: "Building template " + b.TemplateID})

	art, err := t.build(ctx, q, b, l)
	done := context.WithoutCancel(ctx)
	if err != nil {
		msg, step := buildFailure(ctx, err)
		t.log.Warn("template build failed", "template", b.TemplateID, "build", b.ID, "step", step, "err", err)
		l.add(template.LogEntry{Level: "error", Message: "Build failed: " + msg, Step: step})
		if err := t.finishFailed(done, b, msg, step); err != nil {
			t.log.Error("template build: record failure", "build", b.ID, "err", err)
		}
		return
	}
	took := time.Since(start).Round(100 * time.Millisecond)
	if err := t.finishReady(done, b, q.spec, art); err != nil {
		t.log.Error("template build: record success", "build", b.ID, "err", err)
		l.add(template.LogEntry{Level: "error", Message: "Build failed: recording the build: " + err.Error(), Step: "finalize"})
		if err := t.finishFailed(done, b, "recording the build failed", "finalize"); err != nil {
			t.log.Error("template build: record failure", "build", b.ID, "err", err)
		}
		return
	}
	t.log.Info("template build ready", "template", b.TemplateID, "build", b.ID, "took", took)
	l.add(template.LogEntry{Level: "info", Message: fmt.Sprintf("Build finished in %s", took), Step: "finalize"})
}

// buildFailure is the reason and step of a failed build.
func buildFailure(ctx context.Context, err error) (msg, step string) {
	var be *template.BuildError
	switch {
	case errors.As(err, &be):
		return be.Message, be.Step
	case ctx.Err() != nil:
		return "interrupted: warren is shutting down", ""
	}
	return err.Error(), ""
}

// build resolves the build's source and runs the Builder.
func (t *Templates) build(ctx context.Context, q *queuedBuild, b *store.Build, l *buildLog) (*template.Artifact, error) {
	if t.cfg.Builder == nil {
		return nil, &template.BuildError{Step: "base", Message: "template builds are not available: this warren has no template builder"}
	}
	src, err := t.source(ctx, q)
	if err != nil {
		return nil, err
	}
	team := q.team.ID
	return t.cfg.Builder.Build(ctx, template.BuildRequest{
		BuildID: b.ID, TemplateID: b.TemplateID, From: *src, Steps: q.spec.Steps, Force: q.spec.Force,
		StartCmd: q.spec.StartCmd, ReadyCmd: q.spec.ReadyCmd, CPUs: b.CPUCount, MemoryMiB: b.MemoryMB,
		MinFreeDiskMiB: q.spec.MinFreeDiskMB,
		Files: func(hash string) (string, error) {
			if !hashPattern.MatchString(hash) {
				return "", fmt.Errorf("invalid files hash %q", hash)
			}
			p := t.filePath(team, hash)
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("the files with hash %s were not uploaded: %w", hash, err)
			}
			return p, nil
		},
		Log: l.add,
	})
}

// source is what a build starts from: a template build's artifact
// (fromTemplate, fromImage e2bdev/base) or an image's root image.
func (t *Templates) source(ctx context.Context, q *queuedBuild) (*template.Source, error) {
	fail := func(format string, args ...any) error {
		return &template.BuildError{Step: "base", Message: fmt.Sprintf(format, args...)}
	}
	if q.spec.FromTemplate != "" {
		from, err := t.store.GetBuild(ctx, q.spec.FromBuildID)
		if err != nil {
			return nil, fail("the template %q to build from is gone: %v", q.spec.FromTemplate, err)
		}
		a, err := t.loadArtifact(from)
		if err != nil {
			return nil, fail("the template %q to build from cannot be used: %v", q.spec.FromTemplate, err)
		}
		return &template.Source{Template: a}, nil
	}
	if isBaseImage(q.spec.FromImage) {
		a, err := t.baseArtifact(ctx)
		if err != nil {
			return nil, fail("image %s is warren's base template, which is not available: %v", q.spec.FromImage, err)
		}
		return &template.Source{Template: a}, nil
	}
	if t.cfg.Images == nil {
		return nil, fail("template builds from image %q are not available: this warren cannot pull images (fromTemplate and fromImage e2bdev/base work)", q.spec.FromImage)
	}
	path, meta, err := t.cfg.Images.RootImage(ctx, q.spec.FromImage, q.creds)
	if err != nil {
		return nil, fail("image %s: %v", q.spec.FromImage, err)
	}
	return &template.Source{RootImage: path, Env: meta.Env, Workdir: meta.Workdir, User: meta.User}, nil
}

// isBaseImage reports whether ref names e2bdev/base (any tag or digest):
// E2B's base image, for which warren has its base template.
func isBaseImage(ref string) bool {
	ref = strings.ToLower(ref)
	for _, prefix := range []string{"docker.io/", "index.docker.io/", "registry-1.docker.io/"} {
		ref = strings.TrimPrefix(ref, prefix)
	}
	if i := strings.IndexAny(ref, ":@"); i >= 0 {
		ref = ref[:i]
	}
	return ref == "e2bdev/base"
}

// baseArtifact is the latest successful build of the global template "base".
func (t *Templates) baseArtifact(ctx context.Context) (*template.Artifact, error) {
	a, err := t.store.GetAlias(ctx, "", "base")
	if err != nil {
		return nil, err
	}
	builds, err := t.store.ListBuilds(ctx, a.TemplateID)
	if err != nil {
		return nil, err
	}
	for _, b := range builds {
		if b.Status == store.BuildReady {
			return t.loadArtifact(b)
		}
	}
	return nil, errors.New("it has no successful build")
}

// loadArtifact loads a build's artifact (stored relative to the data dir).
func (t *Templates) loadArtifact(b *store.Build) (*template.Artifact, error) {
	if b.Status != store.BuildReady || b.Artifact == "" {
		return nil, fmt.Errorf("build %s is %s", b.ID, b.Status)
	}
	return template.LoadArtifact(dataPath(t.cfg.DataDir, b.Artifact))
}

// finishReady records a successful build: its artifact and resources, and
// the default and requested tags.
func (t *Templates) finishReady(ctx context.Context, b *store.Build, spec buildSpec, a *template.Artifact) error {
	now := time.Now().UTC()
	b.Status, b.UpdatedAt, b.FinishedAt = store.BuildReady, now, &now
	b.Artifact = StoredArtifact(t.cfg.DataDir, a.Dir)
	if a.CPUs > 0 {
		b.CPUCount = a.CPUs
	}
	if a.MemoryMiB > 0 {
		b.MemoryMB = a.MemoryMiB
	}
	if fi, err := os.Stat(a.RootDisk); err == nil {
		b.DiskSizeMB = int(fi.Size() >> 20)
	}
	b.EnvdVersion = version.EnvdVersion
	b.Reason, b.ReasonStep = "", ""
	if err := t.store.UpdateBuild(ctx, b); err != nil {
		return err
	}
	for _, tag := range append([]string{defaultTag}, spec.Tags...) {
		if err := t.store.SetTag(ctx, &store.Tag{TemplateID: b.TemplateID, Tag: tag, BuildID: b.ID, CreatedAt: now}); err != nil {
			return fmt.Errorf("tag %s: %w", tag, err)
		}
	}
	if tmpl, err := t.store.GetTemplate(ctx, b.TemplateID); err == nil {
		tmpl.UpdatedAt = now
		if err := t.store.UpdateTemplate(ctx, tmpl); err != nil {
			t.log.Warn("template build: touch template", "template", b.TemplateID, "err", err)
		}
	}
	return nil
}

// finishFailed records a failed build.
func (t *Templates) finishFailed(ctx context.Context, b *store.Build, reason, step string) error {
	now := time.Now().UTC()
	b.Status, b.Reason, b.ReasonStep, b.UpdatedAt, b.FinishedAt = store.BuildError, reason, step, now, &now
	if err := t.store.UpdateBuild(ctx, b); err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("record failed build %s: %w", b.ID, err)
	}
	return nil
}

// newUUID returns a random (version 4) UUID: a build ID.
func newUUID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate build ID: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}
