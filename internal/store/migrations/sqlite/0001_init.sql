-- The first schema. Times are TEXT in one fixed-width UTC form
-- (2006-01-02T15:04:05.000000Z) so they sort and compare as text; maps are
-- JSON objects; booleans are 0/1.

-- +goose Up
CREATE TABLE teams (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    slug            TEXT NOT NULL UNIQUE,
    max_sandboxes   INTEGER NOT NULL,
    max_lifetime_ns INTEGER NOT NULL,
    created_at      TEXT NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    team_id      TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    mask         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT
) STRICT;
CREATE INDEX api_keys_team ON api_keys (team_id, created_at);

CREATE TABLE templates (
    id              TEXT PRIMARY KEY,
    team_id         TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    public          INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_spawned_at TEXT,
    spawn_count     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX templates_team ON templates (team_id);

CREATE TABLE aliases (
    namespace   TEXT NOT NULL, -- '' for global aliases
    alias       TEXT NOT NULL,
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    PRIMARY KEY (namespace, alias)
) STRICT;
CREATE INDEX aliases_template ON aliases (template_id);

CREATE TABLE builds (
    id           TEXT PRIMARY KEY,
    template_id  TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    status       TEXT NOT NULL,
    cpu_count    INTEGER NOT NULL,
    memory_mb    INTEGER NOT NULL,
    disk_size_mb INTEGER NOT NULL,
    envd_version TEXT NOT NULL,
    artifact     TEXT NOT NULL,
    reason       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    finished_at  TEXT,
    -- the target of tags' foreign key: a tag names a build of its own template
    UNIQUE (template_id, id)
) STRICT;
CREATE INDEX builds_template_created ON builds (template_id, created_at);

CREATE TABLE tags (
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    tag         TEXT NOT NULL,
    build_id    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (template_id, tag),
    FOREIGN KEY (template_id, build_id) REFERENCES builds (template_id, id) ON DELETE CASCADE
) STRICT;
CREATE INDEX tags_build ON tags (template_id, build_id);

-- No foreign key to templates or builds: a running sandbox outlives the
-- deletion of its template.
CREATE TABLE sandboxes (
    id                TEXT PRIMARY KEY,
    team_id           TEXT NOT NULL REFERENCES teams (id),
    template_id       TEXT NOT NULL,
    build_id          TEXT NOT NULL,
    alias             TEXT NOT NULL,
    node_id           TEXT NOT NULL,
    state             TEXT NOT NULL,
    -- SQLite's binary JSON: the listing's metadata filter reads it without
    -- parsing text, which halves its cost (read it with json(metadata)).
    metadata          BLOB NOT NULL CHECK (json_type(metadata) = 'object'),
    env_vars          TEXT NOT NULL CHECK (json_type(env_vars) = 'object'),
    cpu_count         INTEGER NOT NULL,
    memory_mb         INTEGER NOT NULL,
    disk_size_mb      INTEGER NOT NULL,
    envd_version      TEXT NOT NULL,
    envd_access_token TEXT NOT NULL,
    allow_internet    INTEGER NOT NULL,
    auto_pause        INTEGER NOT NULL,
    auto_resume       INTEGER NOT NULL,
    started_at        TEXT NOT NULL,
    end_at            TEXT NOT NULL
) STRICT;
-- GET /v2/sandboxes: a team's sandboxes in some states, by start time.
CREATE INDEX sandboxes_team_state_started ON sandboxes (team_id, state, started_at, id);
-- the evictor: sandboxes whose end has come
CREATE INDEX sandboxes_end ON sandboxes (end_at);
-- reconcile: a node's sandboxes
CREATE INDEX sandboxes_node ON sandboxes (node_id);

-- +goose Down
DROP TABLE sandboxes;
DROP TABLE tags;
DROP TABLE builds;
DROP TABLE aliases;
DROP TABLE templates;
DROP TABLE api_keys;
DROP TABLE teams;
