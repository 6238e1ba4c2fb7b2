-- Every query PostgresStorage runs, one named block each (loaded by sql.py).
--
-- Tables (see migrations/0001_initial.sql; all live in the adapter's schema, which is
-- the connection's search_path, so names here are unqualified):
--
--   runs(id, workflow, status, input, output, error, idempotency_key, lease_id,
--        wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at)
--       one row per run; a run is "held" when status = 'running' and lease_id matches.
--   steps(id, run_id -> runs, name, status, output, error, attempts, created_at,
--         updated_at, wake_at)          unique (run_id, name)
--   events(seq, run_id -> runs, name, payload, delivered_at)    the per-run event buffer
--   schedules(key, workflow, input, recurrence, next_run_at, created_at, updated_at)
--   schema_version(version, name, applied_at)                  applied migrations
--
-- Conventions: times are bigint milliseconds passed in as %(now)s from the adapter's
-- clock (never now() in SQL, so tests can move time); value columns are json holding
-- the codec's exact text, passed in as text and cast with ::json; the connection
-- loads json columns as text, so rows carry what the codec wrote. Lease-checked writes
-- put the lease in the WHERE clause of a single statement, so check and write are one.

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_versions
SELECT version FROM schema_version ORDER BY version;

-- name: record_version
INSERT INTO schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: notify_work
-- Sent inside the transaction that made a run claimable: delivered on commit only.
SELECT pg_notify(%(channel)s, '');

-- name: insert_run
INSERT INTO runs (id, workflow, status, input, output, error, idempotency_key,
                  wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at)
VALUES (%(id)s, %(workflow)s, %(status)s, %(input)s::json, %(output)s::json,
        %(error)s::json, %(idempotency_key)s, %(wake_at)s, %(waiting_for)s,
        %(heartbeat_at)s, %(attempt)s, %(created_at)s, %(updated_at)s)
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: get_run_by_idempotency_key
SELECT * FROM runs WHERE workflow = %(workflow)s AND idempotency_key = %(idempotency_key)s;

-- name: get_run
SELECT * FROM runs WHERE id = %(id)s;

-- name: list_runs
-- Each optional filter is "param IS NULL OR ..."; psycopg sends values, so PostgreSQL
-- plans with them known and the NULL branches fold away (the indexes stay usable).
SELECT * FROM runs
WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s::text)
  AND (%(before)s::bigint IS NULL
       OR (%(before_id)s::text IS NULL AND created_at < %(before)s::bigint)
       OR (created_at, id) < (%(before)s::bigint, %(before_id)s::text))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: claim_next_run
-- One statement: the subquery picks and row-locks the oldest claimable run, skipping
-- rows another claimer has locked (never blocking on them), and the UPDATE takes it.
-- The last claimable case (waiting, matching event buffered) cannot normally arise
-- (deliver_event and wait_run move such a run to pending); it is a safety net.
UPDATE runs
SET status = 'running', lease_id = %(lease_id)s, heartbeat_at = %(now)s,
    updated_at = %(now)s, attempt = attempt + 1, wake_at = NULL, waiting_for = NULL
