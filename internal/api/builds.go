package api

import (
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
	"github.com/warren-sh/warren/internal/template"
)

// Template builds (TEMPLATES.md §1-§3): the routes the SDK's Template.build
// and the CLI's `template create` call, tags, and template deletion. The
// work is control.Templates'; these handlers translate E2B's shapes.

// uploadPath is the route of COPY uploads: the URL carries its own
// authorization (a signed token), as the SDK sends no API key there.
const uploadPath = "/upload/{token}"

// templates is the build side of the control plane, or a 503 when this API
// was started without it.
func (s *server) templates() (*control.Templates, error) {
	if s.cfg.Templates == nil {
		return nil, &apiError{status: http.StatusServiceUnavailable, message: "Template builds are not enabled on this server"}
	}
	return s.cfg.Templates, nil
}

// templateBuildRequestV3 is the TemplateBuildRequestV3 schema.
type templateBuildRequestV3 struct {
	Name     string   `json:"name"`
	Alias    string   `json:"alias"` // deprecated spelling of name
	TeamID   string   `json:"teamID"`
	Tags     []string `json:"tags"`
	CPUCount *int     `json:"cpuCount"`
	MemoryMB *int     `json:"memoryMB"`
	// MinFreeDiskMB is the free disk the template's sandboxes start with,
	// at least (the build grows the disk when the steps left less).
	MinFreeDiskMB *int `json:"minFreeDiskMb"`
}

// templateRequestResponseV3 is the TemplateRequestResponseV3 schema.
type templateRequestResponseV3 struct {
	TemplateID string   `json:"templateID"`
	BuildID    string   `json:"buildID"`
	Public     bool     `json:"public"`
	Names      []string `json:"names"`
	Tags       []string `json:"tags"`
	Aliases    []string `json:"aliases"`
}

