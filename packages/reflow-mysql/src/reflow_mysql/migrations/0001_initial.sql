-- 0001: the initial schema (storage contract 2.0).
--
-- Applied by ``MySQLStorage.initialize`` on one connection holding the named lock
-- ``GET_LOCK`` of this namespace (database + table prefix). MySQL commits every DDL
-- statement on its own, so a migration is not one transaction: each statement is
-- written to be re-run safely (IF NOT EXISTS) and the version is recorded last, so a
-- worker killed half-way leaves a namespace the next initialize() completes.
-- {p} is the table prefix (validated: lowercase letters, digits, underscores).
--
-- Identifiers (ids, names, keys, lease ids) are VARBINARY: compared byte for byte
-- (ASCII case, trailing spaces and every code point count; no PAD SPACE as in the
-- *_bin collations) and ordered by UTF-8 bytes, which is code-point order. The adapter
-- writes and reads them as UTF-8. 1020 bytes = 255 characters of up to 4 bytes (step
-- ids: 600 characters, schedule keys: 200). Every index stays under InnoDB's 3072-byte
-- key limit (DYNAMIC rows).
-- Values (the codec's JSON text) are LONGBLOB: stored and returned byte for byte, no
-- charset conversion, no JSON normalisation (MariaDB's JSON type is LONGTEXT with a
-- check; MySQL's reformats).

CREATE TABLE IF NOT EXISTS `{p}runs` (
    id               VARBINARY(1020) NOT NULL,
    workflow         VARBINARY(1020) NOT NULL,
    status           VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    input            LONGBLOB        NOT NULL,
    output           LONGBLOB        NULL,
    error            LONGBLOB        NULL,
    idempotency_key  VARBINARY(1020) NULL,
    lease_id         VARBINARY(1020) NULL,
    wake_at          BIGINT          NULL,
    waiting_for      VARBINARY(1020) NULL,
    heartbeat_at     BIGINT          NULL,
    attempt          INT             NOT NULL DEFAULT 0,
    created_at       BIGINT          NOT NULL,
    updated_at       BIGINT          NOT NULL,
    recoveries       INT             NOT NULL DEFAULT 0,
    claimed_at       BIGINT          NULL,
    lease_ms         BIGINT          NULL,
    lease_expires_at BIGINT          NULL,
    holder           LONGBLOB        NULL,
    PRIMARY KEY (id),
    -- One key, one run, per workflow (NULL keys do not collide).
    UNIQUE KEY runs_idempotency (workflow, idempotency_key),
    -- Claims: pending runs walked oldest first; expired leases and due wake-ups as
    -- range scans of the few rows that qualify. list_runs by status walks the first.
    KEY runs_status_created (status, created_at, id),
    KEY runs_lease_expiry (status, lease_expires_at),
    KEY runs_wake (status, wake_at),
    -- purge_runs: finished runs, oldest (updated_at, id) first.
    KEY runs_finished (status, updated_at, id),
    -- list_runs: newest first, keyset-paged, optionally by workflow.
    KEY runs_created (created_at, id),
    KEY runs_workflow_created (workflow, created_at, id),
    CONSTRAINT `{p}runs_status_check` CHECK (status IN (
        'pending', 'running', 'sleeping', 'waiting', 'completed', 'failed', 'cancelled'))
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC;

CREATE TABLE IF NOT EXISTS `{p}steps` (
    id         VARBINARY(2400) NOT NULL,
    run_id     VARBINARY(1020) NOT NULL,
    name       VARBINARY(1020) NOT NULL,
    status     VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    output     LONGBLOB        NULL,
    error      LONGBLOB        NULL,
    attempts   INT             NOT NULL DEFAULT 0,
    created_at BIGINT          NOT NULL,
    updated_at BIGINT          NOT NULL,
    wake_at    BIGINT          NULL,
    PRIMARY KEY (id),
    -- Row identity must not depend on the engine reusing ids.
    UNIQUE KEY steps_run_name (run_id, name),
    -- get_step_results by (created_at, id): InnoDB appends the primary key (id) to
    -- every secondary index, and (run_id, created_at, id) would pass the key limit.
    KEY steps_run_created (run_id, created_at),
    CONSTRAINT `{p}steps_run_fk` FOREIGN KEY (run_id) REFERENCES `{p}runs` (id) ON DELETE CASCADE,
    CONSTRAINT `{p}steps_status_check` CHECK (status IN (
        'running', 'completed', 'completed-early', 'skipped', 'sleeping', 'waiting',
        'failed'))
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC;

CREATE TABLE IF NOT EXISTS `{p}events` (
    seq          BIGINT          NOT NULL AUTO_INCREMENT,
    run_id       VARBINARY(1020) NOT NULL,
    name         VARBINARY(1020) NOT NULL,
    payload      LONGBLOB        NOT NULL,
    delivered_at BIGINT          NOT NULL,
    PRIMARY KEY (seq),
    -- take_event / consume_event: the oldest of one name for one run.
    KEY events_take (run_id, name, delivered_at, seq),
    CONSTRAINT `{p}events_run_fk` FOREIGN KEY (run_id) REFERENCES `{p}runs` (id) ON DELETE CASCADE
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC;

-- Keys already delivered to a run (deliver_event(..., key=...)): kept after the event
-- is consumed, so a retried delivery stores nothing.
CREATE TABLE IF NOT EXISTS `{p}event_keys` (
    run_id       VARBINARY(1020) NOT NULL,
    `key`        VARBINARY(1020) NOT NULL,
    delivered_at BIGINT          NOT NULL,
    PRIMARY KEY (run_id, `key`),
    CONSTRAINT `{p}event_keys_run_fk` FOREIGN KEY (run_id) REFERENCES `{p}runs` (id)
        ON DELETE CASCADE
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC;

CREATE TABLE IF NOT EXISTS `{p}schedules` (
    `key`       VARBINARY(800)  NOT NULL,
    workflow    VARBINARY(1020) NOT NULL,
    input       LONGBLOB        NOT NULL,
    recurrence  LONGBLOB        NOT NULL,
    next_run_at BIGINT          NOT NULL,
    created_at  BIGINT          NOT NULL,
    updated_at  BIGINT          NOT NULL,
    PRIMARY KEY (`key`),
    -- claim_due_schedule: earliest due first, ties by key.
    KEY schedules_due (next_run_at, `key`)
) ENGINE = InnoDB ROW_FORMAT = DYNAMIC;