WHERE id = (
    SELECT id FROM runs AS r
    WHERE r.workflow = ANY(%(names)s::text[])
      AND r.status IN ('pending', 'running', 'sleeping', 'waiting')
      AND (r.status = 'pending'
           OR (r.status = 'running' AND r.heartbeat_at < %(stale_before)s::bigint)
           OR (r.status IN ('sleeping', 'waiting') AND r.wake_at <= %(now)s)
           OR (r.status = 'waiting' AND EXISTS (
                   SELECT 1 FROM events AS e
                   WHERE e.run_id = r.id AND e.name = r.waiting_for)))
    ORDER BY r.created_at, r.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING *;

-- name: heartbeat_run
UPDATE runs SET heartbeat_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: sleep_run
UPDATE runs
SET status = 'sleeping', wake_at = %(wake_at)s, lease_id = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: lock_held_run
-- wait_run's and consume_event's first statement. Locking the row first serialises
-- them with deliver_event (which locks it too), with each other and with a reclaim
-- (claim_next_run skips locked rows), so the next statement's fresh snapshot sees any
-- event delivered or consumed before: no lost wake-up, no event consumed twice.
SELECT id FROM runs
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s
FOR NO KEY UPDATE;

-- name: wait_run
UPDATE runs
SET status = CASE WHEN buffered.found THEN 'pending' ELSE 'waiting' END,
    waiting_for = CASE WHEN buffered.found THEN NULL ELSE %(event_name)s END,
    wake_at = CASE WHEN buffered.found THEN NULL ELSE %(wake_at)s::bigint END,
    lease_id = NULL, updated_at = %(now)s
FROM (SELECT EXISTS (SELECT 1 FROM events
                     WHERE run_id = %(id)s AND name = %(event_name)s) AS found) AS buffered
WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s
RETURNING runs.status;

-- name: update_run_status
UPDATE runs
SET status = %(status)s, lease_id = NULL, wake_at = NULL, waiting_for = NULL,
    updated_at = %(now)s
WHERE id = %(id)s AND (%(expected)s::text[] IS NULL OR status = ANY(%(expected)s::text[]));

-- name: update_claimed_run_status
UPDATE runs
SET status = %(status)s, output = %(output)s::json, error = %(error)s::json,
    lease_id = CASE WHEN %(status)s::text = 'running' THEN lease_id END,
    updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s;

-- name: requeue_run
UPDATE runs
SET status = 'pending', output = NULL, error = NULL, lease_id = NULL, wake_at = NULL,
    waiting_for = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status IN ('failed', 'cancelled');

-- name: delete_failed_steps
DELETE FROM steps WHERE run_id = %(id)s AND status = 'failed';

-- name: save_step_result
-- Without a lease, a plain upsert. With one, the row is written only if the run is
-- held; FOR SHARE locks the run row for the rest of the statement, so a concurrent
-- claim cannot take the lease between the check and the write. created_at of an
-- existing row is kept. A different id for an existing (run_id, name) hits
-- steps_run_id_name_key and fails; an existing id under another (run_id, name) updates
-- nothing (the DO UPDATE guard) and the adapter reports it.
INSERT INTO steps (id, run_id, name, status, output, error, attempts, created_at,
                   updated_at, wake_at)
SELECT %(id)s, %(run_id)s, %(name)s, %(status)s, %(output)s::json, %(error)s::json,
       %(attempts)s, %(created_at)s, %(updated_at)s, %(wake_at)s
WHERE %(lease_id)s::text IS NULL
   OR EXISTS (SELECT 1 FROM runs
              WHERE id = %(run_id)s AND status = 'running' AND lease_id = %(lease_id)s::text
              FOR SHARE)
ON CONFLICT (id) DO UPDATE
SET status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
    attempts = EXCLUDED.attempts, updated_at = EXCLUDED.updated_at,
    wake_at = EXCLUDED.wake_at
WHERE steps.run_id = EXCLUDED.run_id AND steps.name = EXCLUDED.name;

-- name: get_step_owner
-- Asked only after save_step_result wrote nothing, to tell "lease not held" from "this
-- step id already belongs to another (run_id, name)".
SELECT run_id, name FROM steps WHERE id = %(id)s;

-- name: get_step_results
SELECT * FROM steps WHERE run_id = %(run_id)s ORDER BY created_at, id;

-- name: lock_run
-- deliver_event's first statement: proves the run exists and serialises with wait_run.
SELECT id FROM runs WHERE id = %(id)s FOR NO KEY UPDATE;

-- name: insert_event
INSERT INTO events (run_id, name, payload, delivered_at)
VALUES (%(id)s, %(event_name)s, %(payload)s::json, %(now)s);

-- name: wake_waiting_run
-- Only a run waiting for this very name wakes: another event name never causes a
-- spurious claim.
UPDATE runs
SET status = 'pending', wake_at = NULL, waiting_for = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'waiting' AND waiting_for = %(event_name)s;

-- name: take_event
DELETE FROM events
WHERE seq = (
    SELECT seq FROM events
    WHERE run_id = %(id)s AND name = %(event_name)s
    ORDER BY delivered_at, seq
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING payload, delivered_at;

-- name: consume_event
-- consume_event's second statement, after lock_held_run locked the held run row (so no
-- reclaim, delivery or other consume of this run interleaves). One statement deletes
-- the oldest event of that name and upserts the checkpoint with the event's payload
-- copied from the deleted row (the codec's json text, byte for byte). No row back:
-- nothing was buffered, nothing written. saved = 0: the step id already belongs to
-- another (run_id, name) (the DO UPDATE guard of save_step_result); the adapter then
-- raises, which rolls the DELETE back. %(id)s is the run id, %(step_id)s the step's.
WITH taken AS (
    DELETE FROM events
    WHERE seq = (
        SELECT seq FROM events
        WHERE run_id = %(id)s AND name = %(event_name)s
        ORDER BY delivered_at, seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING payload, delivered_at
), saved AS (
    INSERT INTO steps (id, run_id, name, status, output, error, attempts, created_at,
                       updated_at, wake_at)
    SELECT %(step_id)s, %(id)s, %(name)s, %(status)s, taken.payload, %(error)s::json,
           %(attempts)s, %(created_at)s, %(updated_at)s, %(wake_at)s
    FROM taken
    ON CONFLICT (id) DO UPDATE
    SET status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, updated_at = EXCLUDED.updated_at,
        wake_at = EXCLUDED.wake_at
    WHERE steps.run_id = EXCLUDED.run_id AND steps.name = EXCLUDED.name
    RETURNING 1
)
SELECT payload, delivered_at, (SELECT count(*) FROM saved) AS saved FROM taken;

-- name: upsert_schedule
-- Recurrences are compared as the msgspec JSON text the adapter writes (a fixed field
-- order), so an unchanged recurrence keeps its next_run_at and the cadence survives
-- re-registration at every start-up.
INSERT INTO schedules (key, workflow, input, recurrence, next_run_at, created_at, updated_at)
VALUES (%(key)s, %(workflow)s, %(input)s::json, %(recurrence)s::json, %(next_run_at)s,
        %(created_at)s, %(updated_at)s)
ON CONFLICT (key) DO UPDATE
SET workflow = EXCLUDED.workflow, input = EXCLUDED.input,
    recurrence = EXCLUDED.recurrence, updated_at = EXCLUDED.updated_at,
    next_run_at = CASE WHEN schedules.recurrence::text = EXCLUDED.recurrence::text
                       THEN schedules.next_run_at ELSE EXCLUDED.next_run_at END
RETURNING *;

-- name: lock_due_schedule
SELECT * FROM schedules
WHERE workflow = ANY(%(names)s::text[]) AND next_run_at <= %(now)s
ORDER BY next_run_at, key
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: advance_schedule
-- Guarded on the old next_run_at: an occurrence is advanced (and so fired) once.
UPDATE schedules SET next_run_at = %(next_run_at)s, updated_at = %(now)s
WHERE key = %(key)s AND next_run_at = %(slot)s
RETURNING *;

-- name: delete_schedule
DELETE FROM schedules WHERE key = %(key)s;

-- name: list_schedules
SELECT * FROM schedules ORDER BY key;
