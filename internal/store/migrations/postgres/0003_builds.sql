-- Template builds keep what was asked of them (spec, JSON) and the step a
-- failed build failed in; the twin of sqlite/0003_builds.sql.

-- +goose Up
ALTER TABLE builds ADD COLUMN reason_step text NOT NULL DEFAULT '';
ALTER TABLE builds ADD COLUMN spec text NOT NULL DEFAULT '';
-- the restart check: builds left waiting or building
CREATE INDEX builds_status ON builds (status);

-- +goose Down
DROP INDEX builds_status;
ALTER TABLE builds DROP COLUMN spec;
ALTER TABLE builds DROP COLUMN reason_step;
