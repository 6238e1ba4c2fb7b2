-- Every query of the SQLite adapters (stdlib sqlite3 and APSW), one block per query.
--
-- A block starts with "-- name: <query_name>" and holds exactly one statement with
-- named ":param" parameters only. sql.py loads this file into a dict by name.
--
-- Tables (created by schema.sql; changed only by numbered files in migrations/):
--
--   reflow_runs       one row per run. Values (input, output) are codec JSON text; error
--                     is msgspec JSON of ErrorInfo, holder msgspec JSON of LeaseHolder.
--                     The lease fields (lease_id, claimed_at, lease_ms, lease_expires_at,
--                     holder) are set by a claim and only while running: every write
--                     that moves a run out of running clears them (heartbeat_at keeps
--                     its last value). wake_at only while sleeping or waiting;
--                     waiting_for only while waiting. recoveries counts takeovers of
--                     expired leases. Times are integer milliseconds since the Unix epoch,
--                     all read from the adapter's clock (the store's "now", bound as :now).
--   reflow_steps      one row per (run, step name), upserted by id; FK to reflow_runs. A
--                     row whose status is final (completed, completed-early, skipped) is
--                     never written again (save_step_result, consume_event).
--   reflow_events     buffered events, consumed oldest first by (delivered_at, seq);
--                     FK to reflow_runs.
--   reflow_event_keys every delivery key a run has received (buffered or consumed since),
--                     so a repeated key stores nothing; FK to reflow_runs, cascading.
--   reflow_schedules  one row per schedule key; recurrence is msgspec JSON of Recurrence,
--                     compared as text to decide whether next_run_at is kept.
--   reflow_work_signal  one row: a counter every write that may make a run claimable
--                     bumps, read by other processes' wake-up watch (notify.py).
--   reflow_schema_version  one row per applied migration (the highest is the version).
--
-- Queries returning runs, steps or schedules list the columns in the order rows.py reads
-- them. A list of names (workflow_names, expected statuses) is bound as one JSON array
-- and matched with EXISTS (SELECT 1 FROM json_each(...) WHERE value = column), so each
-- query stays one static statement. EXISTS, not IN: "IN (SELECT ...)" builds a
-- temporary index on every execution, which made the claim about ten times slower.

-- name: create_schema_version_table
CREATE TABLE IF NOT EXISTS reflow_schema_version (
    version    INTEGER PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
)

-- name: schema_version
SELECT coalesce(max(version), 0) FROM reflow_schema_version

-- name: record_migration
INSERT INTO reflow_schema_version (version, name, applied_at)
VALUES (:version, :name, :applied_at)

-- name: insert_run
-- A reused idempotency key inserts nothing (0 changes); the caller then reads the
-- existing run. A reused run id is a constraint error on purpose.
INSERT INTO reflow_runs (id, workflow, input, status, idempotency_key, output, error,
                         wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
                         recoveries, claimed_at, lease_ms, lease_expires_at, holder)
VALUES (:id, :workflow, :input, :status, :idempotency_key, :output, :error,
        :wake_at, :waiting_for, :heartbeat_at, :attempt, :created_at, :updated_at,
        :recoveries, :claimed_at, :lease_ms, :lease_expires_at, :holder)
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING

-- name: get_run_by_idempotency_key
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs
WHERE workflow = :workflow AND idempotency_key = :idempotency_key

-- name: get_run
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs
WHERE id = :run_id

-- name: claim_candidates
-- The oldest claimable runs of ONE workflow, up to :limit of each kind, each kind found
-- through an index that leads with the workflow, so runs of other workflows are never
-- read: pending runs through reflow_runs_claim in (created_at, id) order (the first
-- :limit rows of the range, nothing else); running runs whose lease has expired by the
-- store's clock through reflow_runs_lease (only running runs have a lease_expires_at,
-- so the range holds just the expired leases, usually none; those few are sorted); and
-- sleeping or waiting runs whose wake time has passed through reflow_runs_wake (only
-- suspended runs have a wake_at). ops.claim_runs runs this once per named workflow,
-- merges the answers by (created_at, id) and claims the first :limit with claim_run.
-- INDEXED BY pins those plans: without statistics, some SQLite versions otherwise scan.
SELECT created_at, id FROM (
    SELECT created_at, id FROM reflow_runs INDEXED BY reflow_runs_claim
    WHERE workflow = :workflow AND status = 'pending'
    ORDER BY created_at, id LIMIT :limit)
UNION ALL
SELECT created_at, id FROM (
    SELECT created_at, id FROM reflow_runs INDEXED BY reflow_runs_lease
    WHERE workflow = :workflow AND lease_expires_at <= :now AND status = 'running'
    ORDER BY created_at, id LIMIT :limit)