// createTemplateV3 requests a build: step 1 of Template.build.
func (s *server) createTemplateV3(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	var body templateBuildRequestV3
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.TeamID != "" && body.TeamID != team.ID {
		return forbidden("The API key belongs to team %s, not to team %s", team.ID, body.TeamID)
	}
	name := body.Name
	if name == "" {
		name = body.Alias
	}
	res, err := tpl.RequestBuild(r.Context(), team, control.NewBuild{
		Name: name, Tags: body.Tags, CPUCount: body.CPUCount, MemoryMB: body.MemoryMB, MinFreeDiskMB: body.MinFreeDiskMB,
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, templateRequestResponseV3{
		TemplateID: res.TemplateID, BuildID: res.BuildID, Public: res.Public,
		Names: res.Names, Tags: res.Tags, Aliases: res.Aliases,
	})
	return nil
}

// templateBuildFileUpload is the TemplateBuildFileUpload schema.
type templateBuildFileUpload struct {
	Present bool              `json:"present"`
	URL     string            `json:"url,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
}

// templateFiles answers whether a COPY step's files are uploaded, and where
// to upload them if not: always 201, as upstream.
func (s *server) templateFiles(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	present, token, err := tpl.FileUpload(r.Context(), team, r.PathValue("templateID"), r.PathValue("hash"))
	if err != nil {
		return err
	}
	out := templateBuildFileUpload{Present: present}
	if !present {
		out.URL = requestBase(r) + strings.Replace(uploadPath, "{token}", token, 1)
		out.Headers = map[string]string{"Content-Type": "application/gzip"}
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// requestBase is the scheme and host the client called this API at, so the
// upload URL reaches the same listener (also behind a TLS-terminating proxy
// that says X-Forwarded-Proto).
func requestBase(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if p, _, _ := strings.Cut(r.Header.Get("X-Forwarded-Proto"), ","); p != "" {
		if p = strings.ToLower(strings.TrimSpace(p)); p == "http" || p == "https" {
			scheme = p
		}
	}
	return scheme + "://" + r.Host
}

// uploadBuildFiles stores a COPY step's tar.gz. The SDK sends an exact
// Content-Length (never chunked) and no API key: the token in the path is the
// authorization.
func (s *server) uploadBuildFiles(w http.ResponseWriter, r *http.Request, _ *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	u, err := tpl.VerifyUpload(r.PathValue("token"))
	if err != nil {
		return forbidden("%v", err)
	}
	switch limit := tpl.MaxUploadBytes(); {
	case r.ContentLength < 0:
		return &apiError{status: http.StatusLengthRequired, message: "Content-Length is required: send the archive's exact size, not a chunked body"}
	case r.ContentLength == 0:
		return badRequest("The upload is empty: want the tar.gz of the COPY step's files")
	case r.ContentLength > limit:
		return &apiError{status: http.StatusRequestEntityTooLarge, message: tooLargeMessage(limit)}
	}
	if err := tpl.SaveUpload(r.Context(), u, r.Body, r.ContentLength); err != nil {
		return err
	}
	writeEmpty(w, http.StatusOK)
	return nil
}

// templateBuildStartV2 is the TemplateBuildStartV2 schema.
type templateBuildStartV2 struct {
	FromImage         string             `json:"fromImage"`
	FromTemplate      string             `json:"fromTemplate"`
	FromImageRegistry *fromImageRegistry `json:"fromImageRegistry"`
	Force             bool               `json:"force"`
	Steps             []template.Step    `json:"steps"`
	StartCmd          string             `json:"startCmd"`
	ReadyCmd          string             `json:"readyCmd"`
}

// fromImageRegistry is the FromImageRegistry schema (its three variants).
type fromImageRegistry struct {
	Type               string `json:"type"`
	Username           string `json:"username"`
	Password           string `json:"password"`
	AWSAccessKeyID     string `json:"awsAccessKeyId"`
	AWSSecretAccessKey string `json:"awsSecretAccessKey"`
	AWSRegion          string `json:"awsRegion"`
	ServiceAccountJSON string `json:"serviceAccountJson"`
}

// startBuildV2 queues a requested build: step 3 of Template.build. The
// answer is 202 with an empty body and Content-Length: 0 (the SDK parses any
// other body as JSON).
func (s *server) startBuildV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	var body templateBuildStartV2
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	req := control.StartRequest{
		FromImage: body.FromImage, FromTemplate: body.FromTemplate, Force: body.Force, Steps: body.Steps,
		StartCmd: body.StartCmd, ReadyCmd: body.ReadyCmd,
	}
	if c := body.FromImageRegistry; c != nil {
		req.Registry = &control.RegistryCredentials{
			Type: c.Type, Username: c.Username, Password: c.Password, AWSAccessKeyID: c.AWSAccessKeyID,
			AWSSecretAccessKey: c.AWSSecretAccessKey, AWSRegion: c.AWSRegion, GCPServiceAccountJSON: c.ServiceAccountJSON,
		}
	}
	if err := tpl.StartBuild(r.Context(), team, r.PathValue("templateID"), r.PathValue("buildID"), req); err != nil {
		return err
	}
	writeEmpty(w, http.StatusAccepted)
	return nil
}

// buildLogEntry is the BuildLogEntry schema.
type buildLogEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step,omitempty"`
}

func logEntries(in []template.LogEntry) []buildLogEntry {
	out := make([]buildLogEntry, len(in))
	for i, e := range in {
		out[i] = buildLogEntry{Timestamp: e.Time.UTC(), Level: e.Level, Message: e.Message, Step: e.Step}
	}
	return out
}

// templateBuildInfo is the TemplateBuildInfo schema.
type templateBuildInfo struct {
	TemplateID string             `json:"templateID"`
	BuildID    string             `json:"buildID"`
	Status     string             `json:"status"`
	Logs       []string           `json:"logs"`
	LogEntries []buildLogEntry    `json:"logEntries"`
	Reason     *buildStatusReason `json:"reason,omitempty"`
}

// buildStatusReason is the BuildStatusReason schema.
type buildStatusReason struct {
	Message    string          `json:"message"`
	Step       string          `json:"step,omitempty"`
	LogEntries []buildLogEntry `json:"logEntries"`
}

// buildStatus answers the SDK's poll (step 4): the status and the log
// entries from logsOffset on, at most limit (≤ 100) of them.
func (s *server) buildStatus(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	q := r.URL.Query()
	offset, err := queryInt(q, "logsOffset", 0, 0, math.MaxInt32)
	if err != nil {
		return err
	}
	limit, err := queryInt(q, "limit", 100, 0, 100)
	if err != nil {
		return err
	}
	level := q.Get("level")
	if err := control.CheckLevel(level); err != nil {
		return err
	}
	info, err := tpl.BuildStatus(r.Context(), team, r.PathValue("templateID"), r.PathValue("buildID"), int(offset), int(limit), level)
	if err != nil {
		return err
	}
	out := templateBuildInfo{
		TemplateID: info.TemplateID, BuildID: info.BuildID, Status: string(info.Status),
		Logs: make([]string, len(info.Entries)), LogEntries: logEntries(info.Entries),
	}
	for i, e := range info.Entries {
		out.Logs[i] = e.Message
	}
	if rs := info.Reason; rs != nil {
		out.Reason = &buildStatusReason{Message: rs.Message, Step: rs.Step, LogEntries: logEntries(rs.Entries)}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// buildLogs pages a build's log by time: cursor (unix milliseconds),
// direction, limit (≤ 100), level; source is accepted (warren keeps one log).
func (s *server) buildLogs(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	q := r.URL.Query()
	cursor, err := queryInt(q, "cursor", -1, 0, math.MaxInt64)
	if err != nil {
		return err
	}
	limit, err := queryInt(q, "limit", 100, 0, 100)
	if err != nil {
		return err
	}
	lq := control.LogQuery{Limit: int(limit), Level: q.Get("level")}
	if cursor >= 0 {
		lq.Cursor = time.UnixMilli(cursor)
	}
	switch d := q.Get("direction"); d {
	case "", "forward":
	case "backward":
		lq.Backward = true
	default:
		return badRequest("Query parameter \"direction\" must be forward or backward, not %q", d)
	}
	if src := q.Get("source"); src != "" && src != "temporary" && src != "persistent" {
		return badRequest("Query parameter \"source\" must be temporary or persistent, not %q", src)
	}
	if err := control.CheckLevel(lq.Level); err != nil {
		return err
	}
	entries, err := tpl.BuildLogs(r.Context(), team, r.PathValue("templateID"), r.PathValue("buildID"), lq)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct {
		Logs []buildLogEntry `json:"logs"`
	}{logEntries(entries)})
	return nil
}

// assignTemplateTags is the AssignTemplateTagsRequest schema.
type assignTemplateTags struct {
	Target string   `json:"target"`
	Tags   []string `json:"tags"`
}

// assignTags points tags at the build a "name:tag" target names (201).
func (s *server) assignTags(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	var body assignTemplateTags
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Target == "" {
		return badRequest("Field \"target\" is required: the build to tag, as name:tag")
	}
	buildID, tags, err := tpl.AssignTags(r.Context(), team, body.Target, body.Tags)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, struct {
		BuildID string   `json:"buildID"`
		Tags    []string `json:"tags"`
	}{buildID, tags})
	return nil
}

// deleteTemplateTags is the DeleteTemplateTagsRequest schema.
type deleteTemplateTags struct {
	Name string   `json:"name"`
	Tags []string `json:"tags"`
}

// removeTags removes tags from a template; the SDK sends the body on DELETE.
func (s *server) removeTags(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	var body deleteTemplateTags
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Name == "" {
		return badRequest("Field \"name\" is required: the template whose tags to remove")
	}
	if err := tpl.RemoveTags(r.Context(), team, body.Name, body.Tags); err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}

// updateTemplateV2 makes a template public or private (CLI `template publish`).
func (s *server) updateTemplateV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	tpl, err := s.templates()
	if err != nil {
		return err
	}
	var body struct {
		Public *bool `json:"public"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Public == nil {
		return badRequest("Nothing to update: set \"public\" to true or false")
	}
	names, err := tpl.SetPublic(r.Context(), team, r.PathValue("templateID"), *body.Public)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct {
		Names []string `json:"names"`
	}{names})
	return nil
}
