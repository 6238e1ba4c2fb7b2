-- 0001: the initial schema.
--
-- Runs from ``PostgresStorage.initialize`` inside one transaction that holds a
-- transaction-level advisory lock keyed on the schema name, with ``search_path`` set to
-- the adapter's schema, so table names are unqualified here. Value columns are ``json``,
-- not ``jsonb``: ``json`` keeps the codec's exact text (jsonb would reformat 1e300 into a
-- 301-digit integer and reject \u0000), and is still queryable with -> and ->>.
-- Ids and schedule keys use the "C" collation: the contract orders ties by code point,
-- which a locale collation such as en_US would not.

CREATE TABLE runs (
    id              text    COLLATE "C" PRIMARY KEY,
    workflow        text    NOT NULL,
    status          text    NOT NULL CHECK (status IN (
                        'pending', 'running', 'sleeping', 'waiting',
                        'completed', 'failed', 'cancelled')),
    input           json    NOT NULL,
    output          json,
    error           json,
    idempotency_key text,
    lease_id        text,
    wake_at         bigint,
    waiting_for     text,
    heartbeat_at    bigint,
    attempt         integer NOT NULL DEFAULT 0,
    created_at      bigint  NOT NULL,
    updated_at      bigint  NOT NULL
);

-- One key, one run, per workflow.
CREATE UNIQUE INDEX runs_idempotency_key_idx
    ON runs (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- claim_next_run walks claimable rows oldest first; finished runs (the bulk of a
-- long-lived table) are not in this index at all.
CREATE INDEX runs_claim_idx
    ON runs (created_at, id) WHERE status IN ('pending', 'running', 'sleeping', 'waiting');

-- list_runs: newest first, keyset-paged, optionally by status or workflow.
CREATE INDEX runs_list_idx ON runs (created_at DESC, id DESC);
CREATE INDEX runs_status_list_idx ON runs (status, created_at DESC, id DESC);
CREATE INDEX runs_workflow_list_idx ON runs (workflow, created_at DESC, id DESC);

CREATE TABLE steps (
    id         text    COLLATE "C" PRIMARY KEY,
    run_id     text    COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name       text    NOT NULL,
    status     text    NOT NULL CHECK (status IN (
                   'running', 'completed', 'completed-early', 'skipped',
                   'sleeping', 'waiting', 'failed')),
    output     json,
    error      json,
    attempts   integer NOT NULL DEFAULT 0,
    created_at bigint  NOT NULL,
    updated_at bigint  NOT NULL,
    wake_at    bigint,
    -- Row identity must not depend on the engine reusing ids.
    CONSTRAINT steps_run_id_name_key UNIQUE (run_id, name)
);

CREATE TABLE events (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       text   COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name         text   NOT NULL,
    payload      json   NOT NULL,
    delivered_at bigint NOT NULL
);

-- take_event (oldest of one name for one run) and the "event buffered?" checks.
CREATE INDEX events_take_idx ON events (run_id, name, delivered_at, seq);

CREATE TABLE schedules (
    key         text   COLLATE "C" PRIMARY KEY,
    workflow    text   NOT NULL,
    input       json   NOT NULL,
    recurrence  json   NOT NULL,
    next_run_at bigint NOT NULL,
    created_at  bigint NOT NULL,
    updated_at  bigint NOT NULL
);

-- claim_due_schedule: earliest due first, ties by key.
CREATE INDEX schedules_due_idx ON schedules (next_run_at, key);
