package api

import (
	"cmp"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/warren-sh/warren/internal/control"
	"github.com/warren-sh/warren/internal/store"
)

// pauseSandbox is SandboxApi.pause: 204 once the sandbox is saved and
// stopped. The SDK reads 409 as "already paused" (pause() → false).
func (s *server) pauseSandbox(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Memory *bool `json:"memory"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	memory := body.Memory == nil || *body.Memory
	if err := s.control.Pause(r.Context(), team, sandboxIDParam(r), memory); err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}

// resumeSandbox is the deprecated POST /resume (ResumedSandbox): 201 with the
// sandbox, 409 when it already runs. autoPause and memory in the body are not
// read: the sandbox keeps the lifecycle it was created with.
func (s *server) resumeSandbox(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Timeout *int32 `json:"timeout"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	timeout := int32(defaultTimeoutV1)
	if body.Timeout != nil {
		timeout = *body.Timeout
	}
	if timeout < 0 {
		return badRequest("Field \"timeout\" must be at least 0, not %d", timeout)
	}
	sb, err := s.control.Resume(r.Context(), team, sandboxIDParam(r), time.Duration(timeout)*time.Second)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, s.sandboxResponse(sb))
	return nil
}

// forkTimeoutDefault is SandboxForkRequest's default lifetime of a fork (the
// SDK always sends one: 300 unless the user sets another).
const forkTimeoutDefault = 15

// forkResult is SandboxForkResult: exactly one of sandbox and error.
type forkResult struct {
	Sandbox *sandboxResponse `json:"sandbox,omitempty"`
	Error   *errorBody       `json:"error,omitempty"`
}

// forkSandbox is Sandbox.fork: 201 with one result per fork, each the new
// sandbox or the error that kept it from starting. Errors before any fork
// was tried (unknown sandbox, bad count) are the usual error answers.
func (s *server) forkSandbox(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Timeout *int32 `json:"timeout"`
		Count   *int32 `json:"count"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	timeout, count := int32(forkTimeoutDefault), int32(1)
	if body.Timeout != nil {
		timeout = *body.Timeout
	}
	if body.Count != nil {
		count = *body.Count
	}
	results, err := s.control.Fork(r.Context(), team, sandboxIDParam(r), time.Duration(timeout)*time.Second, int(count))
	if err != nil {
		return err
	}
	out := make([]forkResult, len(results))
	for i, res := range results {
		if res.Err != nil {
			body, _ := s.failureBody(r, res.Err)
			out[i].Error = &body
			continue
		}
		sb := s.sandboxResponse(res.Sandbox)
		out[i].Sandbox = &sb
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// snapshotInfo is the SnapshotInfo schema.
type snapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

func snapshotResponse(sn *control.Snapshot) snapshotInfo {
	return snapshotInfo{SnapshotID: sn.ID, Names: sn.Names}
}

// createSnapshot is sandbox.createSnapshot: 201 with the snapshot's ID and
// names, which work as templateID in create.
func (s *server) createSnapshot(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	var body struct {
		Name *string `json:"name"`
	}
	if err := decodeBody(r, &body); err != nil {
		return err
	}
	name := ""
	if body.Name != nil {
		name = *body.Name
	}
	sn, err := s.control.CreateSnapshot(r.Context(), team, sandboxIDParam(r), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, snapshotResponse(sn))
	return nil
}

// listSnapshots is Sandbox.listSnapshots: the team's snapshots, oldest
// first, filtered by source sandbox and by name, paged by X-Next-Token.
func (s *server) listSnapshots(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	q := r.URL.Query()
	limit, err := pageLimit(q)
	if err != nil {
		return err
	}
	c, err := decodeCursor(q.Get("nextToken"))
	if err != nil {
		return err
	}
	sandboxID, _, _ := strings.Cut(q.Get("sandboxID"), "-")
	list, err := s.control.ListSnapshots(r.Context(), team, sandboxID, q.Get("name"))
	if err != nil {
		return err
	}
	if c != nil {
		list = slices.DeleteFunc(list, func(sn *control.Snapshot) bool {
			return cmp.Or(sn.Template.CreatedAt.Compare(c.at), strings.Compare(sn.Template.ID, c.id)) <= 0
		})
	}
	if len(list) > limit {
		list = list[:limit]
		last := list[limit-1].Template
		w.Header().Set("X-Next-Token", encodeCursor(last.CreatedAt, last.ID))
	}
	out := make([]snapshotInfo, 0, len(list))
	for _, sn := range list {
		out = append(out, snapshotResponse(sn))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// deleteTemplate deletes a template or snapshot of the team (by ID or name,
// a tag ignored): 204; 404 for unknown and other teams' ones (deleteSnapshot
// → false); 409 while sandboxes run or are paused on it.
func (s *server) deleteTemplate(w http.ResponseWriter, r *http.Request, team *store.Team) error {
	t, err := s.ownTemplate(r.Context(), team, r.PathValue("templateID"))
	if err != nil {
		return err
	}
	if tpl, terr := s.templates(); terr == nil && t.SourceSandboxID == "" {
		// A built template: its artifacts, build logs and running builds
		// are the build runner's.
		err = tpl.DeleteTemplate(r.Context(), team, t.ID)
	} else {
		err = s.control.DeleteTemplate(r.Context(), team, t)
	}
	if err != nil {
		return err
	}
	writeEmpty(w, http.StatusNoContent)
	return nil
}
