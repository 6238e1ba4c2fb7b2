-- Schema administration without migrating (reflow_core.migrations.MigratableStorage).
-- The status queries read catalogs only and never name a relation that may be missing,
-- so they work (and create nothing) whether or not the schema exists. Script blocks are
-- templates for `reflow db sql`: `{schema}` is the adapter's validated schema name,
-- quoted; `{version}` and `{name}` come from the numbered migration files.

-- name: schema_state
SELECT
    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s) AS schema_found,
    to_regclass(quote_ident(%(schema)s) || '.schema_version') IS NOT NULL AS table_found;

-- name: current_version
SELECT coalesce(max(version), 0) AS version FROM {schema}.schema_version;

-- name: script_begin
BEGIN;
CREATE SCHEMA IF NOT EXISTS {schema};
SET LOCAL search_path TO {schema};

-- name: script_record_version
INSERT INTO schema_version (version, name) VALUES ({version}, '{name}');

-- name: script_commit
COMMIT;