UNION ALL
SELECT created_at, id FROM (
    SELECT created_at, id FROM reflow_runs INDEXED BY reflow_runs_wake
    WHERE workflow = :workflow AND wake_at <= :now AND status IN ('sleeping', 'waiting')
    ORDER BY created_at, id LIMIT :limit)

-- name: claim_candidates_many
-- claim_candidates for a long list of workflows (ops.MANY_NAMES or more) in one
-- statement: json_each walks the names and each is looked up through the same indexes,
-- so runs of workflows not named are still never read. Unlike the per-name query it
-- reads every pending run of the named workflows before taking the oldest :limit, which
-- is why a short list (the usual engine: a few workflows) is asked name by name.
SELECT created_at, id FROM (
    SELECT r.created_at, r.id
    FROM json_each(:workflow_names) AS j
    JOIN reflow_runs AS r INDEXED BY reflow_runs_claim
      ON r.workflow = j.value AND r.status = 'pending'
    ORDER BY r.created_at, r.id LIMIT :limit)
UNION ALL
SELECT created_at, id FROM (
    SELECT r.created_at, r.id
    FROM json_each(:workflow_names) AS j
    JOIN reflow_runs AS r INDEXED BY reflow_runs_lease
      ON r.workflow = j.value AND r.lease_expires_at <= :now AND r.status = 'running'
    ORDER BY r.created_at, r.id LIMIT :limit)
UNION ALL
SELECT created_at, id FROM (
    SELECT r.created_at, r.id
    FROM json_each(:workflow_names) AS j
    JOIN reflow_runs AS r INDEXED BY reflow_runs_wake
      ON r.workflow = j.value AND r.wake_at <= :now AND r.status IN ('sleeping', 'waiting')
    ORDER BY r.created_at, r.id LIMIT :limit)

-- name: claim_run
-- Claims one run chosen by claim_candidates in the same writer job (inside BEGIN
-- IMMEDIATE, so no writer interleaves); the claimability test is repeated so the write
-- can never take a run that is not claimable. SET expressions read the old row, so
-- "status = 'running'" there is 1 for a takeover of an expired lease.
UPDATE reflow_runs
SET status = 'running', lease_id = :lease_id, claimed_at = :now, heartbeat_at = :now,
    lease_ms = :lease_ms, lease_expires_at = :now + :lease_ms, holder = :holder,
    wake_at = NULL, waiting_for = NULL, attempt = attempt + 1,
    recoveries = recoveries + (status = 'running'), updated_at = :now
WHERE id = :id
  AND (status = 'pending'
       OR (status = 'running' AND lease_expires_at <= :now)
       OR (status IN ('sleeping', 'waiting') AND wake_at <= :now))
RETURNING id, workflow, input, status, idempotency_key, output, error,
          wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
          recoveries, claimed_at, lease_ms, lease_expires_at, holder

-- name: heartbeat_run
-- Renews by the holder's own stored lease_ms. An expired lease not yet reclaimed still
-- matches (its lease_id is unchanged), as the contract allows.
UPDATE reflow_runs SET heartbeat_at = :now, lease_expires_at = :now + lease_ms
WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id

-- name: sleep_run
UPDATE reflow_runs
SET status = 'sleeping', lease_id = NULL, claimed_at = NULL, lease_ms = NULL,
    lease_expires_at = NULL, holder = NULL, wake_at = :wake_at, waiting_for = NULL,
    updated_at = :now
WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id

-- name: wait_run
-- An event of that name already buffered makes the run pending at once, in the same
-- statement as the lease check, so a delivery can never fall between check and write.
UPDATE reflow_runs
SET status = CASE WHEN buffered.found THEN 'pending' ELSE 'waiting' END,
    waiting_for = CASE WHEN buffered.found THEN NULL ELSE :event_name END,
    wake_at = CASE WHEN buffered.found THEN NULL ELSE :wake_at END,
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL, updated_at = :now
FROM (SELECT EXISTS (SELECT 1 FROM reflow_events
                     WHERE run_id = :run_id AND name = :event_name) AS found) AS buffered
WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id

-- name: update_run_status
-- :expected is NULL (no condition) or a JSON array of the statuses allowed to change.
-- The lease is cleared whatever the new status. Set to running this way, a run has no
-- holder and nobody can renew it, so its lease_expires_at is :now: already expired, the
-- next claim takes it over (otherwise no claim could ever find it again).
UPDATE reflow_runs
SET status = :status, lease_id = NULL, claimed_at = NULL, lease_ms = NULL, holder = NULL,
    lease_expires_at = CASE WHEN :status = 'running' THEN :now END,
    wake_at = NULL, waiting_for = NULL, updated_at = :now
WHERE id = :run_id
  AND (:expected IS NULL OR EXISTS (SELECT 1 FROM json_each(:expected) WHERE value = status))

