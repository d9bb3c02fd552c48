package templatecli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/version"
)

// Client calls the template endpoints of warren's REST API (E2B's), with
// an API key, as the e2b SDK and CLI do.
type Client struct {
	// URL is the API's base URL (E2B_API_URL), e.g. http://localhost:3000;
	// a path prefix is kept.
	URL string
	// APIKey is sent as X-API-Key on every API call, never on uploads.
	APIKey string
	// HTTP does the requests; nil means a client without an overall
	// timeout (uploads may take long), whose calls the context bounds.
	HTTP *http.Client
}

// APIError is a non-2xx answer of the API: E2B's {"code","message"} body.
type APIError struct {
	Method, Path string
	Status       int
	Message      string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.Method, e.Path, e.Status, http.StatusText(e.Status), e.Message)
}

// BuildRequest is the body of POST /v3/templates.
type BuildRequest struct {
	Name     string   `json:"name"`
	Tags     []string `json:"tags,omitempty"`
	CPUCount int      `json:"cpuCount,omitempty"`
	MemoryMB int      `json:"memoryMB,omitempty"`
}

// BuildCreated is the answer of POST /v3/templates.
type BuildCreated struct {
	TemplateID string   `json:"templateID"`
	BuildID    string   `json:"buildID"`
	Names      []string `json:"names"`
	Tags       []string `json:"tags"`
}

// FileUpload is the answer of GET /templates/{id}/files/{hash}: either the
// files are present, or where to PUT them.
type FileUpload struct {
	Present bool              `json:"present"`
	URL     string            `json:"url,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
}

// LogEntry is one build log line (BuildLogEntry).
type LogEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step,omitempty"`
}

// BuildStatus is TemplateBuildInfo, one poll of a build.
type BuildStatus struct {
	TemplateID string     `json:"templateID"`
	BuildID    string     `json:"buildID"`
	Status     string     `json:"status"` // waiting, building, ready, error
	LogEntries []LogEntry `json:"logEntries"`
	Reason     *struct {
		Message string `json:"message"`
		Step    string `json:"step,omitempty"`
	} `json:"reason,omitempty"`
}

// Template is one entry of the template list.
type Template struct {
	TemplateID  string    `json:"templateID"`
	BuildID     string    `json:"buildID"`
	Names       []string  `json:"names"`
	Aliases     []string  `json:"aliases"`
	CPUCount    int       `json:"cpuCount"`
	MemoryMB    int       `json:"memoryMB"`
	Public      bool      `json:"public"`
	CreatedAt   time.Time `json:"createdAt"`
	BuildStatus string    `json:"buildStatus"`
}

// RequestBuild starts a build of a new or existing template by name.
func (c *Client) RequestBuild(ctx context.Context, req BuildRequest) (*BuildCreated, error) {
	var out BuildCreated
	if err := c.call(ctx, "POST", "/v3/templates", req, &out); err != nil {
		return nil, err
	}
	if out.TemplateID == "" || out.BuildID == "" {
		return nil, fmt.Errorf("POST /v3/templates: the answer has no templateID or buildID")
	}
	return &out, nil
}

// FileUploadLink asks whether the COPY files with hash are already on the
// server and, if not, where to upload them.
func (c *Client) FileUploadLink(ctx context.Context, templateID, hash string) (*FileUpload, error) {
	var out FileUpload
	p := "/templates/" + url.PathEscape(templateID) + "/files/" + url.PathEscape(hash)
	if err := c.call(ctx, "GET", p, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Upload PUTs the file at path to an upload link with its headers and an
// exact Content-Length, without the API key (the link authorizes itself).
func (c *Client) Upload(ctx context.Context, link *FileUpload, path string) error {
	target, err := c.resolve(link.URL)
	if err != nil {
		return fmt.Errorf("upload link %q: %w", link.URL, err)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, "PUT", target, f)
	if err != nil {
		return err
	}
	for k, v := range link.Headers {
		if !strings.EqualFold(k, "Content-Length") {
			req.Header.Set(k, v)
		}
	}
	req.ContentLength = info.Size()
	req.Header.Set("User-Agent", userAgent())
	res, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("upload files: %w", err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	if res.StatusCode/100 != 2 {
		return fmt.Errorf("upload files: PUT answered %s: %s", res.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// StartBuild sends the steps and starts the build created by RequestBuild.
func (c *Client) StartBuild(ctx context.Context, templateID, buildID string, spec *Spec) error {
	p := "/v2/templates/" + url.PathEscape(templateID) + "/builds/" + url.PathEscape(buildID)
	return c.call(ctx, "POST", p, spec, nil)
}

// BuildStatus polls a build: its status and the log entries after the
// first logsOffset.
func (c *Client) BuildStatus(ctx context.Context, templateID, buildID string, logsOffset int) (*BuildStatus, error) {
	p := fmt.Sprintf("/templates/%s/builds/%s/status?logsOffset=%d", url.PathEscape(templateID), url.PathEscape(buildID), logsOffset)
	var out BuildStatus
	if err := c.call(ctx, "GET", p, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListTemplates lists the templates of the key's team.
func (c *Client) ListTemplates(ctx context.Context) ([]Template, error) {
	var out []Template
	if err := c.call(ctx, "GET", "/templates", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteTemplate deletes a template (all its builds) by ID.
func (c *Client) DeleteTemplate(ctx context.Context, id string) error {
	return c.call(ctx, "DELETE", "/templates/"+url.PathEscape(id), nil, nil)
}

func (c *Client) httpClient() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

// resolve makes ref (an API path, or a URL the server returned) absolute
// against the base URL; a path keeps the base URL's prefix.
func (c *Client) resolve(ref string) (string, error) {
	base, err := url.Parse(c.URL)
	if err != nil || base.Scheme == "" || base.Host == "" {
		return "", fmt.Errorf("API URL %q is not an absolute http(s) URL such as http://localhost:3000", c.URL)
	}
	u, err := url.Parse(ref)
	if err != nil {
		return "", err
	}
	if u.IsAbs() {
		return u.String(), nil
	}
	if strings.HasPrefix(ref, "/") {
		return strings.TrimSuffix(base.String(), "/") + ref, nil
	}
	return base.ResolveReference(u).String(), nil
}

func userAgent() string { return "warren-cli/" + version.Version }

// call does one API request: body (if any) as JSON, out (if any) decoded
// from a 2xx answer, an *APIError for any other.
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	target, err := c.resolve(path)
	if err != nil {
		return err
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("X-API-Key", c.APIKey)
	req.Header.Set("User-Agent", userAgent())
	res, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if res.StatusCode/100 != 2 {
		e := &APIError{Method: method, Path: path, Status: res.StatusCode}
		var eb struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(b, &eb) == nil && eb.Message != "" {
			e.Message = eb.Message
		} else {
			e.Message = strings.TrimSpace(string(b))
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: answer is not the expected JSON: %w", method, path, err)
	}
	return nil
}
