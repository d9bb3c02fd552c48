package control

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/warren-sh/warren/internal/apikey"
	"github.com/warren-sh/warren/internal/store"
)

// DefaultTeamID is the team `warren up` creates on an empty store.
const DefaultTeamID = "default"

// TeamLimits are the limits of the default team.
type TeamLimits struct {
	MaxSandboxes int
	MaxLifetime  time.Duration
}

// Bootstrap makes sure the store has the default team and at least one API
// key. On an empty store it creates both and returns the new key's text (the
// only time it exists outside the caller); fixedKey, when set, is that key.
// Every call sets the default team's limits; later calls return "" for the key.
func Bootstrap(ctx context.Context, st store.Store, limits TeamLimits, fixedKey string) (team *store.Team, newKey string, err error) {
	if fixedKey != "" && !apikey.Valid(fixedKey) {
		return nil, "", fmt.Errorf("bootstrap API key %q is not of the form e2b_ + 40 lowercase hex characters", fixedKey)
	}
	team, err = st.GetTeam(ctx, DefaultTeamID)
	if errors.Is(err, store.ErrNotFound) {
		team = &store.Team{
			ID: DefaultTeamID, Name: "default", Slug: "default",
			MaxSandboxes: limits.MaxSandboxes, MaxLifetime: limits.MaxLifetime, CreatedAt: time.Now().UTC(),
		}
		err = st.CreateTeam(ctx, team)
	}
	if err != nil {
		return nil, "", fmt.Errorf("default team: %w", err)
	}
	if team.MaxSandboxes != limits.MaxSandboxes || team.MaxLifetime != limits.MaxLifetime {
		if err := st.UpdateTeamLimits(ctx, team.ID, limits.MaxSandboxes, limits.MaxLifetime); err != nil {
			return nil, "", err
		}
		team.MaxSandboxes, team.MaxLifetime = limits.MaxSandboxes, limits.MaxLifetime
	}
	keys, err := st.ListAPIKeys(ctx, team.ID)
	if err != nil {
		return nil, "", err
	}
	if len(keys) > 0 {
		return team, "", nil
	}
	raw := fixedKey
	if raw == "" {
		if raw, err = apikey.New(); err != nil {
			return nil, "", err
		}
	}
	key := &store.APIKey{
		ID: "bootstrap", TeamID: team.ID, Name: "bootstrap", Hash: apikey.Hash(raw), Mask: apikey.Mask(raw),
		CreatedAt: time.Now().UTC(),
	}
	if err := st.CreateAPIKey(ctx, key); err != nil {
		return nil, "", fmt.Errorf("bootstrap API key: %w", err)
	}
	return team, raw, nil
}

// BaseTemplateID is the ID of the base template; clients name it "base".
const BaseTemplateID = "w4rrenbasetemplate01"

// BaseBuild describes a build of a built-in template (base,
// code-interpreter-v1) made on this host.
type BaseBuild struct {
	// Key identifies the build's inputs (template.Artifact.BuildID); the same
	// key maps to the same build ID across restarts.
	Key         string
	Artifact    string // the artifact directory
	CPUCount    int
	MemoryMB    int
	DiskSizeMB  int
	EnvdVersion string
}

// CodeInterpreterTemplateID is the ID of warren's code-interpreter-v1
// template (internal/interpreter).
const CodeInterpreterTemplateID = "w4rrencodeinterpret1"

// EnsureBaseTemplate registers the base template (public, global alias
// "base", owned by the default team) and b as its latest successful build,
// which its tag "default" names: the build that stays when a collection of
// template storage retires the older ones (TemplateGC).
func EnsureBaseTemplate(ctx context.Context, st store.Store, b BaseBuild) error {
	return EnsureBuiltinTemplate(ctx, st, BaseTemplateID, "base", b)
}

// EnsureBuiltinTemplate registers a template warren builds itself (base,
// code-interpreter-v1) as EnsureBaseTemplate does base: public, owned by the
// default team, under the global alias, with b its latest successful build.
func EnsureBuiltinTemplate(ctx context.Context, st store.Store, templateID, alias string, b BaseBuild) error {
	now := time.Now().UTC()
	if _, err := st.GetTemplate(ctx, templateID); errors.Is(err, store.ErrNotFound) {
		err = st.CreateTemplate(ctx, &store.Template{
			ID: templateID, TeamID: DefaultTeamID, Public: true, CreatedAt: now, UpdatedAt: now,
		})
		if err != nil {
			return fmt.Errorf("create template %s: %w", alias, err)
		}
	} else if err != nil {
		return err
	}
	if err := st.SetAlias(ctx, &store.Alias{Namespace: "", Alias: alias, TemplateID: templateID}); err != nil {
		return fmt.Errorf("alias %s: %w", alias, err)
	}
	id := BuiltinBuildID(b.Key)
	existing, err := st.GetBuild(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		err = st.CreateBuild(ctx, &store.Build{
			ID: id, TemplateID: templateID, Status: store.BuildReady,
			CPUCount: b.CPUCount, MemoryMB: b.MemoryMB, DiskSizeMB: b.DiskSizeMB, EnvdVersion: b.EnvdVersion,
			Artifact: b.Artifact, CreatedAt: now, UpdatedAt: now, FinishedAt: &now,
		})
	case err != nil:
	case existing.Artifact != b.Artifact || existing.Status != store.BuildReady:
		existing.Artifact, existing.Status, existing.UpdatedAt = b.Artifact, store.BuildReady, now
		err = st.UpdateBuild(ctx, existing)
	}
	if err != nil {
		return fmt.Errorf("record %s build %s: %w", alias, id, err)
	}
	if err := st.SetTag(ctx, &store.Tag{TemplateID: templateID, Tag: defaultTag, BuildID: id, CreatedAt: now}); err != nil {
		return fmt.Errorf("tag %s build %s: %w", alias, id, err)
	}
	return nil
}

// BuiltinBuildID derives the stable, UUID-shaped ID of a built-in template's
// build from its key (BaseBuild.Key).
func BuiltinBuildID(key string) string {
	sum := sha256.Sum256([]byte("warren-build:" + key))
	sum[6] = sum[6]&0x0f | 0x50 // version 5 layout (name-based)
	sum[8] = sum[8]&0x3f | 0x80
	h := hex.EncodeToString(sum[:16])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