-- name: update_claimed_run_status
-- The lease fields are kept only when the run stays running (CASE without ELSE: NULL).
UPDATE reflow_runs
SET status = :status, output = :output, error = :error,
    lease_id = CASE WHEN :status = 'running' THEN lease_id END,
    claimed_at = CASE WHEN :status = 'running' THEN claimed_at END,
    lease_ms = CASE WHEN :status = 'running' THEN lease_ms END,
    lease_expires_at = CASE WHEN :status = 'running' THEN lease_expires_at END,
    holder = CASE WHEN :status = 'running' THEN holder END,
    wake_at = NULL, waiting_for = NULL, updated_at = :now
WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id

-- name: requeue_run
-- An operator's resume starts a fresh count of recoveries.
UPDATE reflow_runs
SET status = 'pending', output = NULL, error = NULL, lease_id = NULL, claimed_at = NULL,
    lease_ms = NULL, lease_expires_at = NULL, holder = NULL, wake_at = NULL,
    waiting_for = NULL, recoveries = 0, updated_at = :now
WHERE id = :run_id AND status IN ('failed', 'cancelled')

-- name: purge_runs
-- The oldest :limit finished runs with updated_at < :before among the statuses whose
-- flag (:completed, :failed, :cancelled: 1 or 0) is set, each status read through its
-- own partial index, then deleted in one statement: the status test and the delete
-- are one step. ON DELETE CASCADE removes their step rows, buffered events and event
-- keys in the same statement (every connection sets foreign_keys = ON). changes()
-- counts only the runs.
DELETE FROM reflow_runs
WHERE id IN (
    SELECT id FROM (
        SELECT * FROM (
            SELECT updated_at, id FROM reflow_runs INDEXED BY reflow_runs_completed
            WHERE :completed AND status = 'completed' AND updated_at < :before
            ORDER BY updated_at, id LIMIT :limit)
        UNION ALL
        SELECT * FROM (
            SELECT updated_at, id FROM reflow_runs INDEXED BY reflow_runs_failed
            WHERE :failed AND status = 'failed' AND updated_at < :before
            ORDER BY updated_at, id LIMIT :limit)
        UNION ALL
        SELECT * FROM (
            SELECT updated_at, id FROM reflow_runs INDEXED BY reflow_runs_cancelled
            WHERE :cancelled AND status = 'cancelled' AND updated_at < :before
            ORDER BY updated_at, id LIMIT :limit)
    )
    ORDER BY updated_at, id LIMIT :limit
)

-- name: delete_failed_steps
DELETE FROM reflow_steps WHERE run_id = :run_id AND status = 'failed'

-- name: list_runs
-- Keyset paging: (created_at, id) < (:before, :before_id). A NULL :before_id makes the
-- id comparison NULL, so only created_at < :before matches, as the contract asks.
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs INDEXED BY reflow_runs_newest
WHERE (created_at, id) < (:before, :before_id)
ORDER BY created_at DESC, id DESC LIMIT :limit

-- name: list_runs_by_status
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs INDEXED BY reflow_runs_status
WHERE status = :status AND (created_at, id) < (:before, :before_id)
ORDER BY created_at DESC, id DESC LIMIT :limit

-- name: list_runs_by_workflow
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs INDEXED BY reflow_runs_workflow
WHERE workflow = :workflow AND (created_at, id) < (:before, :before_id)
ORDER BY created_at DESC, id DESC LIMIT :limit

-- name: list_runs_by_workflow_and_status
SELECT id, workflow, input, status, idempotency_key, output, error,
       wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
       recoveries, claimed_at, lease_ms, lease_expires_at, holder
FROM reflow_runs INDEXED BY reflow_runs_claim
WHERE workflow = :workflow AND status = :status AND (created_at, id) < (:before, :before_id)
ORDER BY created_at DESC, id DESC LIMIT :limit

-- name: save_step_result
-- The lease check, the write-once check and the upsert are one statement: with
-- :lease_id NULL the lease is not checked. A stored row whose status is final
-- (completed, completed-early, skipped) is never updated: the DO UPDATE's WHERE leaves
-- it as it is and the statement changes nothing (False), with or without a lease. A
-- different id for an existing (run_id, name) violates the unique constraint (the ON
-- CONFLICT target is id only), which is the contract's error. An existing id under a
-- different (run_id, name) changes nothing; ops.py then reports it.
INSERT INTO reflow_steps (id, run_id, name, status, output, error, attempts,
                          created_at, updated_at, wake_at)
SELECT :id, :run_id, :name, :status, :output, :error, :attempts,
       :created_at, :updated_at, :wake_at
WHERE :lease_id IS NULL
   OR EXISTS (SELECT 1 FROM reflow_runs
              WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id)
ON CONFLICT (id) DO UPDATE
SET status = excluded.status, output = excluded.output, error = excluded.error,
    attempts = excluded.attempts, updated_at = excluded.updated_at, wake_at = excluded.wake_at
