-- The current schema, applied as a whole to a new database. It must equal every file
-- in migrations/ applied in order (tests/adapters/test_sqlite_migrations.py proves it):
-- when adding migrations/NNNN_*.sql, change this file to match. Columns added by
-- ALTER TABLE ... ADD COLUMN come last in their table (SQLite appends them), written as
-- in the migration.

CREATE TABLE reflow_runs (
    id              TEXT PRIMARY KEY NOT NULL,
    workflow        TEXT NOT NULL,
    input           TEXT NOT NULL,
    status          TEXT NOT NULL,
    idempotency_key TEXT,
    output          TEXT,
    error           TEXT,
    lease_id        TEXT,
    wake_at         INTEGER,
    waiting_for     TEXT,
    heartbeat_at    INTEGER,
    attempt         INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    recoveries      INTEGER NOT NULL DEFAULT 0,
    claimed_at      INTEGER,
    lease_ms        INTEGER,
    lease_expires_at INTEGER,
    holder          TEXT
);

CREATE UNIQUE INDEX reflow_runs_idempotency
    ON reflow_runs (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX reflow_runs_newest ON reflow_runs (created_at, id);
CREATE INDEX reflow_runs_status ON reflow_runs (status, created_at, id);
CREATE INDEX reflow_runs_workflow ON reflow_runs (workflow, created_at, id);
CREATE INDEX reflow_runs_claim ON reflow_runs (workflow, status, created_at, id);
CREATE INDEX reflow_runs_wake ON reflow_runs (workflow, wake_at)
    WHERE wake_at IS NOT NULL;
CREATE INDEX reflow_runs_lease ON reflow_runs (workflow, lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
CREATE INDEX reflow_runs_completed ON reflow_runs (updated_at, id)
    WHERE status = 'completed';
CREATE INDEX reflow_runs_failed ON reflow_runs (updated_at, id)
    WHERE status = 'failed';
CREATE INDEX reflow_runs_cancelled ON reflow_runs (updated_at, id)
    WHERE status = 'cancelled';

CREATE TABLE reflow_steps (
    id         TEXT PRIMARY KEY NOT NULL,
    run_id     TEXT NOT NULL REFERENCES reflow_runs (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL,
    output     TEXT,
    error      TEXT,
    attempts   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    wake_at    INTEGER,
    UNIQUE (run_id, name)
);

CREATE TABLE reflow_events (
    seq          INTEGER PRIMARY KEY,
    run_id       TEXT NOT NULL REFERENCES reflow_runs (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    delivered_at INTEGER NOT NULL
);

CREATE INDEX reflow_events_take ON reflow_events (run_id, name, delivered_at, seq);

CREATE TABLE reflow_event_keys (
    run_id TEXT NOT NULL REFERENCES reflow_runs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;

CREATE TABLE reflow_schedules (
    key         TEXT PRIMARY KEY NOT NULL,
    workflow    TEXT NOT NULL,
    input       TEXT NOT NULL,
    recurrence  TEXT NOT NULL,
    next_run_at INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE INDEX reflow_schedules_due ON reflow_schedules (next_run_at, key);

CREATE TABLE reflow_work_signal (
    id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO reflow_work_signal (id, seq) VALUES (1, 0);
