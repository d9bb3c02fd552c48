-- The first schema; the twin of sqlite/0001_init.sql.

-- +goose Up
CREATE TABLE teams (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    slug            text NOT NULL UNIQUE,
    max_sandboxes   integer NOT NULL,
    max_lifetime_ns bigint NOT NULL,
    created_at      timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    team_id      text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         text NOT NULL,
    hash         text NOT NULL UNIQUE,
    mask         text NOT NULL,
    created_at   timestamptz NOT NULL,
    last_used_at timestamptz
);
CREATE INDEX api_keys_team ON api_keys (team_id, created_at);

CREATE TABLE templates (
    id              text PRIMARY KEY,
    team_id         text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    public          boolean NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    last_spawned_at timestamptz,
    spawn_count     bigint NOT NULL DEFAULT 0
);
CREATE INDEX templates_team ON templates (team_id);

CREATE TABLE aliases (
    namespace   text NOT NULL, -- '' for global aliases
    alias       text NOT NULL,
    template_id text NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    PRIMARY KEY (namespace, alias)
);
CREATE INDEX aliases_template ON aliases (template_id);

CREATE TABLE builds (
    id           text PRIMARY KEY,
    template_id  text NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    status       text NOT NULL,
    cpu_count    integer NOT NULL,
    memory_mb    integer NOT NULL,
    disk_size_mb integer NOT NULL,
    envd_version text NOT NULL,
    artifact     text NOT NULL,
    reason       text NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    -- the target of tags' foreign key: a tag names a build of its own template
    UNIQUE (template_id, id)
);
CREATE INDEX builds_template_created ON builds (template_id, created_at);

CREATE TABLE tags (
    template_id text NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    tag         text NOT NULL,
    build_id    text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (template_id, tag),
    FOREIGN KEY (template_id, build_id) REFERENCES builds (template_id, id) ON DELETE CASCADE
);
CREATE INDEX tags_build ON tags (template_id, build_id);

-- No foreign key to templates or builds: a running sandbox outlives the
-- deletion of its template.
CREATE TABLE sandboxes (
    id                text PRIMARY KEY,
    team_id           text NOT NULL REFERENCES teams (id),
    template_id       text NOT NULL,
    build_id          text NOT NULL,
    alias             text NOT NULL,
    node_id           text NOT NULL,
    state             text NOT NULL,
    metadata          jsonb NOT NULL,
    env_vars          jsonb NOT NULL,
    cpu_count         integer NOT NULL,
    memory_mb         integer NOT NULL,
    disk_size_mb      integer NOT NULL,
    envd_version      text NOT NULL,
    envd_access_token text NOT NULL,
    allow_internet    boolean NOT NULL,
    auto_pause        boolean NOT NULL,
    auto_resume       boolean NOT NULL,
    started_at        timestamptz NOT NULL,
    end_at            timestamptz NOT NULL
);
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
