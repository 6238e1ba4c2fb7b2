-- Every query MySQLStorage runs, one named block each (loaded by sql.py).
--
-- Tables (migrations/0001_initial.sql) carry the namespace's table prefix, written {p}
-- here and substituted once at load (the prefix is validated: [a-z0-9_]).
--
-- {now} is the store's clock, in epoch milliseconds:
--     COALESCE(%(now)s, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) DIV 1000)
-- UTC_TIMESTAMP is the SERVER's clock, read once per statement (MySQL and MariaDB fix
-- it at statement start), so every column a statement stamps gets one value, and no
-- session time zone or DST fold enters into it. %(now)s is NULL in production; a test
-- clock (MySQLStorage(clock=...)) sends its value instead, so tests move time by hand.
--
-- Connections run READ COMMITTED: each statement reads the newest committed rows, so a
-- statement after a locking read (FOR UPDATE) sees what the lock holder committed.
-- Rows affected are rows MATCHED (CLIENT_FOUND_ROWS): a heartbeat that stamps the same
-- millisecond twice still answers True.
-- Caution: MySQL evaluates SET assignments left to right, each seeing the columns
-- already assigned; a column read by a later assignment is assigned after it.

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS `{p}schema_version` (
    version    INT          NOT NULL PRIMARY KEY,
    name       VARCHAR(200) NOT NULL,
    applied_at BIGINT       NOT NULL
) ENGINE = InnoDB;

-- name: applied_versions
SELECT version FROM `{p}schema_version` ORDER BY version;

-- name: record_version
INSERT INTO `{p}schema_version` (version, name, applied_at)
VALUES (%(version)s, %(name)s, {now});

-- name: migration_lock
-- A named lock per namespace, so workers that start together queue up: the first
-- creates everything, the others find every version recorded. Waits up to 60 s.
SELECT GET_LOCK(%(lock)s, 60) AS got;

-- name: migration_unlock
SELECT RELEASE_LOCK(%(lock)s) AS released;

-- name: existing_tables
SELECT table_name AS name FROM information_schema.tables
WHERE table_schema = DATABASE() AND table_name IN %(names)s;

-- name: now
SELECT {now} AS now;

-- name: signal_work
-- Inside the transaction that made a run claimable (or right after its one statement
-- committed): listeners never see a signal before the change it announces.
INSERT INTO `{p}work_signals` () VALUES ();

-- name: newest_work_signal
SELECT MAX(seq) AS seq FROM `{p}work_signals`;

-- name: trim_work_signals
DELETE FROM `{p}work_signals` WHERE seq < %(below)s;

-- name: insert_run
INSERT INTO `{p}runs` (id, workflow, status, input, output, error, idempotency_key,
                       wake_at, waiting_for, heartbeat_at, attempt, created_at,
                       updated_at, recoveries, claimed_at, lease_ms, lease_expires_at,
                       holder)
VALUES (%(id)s, %(workflow)s, %(status)s, %(input)s, %(output)s, %(error)s,
        %(idempotency_key)s, %(wake_at)s, %(waiting_for)s, %(heartbeat_at)s,
        %(attempt)s, %(created_at)s, %(updated_at)s, %(recoveries)s, %(claimed_at)s,
        %(lease_ms)s, %(lease_expires_at)s, %(holder)s);

-- name: get_run_by_idempotency_key
SELECT * FROM `{p}runs` WHERE workflow = %(workflow)s AND idempotency_key = %(idempotency_key)s;

-- name: get_run
SELECT * FROM `{p}runs` WHERE id = %(id)s;

-- name: list_runs
SELECT * FROM `{p}runs`
WHERE (%(status)s IS NULL OR status = %(status)s)
  AND (%(workflow)s IS NULL OR workflow = %(workflow)s)
  AND (%(before)s IS NULL
       OR (%(before_id)s IS NULL AND created_at < %(before)s)
       OR created_at < %(before)s
       OR (created_at = %(before)s AND id < %(before_id)s))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: claim_candidates
