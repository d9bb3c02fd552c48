package api

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
)

// Default sandbox lifetimes when a create or connect body names none: the
// spec's v1 default (older SDKs always send one), and npm e2b 2.51's, which
// omits the field unless the user sets it.
const (
	defaultTimeoutV1 = 15
	defaultTimeoutV2 = 300
)

// newSandbox is the NewSandbox (v1) / NewSandboxV2 body. Pointers tell an
// absent field from a zero one. iam and volumeMounts are not read: they are
// optional upstream features, and unknown fields are ignored (REST.md §1).
type newSandbox struct {
	TemplateID          *string           `json:"templateID"`
	Timeout             *int32            `json:"timeout"`
	Secure              *bool             `json:"secure"` // v1 only; every sandbox gets a token anyway
	AllowInternetAccess *bool             `json:"allow_internet_access"`
	Metadata            map[string]string `json:"metadata"`
	EnvVars             map[string]string `json:"envVars"`
	AutoPause           *bool             `json:"autoPause"`
	AutoPauseMemory     *bool             `json:"autoPauseMemory"`
	AutoResume          *struct {
		Enabled *bool `json:"enabled"`
	} `json:"autoResume"`
	Network *sandboxNetwork `json:"network"`
	MCP     json.RawMessage `json:"mcp"`
}

// sandboxNetwork is SandboxNetworkConfig. httpsPorts (e2b 2.51) is ignored.
type sandboxNetwork struct {
	AllowPublicTraffic *bool           `json:"allowPublicTraffic"`
	AllowOut           []string        `json:"allowOut"`
	DenyOut            []string        `json:"denyOut"`
	EgressProxy        json.RawMessage `json:"egressProxy"`
	MaskRequestHost    string          `json:"maskRequestHost"`
	Rules              json.RawMessage `json:"rules"`
}

// denyAll is the one egress rule warren enforces today: no internet.
const denyAll = "0.0.0.0/0"

// sandboxResponse is the Sandbox schema (create and connect).
type sandboxResponse struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	Alias              string  `json:"alias,omitempty"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

// listedSandbox is the ListedSandbox schema.
type listedSandbox struct {
	SandboxID   string            `json:"sandboxID"`
	TemplateID  string            `json:"templateID"`
	Alias       string            `json:"alias,omitempty"`
	ClientID    string            `json:"clientID"`
	StartedAt   time.Time         `json:"startedAt"`
	EndAt       time.Time         `json:"endAt"`
	CPUCount    int               `json:"cpuCount"`
	MemoryMB    int               `json:"memoryMB"`
	DiskSizeMB  int               `json:"diskSizeMB"`
	Metadata    map[string]string `json:"metadata"`
	State       string            `json:"state"`
	EnvdVersion string            `json:"envdVersion"`
}

// sandboxDetail is the SandboxDetail schema.
type sandboxDetail struct {
	listedSandbox
	EnvdAccessToken     string           `json:"envdAccessToken"`
	AllowInternetAccess bool             `json:"allowInternetAccess"`
	Domain              *string          `json:"domain"`
	Lifecycle           sandboxLifecycle `json:"lifecycle"`
}

// sandboxLifecycle is the SandboxLifecycle schema.
type sandboxLifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"`
}

func (s *server) domain() *string {
	if s.cfg.Domain == "" {
		return nil
	}
	return &s.cfg.Domain
}

func (s *server) sandboxResponse(sb *store.Sandbox) sandboxResponse {
	return sandboxResponse{
		SandboxID: sb.ID, TemplateID: sb.TemplateID, Alias: sb.Alias, ClientID: clientID,
		EnvdVersion: sb.EnvdVersion, EnvdAccessToken: sb.EnvdAccessToken, Domain: s.domain(),
	}
}

func listed(sb *store.Sandbox) listedSandbox {
	md := sb.Metadata
	if md == nil {
		md = map[string]string{}
	}
	return listedSandbox{
		SandboxID: sb.ID, TemplateID: sb.TemplateID, Alias: sb.Alias, ClientID: clientID,
		StartedAt: sb.StartedAt.UTC(), EndAt: sb.EndAt.UTC(),
		CPUCount: sb.CPUCount, MemoryMB: sb.MemoryMB, DiskSizeMB: sb.DiskSizeMB,
		Metadata: md, State: publicState(sb.State), EnvdVersion: sb.EnvdVersion,
	}
}

// publicState is the state E2B clients know: a sandbox on its way to or
// from paused is paused until it runs again.
func publicState(st store.SandboxState) string {
	if st == store.StatePausing || st == store.StatePaused || st == store.StateResuming {
		return "paused"
	}
	return "running"
}

func (s *server) createSandboxV1(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	return s.createSandbox(w, r, team, defaultTimeoutV1)
}

func (s *server) createSandboxV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	return s.createSandbox(w, r, team, defaultTimeoutV2)
}

