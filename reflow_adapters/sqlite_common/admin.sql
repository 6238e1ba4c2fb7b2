-- Schema administration without migrating (reflow_core.migrations.MigratableStorage):
-- reading the version through a read-only connection, and the script a DBA can apply
-- by hand (`reflow db sql`). Script blocks are templates: `{version}` and `{name}` come
-- from the numbered migration files shipped with the adapter, never from user input.
-- applied_at is epoch milliseconds through julianday(), because unixepoch() needs
-- SQLite 3.38 and Reflow supports 3.35.

-- name: version_table_exists
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reflow_schema_version'

-- name: current_version
SELECT coalesce(max(version), 0) FROM reflow_schema_version

-- name: script_begin
BEGIN IMMEDIATE;

-- name: script_record_version
INSERT INTO reflow_schema_version (version, name, applied_at)
VALUES ({version}, '{name}', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));

-- name: script_commit
COMMIT;