-- claim_next_run / claim_runs, step 1 of each round: the oldest claimable runs by
-- (created_at, id), read WITHOUT locks (READ COMMITTED: the newest committed rows), one
-- branch per kind of claimable run, each through its own index: pending runs walked
-- oldest first; expired leases and due wake-ups as range scans of the few rows that
-- qualify. Staleness is the stored lease_expires_at (from the holder's own lease_ms)
-- against the server's clock: neither the claimer's clock nor its lease setting enters.
-- Locking here instead (FOR UPDATE SKIP LOCKED) would lock every row a sort reads, and
-- other claimers would then skip runs this one never takes. %(now)s is the
-- transaction's one "now", read first with the `now` query.
(SELECT id, created_at FROM `{p}runs`
 WHERE status = 'pending' AND workflow IN %(names)s
 ORDER BY created_at, id LIMIT %(k)s)
UNION ALL
(SELECT id, created_at FROM `{p}runs`
 WHERE status = 'running' AND lease_expires_at <= %(now)s AND workflow IN %(names)s
 ORDER BY created_at, id LIMIT %(k)s)
UNION ALL
(SELECT id, created_at FROM `{p}runs`
 WHERE status IN ('sleeping', 'waiting') AND wake_at <= %(now)s AND workflow IN %(names)s
 ORDER BY created_at, id LIMIT %(k)s)
ORDER BY created_at, id
LIMIT %(k)s;

-- name: lock_claimable
-- Step 2, per candidate in order: lock it if it is still claimable, skipping it if
-- another transaction holds it (workers never queue behind each other). The locking
-- read re-checks the conditions on the row's newest committed version.
SELECT id FROM `{p}runs`
WHERE id = %(id)s AND workflow IN %(names)s
  AND (status = 'pending'
       OR (status = 'running' AND lease_expires_at <= %(now)s)
       OR (status IN ('sleeping', 'waiting') AND wake_at <= %(now)s))
FOR UPDATE SKIP LOCKED;

-- name: claim_run
-- recoveries reads the old status, so it is assigned before status.
UPDATE `{p}runs`
SET recoveries = recoveries + (status = 'running'),
    status = 'running', lease_id = %(lease_id)s,
    claimed_at = %(now)s, heartbeat_at = %(now)s,
    lease_ms = %(lease_ms)s, lease_expires_at = %(now)s + %(lease_ms)s,
    holder = %(holder)s,
    attempt = attempt + 1, wake_at = NULL, waiting_for = NULL, updated_at = %(now)s
WHERE id = %(id)s;

-- name: purge_runs
-- One statement: the status check and the deletion of each run are one atomic step;
-- steps, events and event keys go with it (ON DELETE CASCADE). Oldest first.
DELETE FROM `{p}runs`
WHERE status IN %(statuses)s AND updated_at < %(finished_before)s
ORDER BY updated_at, id
LIMIT %(limit)s;

-- name: heartbeat_run
-- Renews by the length stored at claim, on the server's clock.
UPDATE `{p}runs`
SET heartbeat_at = {now}, lease_expires_at = {now} + lease_ms
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: sleep_run
UPDATE `{p}runs`
SET status = 'sleeping', wake_at = %(wake_at)s, updated_at = {now},
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: lock_held_run
-- wait_run's and consume_event's first statement. Locking the row first serialises
-- them with deliver_event (which locks it too), with each other and with a reclaim
-- (claims skip locked rows); under READ COMMITTED the next statement then sees any
-- event delivered or consumed before: no lost wake-up, no event consumed twice.
SELECT id FROM `{p}runs`
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s
FOR UPDATE;

-- name: event_buffered
SELECT EXISTS (SELECT 1 FROM `{p}events` WHERE run_id = %(id)s AND name = %(event_name)s)
    AS found;

-- name: wait_run
-- After lock_held_run (the row is locked and held): %(found)s says whether an event
-- of that name is buffered, in which case the run goes straight back to pending.
UPDATE `{p}runs`
SET status = IF(%(found)s, 'pending', 'waiting'),
    waiting_for = IF(%(found)s, NULL, %(event_name)s),
    wake_at = IF(%(found)s, NULL, %(wake_at)s),
    updated_at = {now},
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
WHERE id = %(id)s;

-- name: update_run_status
-- No lease check: the lease fields go whatever the new status (the run has no holder).
-- Set to 'running' this way, a run has no holder who could renew it, so its lease ends
-- now: the next claim takes it over.
UPDATE `{p}runs`
SET status = %(status)s, wake_at = NULL, waiting_for = NULL, updated_at = {now},
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, holder = NULL,
    lease_expires_at = IF(%(status)s = 'running', {now}, NULL)
WHERE id = %(id)s;

-- name: update_run_status_expected
-- The same, only from one of the expected statuses: check and write are one statement.
UPDATE `{p}runs`
SET status = %(status)s, wake_at = NULL, waiting_for = NULL, updated_at = {now},
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, holder = NULL,
    lease_expires_at = IF(%(status)s = 'running', {now}, NULL)
WHERE id = %(id)s AND status IN %(expected)s;

-- name: update_claimed_run_status
-- The lease fields are kept only when the run stays 'running' (the condition reads the
-- parameter, never the column being assigned).
UPDATE `{p}runs`
SET output = %(output)s, error = %(error)s, updated_at = {now},
    lease_id = IF(%(status)s = 'running', lease_id, NULL),
    claimed_at = IF(%(status)s = 'running', claimed_at, NULL),
    lease_ms = IF(%(status)s = 'running', lease_ms, NULL),
    lease_expires_at = IF(%(status)s = 'running', lease_expires_at, NULL),
    holder = IF(%(status)s = 'running', holder, NULL),
    status = %(status)s
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: requeue_run
-- An operator's resume: a fresh count of recoveries.
UPDATE `{p}runs`
SET status = 'pending', output = NULL, error = NULL, wake_at = NULL, waiting_for = NULL,
    recoveries = 0, updated_at = {now},
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
WHERE id = %(id)s AND status IN ('failed', 'cancelled');

-- name: delete_failed_steps
DELETE FROM `{p}steps` WHERE run_id = %(id)s AND status = 'failed';

-- name: share_held_run
-- save_step_result with a lease: a shared lock on the held run until commit, so no
-- claim (which locks it exclusively) can take the lease between check and write.
SELECT id FROM `{p}runs`
WHERE id = %(run_id)s AND status = 'running' AND lease_id = %(lease_id)s
LOCK IN SHARE MODE;

-- name: lock_step
-- The step row as stored (locked until commit), to enforce write-once and row identity.
SELECT run_id, name, status FROM `{p}steps` WHERE id = %(id)s FOR UPDATE;

-- name: insert_step
INSERT INTO `{p}steps` (id, run_id, name, status, output, error, attempts, created_at,
                        updated_at, wake_at)
VALUES (%(id)s, %(run_id)s, %(name)s, %(status)s, %(output)s, %(error)s, %(attempts)s,
        %(created_at)s, %(updated_at)s, %(wake_at)s);

-- name: insert_step_if_held
-- save_step_result's one-statement path for a new row: the locking read (LOCK IN SHARE
-- MODE) makes InnoDB read the run's newest committed version and hold a shared lock on
-- it until the insert commits, so check and write are one (a plain INSERT ... SELECT
-- under READ COMMITTED would read a snapshot without locking). Not held: no row. An
-- existing row: a duplicate-key error, and the adapter takes the transactional path.
INSERT INTO `{p}steps` (id, run_id, name, status, output, error, attempts, created_at,
                        updated_at, wake_at)