WHERE reflow_steps.run_id = excluded.run_id AND reflow_steps.name = excluded.name
  AND reflow_steps.status NOT IN ('completed', 'completed-early', 'skipped')

-- name: get_step_results
SELECT id, run_id, name, status, output, error, attempts, created_at, updated_at, wake_at
FROM reflow_steps
WHERE run_id = :run_id
ORDER BY created_at, id

-- name: insert_event
-- Inserts nothing (0 changes) when the run does not exist or has ended, or when :key (if
-- not NULL) was already delivered to it; ops.py tells these apart with event_key_seen.
-- With :key NULL the key condition is NULL = NULL, never true, so NOT EXISTS holds.
INSERT INTO reflow_events (run_id, name, payload, delivered_at)
SELECT :run_id, :event_name, :payload, :now
WHERE EXISTS (SELECT 1 FROM reflow_runs
              WHERE id = :run_id AND status NOT IN ('completed', 'failed', 'cancelled'))
  AND NOT EXISTS (SELECT 1 FROM reflow_event_keys WHERE run_id = :run_id AND key = :key)

-- name: record_event_key
-- Right after insert_event stored the event, in the same writer job.
INSERT INTO reflow_event_keys (run_id, key) VALUES (:run_id, :key)

-- name: event_key_seen
SELECT 1 FROM reflow_event_keys WHERE run_id = :run_id AND key = :key

-- name: wake_waiting_run
UPDATE reflow_runs
SET status = 'pending', wake_at = NULL, waiting_for = NULL, updated_at = :now
WHERE id = :run_id AND status = 'waiting' AND waiting_for = :event_name

-- name: take_event
-- Also the middle statement of consume_event (ops.py): may_consume, then this, then
-- save_step_result with the returned payload as :output, all in one writer job, so the
-- event is never gone without its checkpoint.
DELETE FROM reflow_events
WHERE seq = (SELECT seq FROM reflow_events
             WHERE run_id = :run_id AND name = :event_name
             ORDER BY delivered_at, seq LIMIT 1)
RETURNING payload, delivered_at

-- name: upsert_schedule
-- On update: created_at is kept; next_run_at is kept when the encoded recurrence is
-- unchanged (SET expressions read the old row, so the comparison sees the old value).
INSERT INTO reflow_schedules (key, workflow, input, recurrence, next_run_at,
                              created_at, updated_at)
VALUES (:key, :workflow, :input, :recurrence, :next_run_at, :created_at, :updated_at)
ON CONFLICT (key) DO UPDATE
SET workflow = excluded.workflow, input = excluded.input,
    recurrence = excluded.recurrence,
    next_run_at = CASE WHEN recurrence = excluded.recurrence THEN next_run_at
                       ELSE excluded.next_run_at END,
    updated_at = excluded.updated_at
RETURNING key, workflow, input, recurrence, next_run_at, created_at, updated_at

-- name: next_due_schedule
SELECT key, workflow, input, recurrence, next_run_at, created_at, updated_at
FROM reflow_schedules
WHERE next_run_at <= :now AND EXISTS (SELECT 1 FROM json_each(:workflow_names) WHERE value = workflow)
ORDER BY next_run_at, key LIMIT 1

-- name: advance_schedule
-- Guarded on the slot just read: an occurrence is advanced (so fired) exactly once.
UPDATE reflow_schedules SET next_run_at = :next_run_at, updated_at = :now
WHERE key = :key AND next_run_at = :slot
RETURNING key, workflow, input, recurrence, next_run_at, created_at, updated_at

-- name: run_is_held
SELECT 1 FROM reflow_runs WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id

-- name: may_consume
-- consume_event's first statement: the lease is held and no final row stands for the
-- checkpoint (write-once), so the event may be taken and checkpointed. A final row of the
-- same id under another (run_id, name) is not "this checkpoint": the upsert then reports
-- the id clash, as save_step_result does.
SELECT 1 FROM reflow_runs
WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id
  AND NOT EXISTS (SELECT 1 FROM reflow_steps
                  WHERE id = :id AND run_id = :run_id AND name = :name
                    AND status IN ('completed', 'completed-early', 'skipped'))

-- name: get_step_identity
SELECT run_id, name FROM reflow_steps WHERE id = :id

-- name: signal_work
-- In the transaction of a write that may have made a run claimable (see ops.py).
UPDATE reflow_work_signal SET seq = seq + 1 WHERE id = 1

-- name: work_signal
SELECT seq FROM reflow_work_signal WHERE id = 1

-- name: delete_schedule
DELETE FROM reflow_schedules WHERE key = :key

-- name: list_schedules
SELECT key, workflow, input, recurrence, next_run_at, created_at, updated_at
FROM reflow_schedules
ORDER BY key
