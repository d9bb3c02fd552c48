-- Pause, resume and snapshots: what a paused sandbox's node saved, the
-- lifecycle settings auto-pause and auto-resume need, and which templates are
-- snapshots of a sandbox.

-- +goose Up
-- auto_pause_memory: an auto-pause (at end_at) saves memory too, not only
-- the disk. timeout_ns: the create-time timeout, which an auto-resume grants
-- again. paused_*: what the node's Pause returned (paused_key '' = nothing
-- saved), set while the sandbox is paused or resuming.
ALTER TABLE sandboxes ADD COLUMN auto_pause_memory INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN timeout_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN paused_key TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN paused_memory INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN paused_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN paused_at TEXT;

-- A snapshot is a template taken from a sandbox ('' for built templates).
ALTER TABLE templates ADD COLUMN source_sandbox_id TEXT NOT NULL DEFAULT '';
-- GET /snapshots: a team's snapshots, optionally of one sandbox.
CREATE INDEX templates_snapshots ON templates (team_id, source_sandbox_id) WHERE source_sandbox_id <> '';

-- +goose Down
DROP INDEX templates_snapshots;
ALTER TABLE templates DROP COLUMN source_sandbox_id;
ALTER TABLE sandboxes DROP COLUMN paused_at;
ALTER TABLE sandboxes DROP COLUMN paused_bytes;
ALTER TABLE sandboxes DROP COLUMN paused_memory;
ALTER TABLE sandboxes DROP COLUMN paused_key;
ALTER TABLE sandboxes DROP COLUMN timeout_ns;
ALTER TABLE sandboxes DROP COLUMN auto_pause_memory;