SELECT %(id)s, %(run_id)s, %(name)s, %(status)s, %(output)s, %(error)s, %(attempts)s,
       %(created_at)s, %(updated_at)s, %(wake_at)s
FROM `{p}runs`
WHERE id = %(run_id)s AND status = 'running' AND lease_id = %(lease_id)s
LOCK IN SHARE MODE;

-- name: update_step
-- created_at of an existing row is kept; the final-row guard is repeated here.
UPDATE `{p}steps`
SET status = %(status)s, output = %(output)s, error = %(error)s, attempts = %(attempts)s,
    updated_at = %(updated_at)s, wake_at = %(wake_at)s
WHERE id = %(id)s AND status NOT IN ('completed', 'completed-early', 'skipped');

-- name: step_by_run_name
SELECT id FROM `{p}steps` WHERE run_id = %(run_id)s AND name = %(name)s;

-- name: get_step_results
SELECT * FROM `{p}steps` WHERE run_id = %(run_id)s ORDER BY created_at, id;

-- name: lock_run
-- deliver_event's first statement: proves the run exists, and serialises with wait_run,
-- with every lease-checked status change and with other deliveries until commit.
SELECT status FROM `{p}runs` WHERE id = %(id)s FOR UPDATE;

-- name: event_key_seen
-- After lock_run: keys are only added under that lock.
SELECT 1 AS seen FROM `{p}event_keys` WHERE run_id = %(id)s AND `key` = %(key)s;

