-- Pause, resume and snapshots; the twin of sqlite/0002_pause.sql.

-- +goose Up
ALTER TABLE sandboxes
    ADD COLUMN auto_pause_memory boolean NOT NULL DEFAULT true,
    ADD COLUMN timeout_ns        bigint NOT NULL DEFAULT 0,
    ADD COLUMN paused_key        text NOT NULL DEFAULT '',
    ADD COLUMN paused_memory     boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_bytes      bigint NOT NULL DEFAULT 0,
    ADD COLUMN paused_at         timestamptz;

ALTER TABLE templates ADD COLUMN source_sandbox_id text NOT NULL DEFAULT '';
CREATE INDEX templates_snapshots ON templates (team_id, source_sandbox_id) WHERE source_sandbox_id <> '';

-- +goose Down
DROP INDEX templates_snapshots;
ALTER TABLE templates DROP COLUMN source_sandbox_id;
ALTER TABLE sandboxes
    DROP COLUMN paused_at,
    DROP COLUMN paused_bytes,
    DROP COLUMN paused_memory,
    DROP COLUMN paused_key,
    DROP COLUMN timeout_ns,
    DROP COLUMN auto_pause_memory;