func (s *server) createSandbox(w http.ResponseWriter, r *http.Request, team *store.Team, defaultTimeout int32) error {
	var body newSandbox
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	req, err := body.createRequest(defaultTimeout)
	if err != nil {
		return err
	}
	sb, err := s.control.Create(r.Context(), team, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, s.sandboxResponse(sb))
	return nil
}

// createRequest validates the body and applies the defaults of REST.md §4.
// Timeouts are checked by the controller, which knows the team's limit.
func (b *newSandbox) createRequest(defaultTimeout int32) (control.CreateRequest, error) {
	if b.TemplateID == nil {
		return control.CreateRequest{}, badRequest("Field \"templateID\" is required")
	}
	req := control.CreateRequest{
		TemplateRef:   *b.TemplateID,
		Timeout:       time.Duration(defaultTimeout) * time.Second,
		Metadata:      b.Metadata,
		EnvVars:       b.EnvVars,
		AllowInternet: b.AllowInternetAccess == nil || *b.AllowInternetAccess,
		AutoPause:     b.AutoPause != nil && *b.AutoPause,
		// A memory snapshot unless the client asks for the disk only.
		AutoPauseMemory: true,
	}
	if b.Timeout != nil {
		req.Timeout = time.Duration(*b.Timeout) * time.Second
	}
	if b.AutoResume != nil {
		if b.AutoResume.Enabled == nil {
			return req, badRequest("Field \"autoResume.enabled\" is required")
		}
		req.AutoResume = *b.AutoResume.Enabled
	}
	if b.AutoPauseMemory != nil {
		if !req.AutoPause {
			return req, badRequest("Field \"autoPauseMemory\" applies only with \"autoPause\": true")
		}
		if !*b.AutoPauseMemory && req.AutoResume {
			return req, badRequest("\"autoPauseMemory\": false cannot be combined with \"autoResume\": a filesystem-only snapshot is never resumed by traffic")
		}
		req.AutoPauseMemory = *b.AutoPauseMemory
	}
	if len(b.MCP) > 0 && string(b.MCP) != "null" && string(b.MCP) != "{}" {
		return req, badRequest("Field \"mcp\" is not supported yet: warren has no MCP gateway")
	}
	if b.Network != nil {
		allow, err := b.Network.allowInternet(req.AllowInternet)
		if err != nil {
			return req, err
		}
		req.AllowInternet = allow
	}
	return req, nil
}

// allowInternet applies the network settings warren can enforce today (all
// egress or none) and refuses, rather than silently drops, the rest.
func (n *sandboxNetwork) allowInternet(allow bool) (bool, error) {
	notYet := func(field, why string) error {
		return badRequest("Field \"network.%s\" is not supported yet: %s", field, why)
	}
	if n.AllowPublicTraffic != nil && !*n.AllowPublicTraffic {
		return false, notYet("allowPublicTraffic", "sandbox URLs are reachable with the envd access token only through the SDK; false (traffic access tokens) is not implemented")
	}
	if len(n.EgressProxy) > 0 && string(n.EgressProxy) != "null" {
		return false, notYet("egressProxy", "egress goes straight out of the host")
	}
	if n.MaskRequestHost != "" {
		return false, notYet("maskRequestHost", "the proxy forwards the Host header as sent")
	}
	if len(n.Rules) > 0 && string(n.Rules) != "null" && string(n.Rules) != "{}" {
		return false, notYet("rules", "egress requests are not transformed")
	}
	for _, d := range n.DenyOut {
		if strings.TrimSpace(d) != denyAll {
			return false, notYet("denyOut", "only "+strconv.Quote(denyAll)+" (no internet access) is enforced, not "+strconv.Quote(d))
		}
		allow = false
	}
	// Allowed destinations are exceptions to a deny; with everything
	// allowed they change nothing, with everything denied they need egress
	// rules warren does not have yet.
	if len(n.AllowOut) > 0 && !allow {
		return false, notYet("allowOut", "exceptions to denied internet access need per-destination egress rules")
	}
	return allow, nil
}