-- name: insert_event_key
INSERT INTO `{p}event_keys` (run_id, `key`, delivered_at) VALUES (%(id)s, %(key)s, {now});

-- name: insert_event
INSERT INTO `{p}events` (run_id, name, payload, delivered_at)
VALUES (%(id)s, %(event_name)s, %(payload)s, {now});

-- name: wake_waiting_run
-- Only a run waiting for this very name wakes.
UPDATE `{p}runs`
SET status = 'pending', wake_at = NULL, waiting_for = NULL, updated_at = {now}
WHERE id = %(id)s AND status = 'waiting' AND waiting_for = %(event_name)s;

-- name: oldest_event
-- The oldest buffered event of that name; one that a concurrent taker holds is skipped,
-- so two takers never get the same event.
SELECT seq, payload, delivered_at FROM `{p}events`
WHERE run_id = %(id)s AND name = %(event_name)s
ORDER BY delivered_at, seq
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: delete_event
DELETE FROM `{p}events` WHERE seq = %(seq)s;

-- name: upsert_schedule
-- `key` is the only unique key, so ON DUPLICATE KEY means "this key exists".
-- next_run_at is assigned before recurrence, so it compares the STORED recurrence with
-- the new one (the msgspec JSON the adapter writes has a fixed field order): an
-- unchanged recurrence keeps its cadence across re-registrations.
INSERT INTO `{p}schedules` (`key`, workflow, input, recurrence, next_run_at, created_at,
                            updated_at)
VALUES (%(key)s, %(workflow)s, %(input)s, %(recurrence)s, %(next_run_at)s, %(created_at)s,
        %(updated_at)s)
ON DUPLICATE KEY UPDATE
    next_run_at = IF(recurrence = VALUES(recurrence), next_run_at, VALUES(next_run_at)),
    workflow = VALUES(workflow), input = VALUES(input), recurrence = VALUES(recurrence),
    updated_at = VALUES(updated_at);

-- name: get_schedule
SELECT * FROM `{p}schedules` WHERE `key` = %(key)s;

-- name: lock_due_schedule
-- %(now)s is the transaction's "now" (read first); the adapter advances from it.
SELECT * FROM `{p}schedules`
WHERE workflow IN %(names)s AND next_run_at <= %(now)s
ORDER BY next_run_at, `key`
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: advance_schedule
-- Guarded on the old next_run_at: an occurrence is advanced (and so fired) once.
UPDATE `{p}schedules` SET next_run_at = %(next_run_at)s, updated_at = %(now)s
WHERE `key` = %(key)s AND next_run_at = %(slot)s;

-- name: delete_schedule
DELETE FROM `{p}schedules` WHERE `key` = %(key)s;

-- name: list_schedules
SELECT * FROM `{p}schedules` ORDER BY `key`;