func (s *server) listSandboxesV1(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	md, err := parseMetadataFilter(r.URL.Query())
	if err != nil {
		return err
	}
	list, err := s.control.List(r.Context(), team, store.SandboxFilter{
		States: []store.SandboxState{store.StateRunning}, Metadata: md,
	})
	if err != nil {
		return err
	}
	out := make([]listedSandbox, 0, len(list))
	for _, sb := range list {
		out = append(out, listed(sb))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// listSandboxesV2 is Sandbox.list: filters, newest first by default, keyset
// paging through X-Next-Token.
func (s *server) listSandboxesV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	f := store.SandboxFilter{}
	var err error
	if f.Metadata, err = parseMetadataFilter(q); err != nil {
		return err
	}
	running := true
	if states := q["state"]; len(states) > 0 {
		running = false
		for _, list := range states {
			for _, st := range strings.Split(list, ",") {
				switch strings.TrimSpace(st) {
				case "running":
					running = true
					f.States = append(f.States, store.StateRunning)
				case "paused":
					f.States = append(f.States, store.StatePausing, store.StatePaused, store.StateResuming)
				default:
					return badRequest("Query parameter \"state\" has %q: want a comma-separated list of running, paused", st)
				}
			}
		}
	}
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		f.Ascending = true
	default:
		return badRequest("Query parameter \"order\" must be asc or desc, not %q", q.Get("order"))
	}
	if raw := q.Get("startedAfter"); raw != "" {
		if f.StartedAfter, err = time.Parse(time.RFC3339, raw); err != nil {
			return badRequest("Query parameter \"startedAfter\" must be an RFC 3339 time, not %q", raw)
		}
	}
	if ref := q.Get("template"); ref != "" {
		if f.TemplateID, err = s.templateFilter(r, team, ref); err != nil {
			return err
		}
	}
	limit, err := pageLimit(q)
	if err != nil {
		return err
	}
	c, err := decodeCursor(q.Get("nextToken"))
	if err != nil {
		return err
	}
	if running {
		// Counted before paging, over the same filters (REST.md §5).
		cf := f
		cf.States = []store.SandboxState{store.StateRunning}
		n, err := s.control.Count(r.Context(), team, cf)
		if err != nil {
			return err
		}
		w.Header().Set("X-Total-Running", strconv.Itoa(n))
	}
	if c != nil {
		f.After = &store.SandboxCursor{StartedAt: c.at, ID: c.id}
	}
	// One more than a page tells whether another page exists.
	f.Limit = limit + 1
	list, err := s.control.List(r.Context(), team, f)
	if err != nil {
		return err
	}
	if len(list) > limit {
		list = list[:limit]
		last := list[limit-1]
		w.Header().Set("X-Next-Token", encodeCursor(last.StartedAt, last.ID))
	}
	out := make([]listedSandbox, 0, len(list))
	for _, sb := range list {
		out = append(out, listed(sb))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *server) getSandbox(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	sb, err := s.control.Get(r.Context(), team, sandboxIDParam(r))
	if err != nil {
		return err
	}
	onTimeout := "kill"
	if sb.AutoPause {
		onTimeout = "pause"
	}
	writeJSON(w, http.StatusOK, sandboxDetail{
		listedSandbox: listed(sb), EnvdAccessToken: sb.EnvdAccessToken,
		AllowInternetAccess: sb.AllowInternet, Domain: s.domain(),
		Lifecycle: sandboxLifecycle{AutoResume: sb.AutoResume, OnTimeout: onTimeout},
	})
	return nil
}

func (s *server) killSandbox(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	if err := s.control.Kill(r.Context(), team, sandboxIDParam(r)); err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}

// setTimeout sets the deadline to now + timeout; it may shorten it, and a
// timeout ≤ 0 expires the sandbox at once (REST.md §6).
func (s *server) setTimeout(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Timeout *int32 `json:"timeout"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Timeout == nil {
		return badRequest("Field \"timeout\" is required")
	}
	if err := s.control.SetTimeout(r.Context(), team, sandboxIDParam(r), time.Duration(*body.Timeout)*time.Second); err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}

// Refresh bounds (SandboxRefreshRequest): at most an hour; absent or below
// the minimum extends by the minimum.
const (
	refreshMin = 15
	refreshMax = 3600
)

func (s *server) refresh(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Duration *int32 `json:"duration"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	d := int32(refreshMin)
	if body.Duration != nil {
		if *body.Duration < 0 || *body.Duration > refreshMax {
			return badRequest("Field \"duration\" must be from 0 to %d seconds, not %d", refreshMax, *body.Duration)
		}
		d = max(d, *body.Duration)
	}
	if err := s.control.Refresh(r.Context(), team, sandboxIDParam(r), time.Duration(d)*time.Second); err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}

// connectBody is ConnectSandbox (v1: timeout required) and ConnectSandboxV2
// (timeout optional). memory only matters when resuming a paused sandbox.
type connectBody struct {
	Timeout *int32 `json:"timeout"`
	Memory  *bool  `json:"memory"`
}

func (s *server) connectV1(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body connectBody
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	if body.Timeout == nil {
		return badRequest("Field \"timeout\" is required")
	}
	return s.connect(w, r, team, *body.Timeout)
}

func (s *server) connectV2(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body connectBody
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	timeout := int32(defaultTimeoutV2)
	if body.Timeout != nil {
		timeout = *body.Timeout
	}
	return s.connect(w, r, team, timeout)
}

// connect extends a running sandbox's deadline (never shortens it): 200, or
// 201 when it had to be resumed.
func (s *server) connect(w http.ResponseWriter, r *http.Request, team *store.Team, timeout int32) error {
	if timeout < 0 {
		return badRequest("Field \"timeout\" must be at least 0, not %d", timeout)
	}
	sb, resumed, err := s.control.Connect(r.Context(), team, sandboxIDParam(r), time.Duration(timeout)*time.Second)
	if err != nil {
		return err
	}
	status := http.StatusOK
	if resumed {
		status = http.StatusCreated
	}
	writeJSON(w, status, s.sandboxResponse(sb))
	return nil
}
