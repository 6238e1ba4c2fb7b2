-- Every query PostgresStorage runs, one named block each (loaded by sql.py).
--
-- Tables (see migrations/; all live in the adapter's schema, which is the connection's
-- search_path, so names here are unqualified):
--
--   runs(id, workflow, status, input, output, error, idempotency_key, lease_id,
--        wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
--        recoveries, claimed_at, lease_ms, lease_expires_at, holder)
--       one row per run; a run is "held" when status = 'running' and lease_id matches.
--       The lease fields (lease_id, claimed_at, lease_ms, lease_expires_at, holder) are
--       set by a claim and cleared by every write that moves a run out of 'running'.
--   steps(id, run_id -> runs, name, status, output, error, attempts, created_at,
--         updated_at, wake_at)          unique (run_id, name)
--   events(seq, run_id -> runs, name, payload, delivered_at)    the per-run event buffer
--   event_keys(run_id -> runs, key, delivered_at)   keys deliver_event has stored
--   schedules(key, workflow, input, recurrence, next_run_at, created_at, updated_at)
--   schema_version(version, name, applied_at)                  applied migrations
--
-- Conventions: times are bigint epoch milliseconds. Every "now" is the SERVER's clock:
-- a statement that needs it starts with
--     WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
-- and reads clock.now, so it is read once per statement (one value for every column it
-- stamps) from clock_timestamp(), never from a client whose clock may be wrong.
-- reflow_now (migrations/0002) returns its argument when it is not NULL: %(now)s is
-- NULL in production and carries the test clock of PostgresStorage(clock=...) in
-- tests, so tests can move time by hand. Other times (created_at, updated_at of
-- records the engine builds, wake_at, next_run_at) are values of the records and are
-- stored as given. Value columns are json holding the codec's exact text, passed in as
-- text and cast with ::json; the connection loads json columns as text, so rows carry
-- what the codec wrote. Lease-checked writes put the lease in the WHERE clause of a
-- single statement, so check and write are one. Final step rows ('completed',
-- 'completed-early', 'skipped') are never overwritten: the guard is in each statement.

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

-- name: now
SELECT reflow_now(%(now)s::bigint) AS now;

-- name: notify_work
-- Sent inside the transaction that made a run claimable: delivered on commit only.
SELECT pg_notify(%(channel)s, '');

-- name: insert_run
INSERT INTO runs (id, workflow, status, input, output, error, idempotency_key,
                  wake_at, waiting_for, heartbeat_at, attempt, created_at, updated_at,
                  recoveries, claimed_at, lease_ms, lease_expires_at, holder)
VALUES (%(id)s, %(workflow)s, %(status)s, %(input)s::json, %(output)s::json,
        %(error)s::json, %(idempotency_key)s, %(wake_at)s, %(waiting_for)s,
        %(heartbeat_at)s, %(attempt)s, %(created_at)s, %(updated_at)s,
        %(recoveries)s, %(claimed_at)s, %(lease_ms)s, %(lease_expires_at)s,
        %(holder)s::json)
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: get_run_by_idempotency_key
SELECT * FROM runs WHERE workflow = %(workflow)s AND idempotency_key = %(idempotency_key)s;

-- name: get_run
SELECT * FROM runs WHERE id = %(id)s;

-- name: list_runs
-- list_runs has one query per filter combination, each served by an index whose
-- equality prefix is the filter and whose order is (created_at, id), walked backwards
-- from one row-comparison bound: a page costs O(log n + limit) whatever the table
-- holds, and no plan hinges on a parameter being NULL (a generic plan of "param IS NULL
-- OR ..." cannot use the bound). The caller always binds a bound: (before, before_id)
-- for keyset paging; (before, '') for "created_at < before" ('' sorts before every id,
-- ids are non-empty and COLLATE "C"); (the largest bigint, '') for the first page.
SELECT * FROM runs
WHERE (created_at, id) < (%(before)s::bigint, %(before_id)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: list_runs_by_status
SELECT * FROM runs
WHERE status = %(status)s::text AND (created_at, id) < (%(before)s::bigint, %(before_id)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: list_runs_by_workflow
SELECT * FROM runs
WHERE workflow = %(workflow)s::text AND (created_at, id) < (%(before)s::bigint, %(before_id)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: list_runs_by_workflow_and_status
SELECT * FROM runs
WHERE workflow = %(workflow)s::text AND status = %(status)s::text AND (created_at, id) < (%(before)s::bigint, %(before_id)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: claim_runs
-- One statement claims up to %(limit)s runs (claim_next_run is this with limit 1). For
-- each named workflow (a LATERAL subquery per name), each kind of claimable run is
-- looked up through an index that leads with the workflow, oldest first, row-locked
-- and skipping rows another claimer has locked (never blocking on them); the oldest
-- %(limit)s of those candidates are taken. Candidates not taken stay locked only until
-- the statement's own transaction ends (autocommit: at once). A locked row is
-- re-checked against its branch on its newest version, so a run claimed a moment ago by
-- another worker is passed over. Staleness is judged by the stored lease_expires_at
-- (set from the holder's own lease_ms) against the server's clock: neither the
-- claimer's clock nor its lease setting enters into it.
--   pending: runs_workflow_status_idx walked in (created_at, id) order within the
--     workflow; every entry is claimable, so the first unlocked ones are the answer.
--   expired, due: a range scan of runs_lease_expiry_idx / runs_wake_idx within the
--     workflow (the few leases that ended, the few wake-ups that passed), then a sort.
--     "created_at + 0" keeps the planner from walking another index in created_at
--     order instead: it cannot know at plan time that clock.now excludes nearly every
--     row, and such a walk reads every live lease or future wake-up.
-- Each run gets its own lease id from gen_random_uuid(); the caller reads it back from
-- RETURNING, and sorts the rows by (created_at, id): RETURNING has no order.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now),
names AS (SELECT DISTINCT unnest(%(names)s::text[]) AS name),
candidates AS (
    SELECT c.id, c.created_at FROM names CROSS JOIN LATERAL (
        SELECT id, created_at FROM runs
        WHERE workflow = names.name AND status = 'pending'
        ORDER BY created_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    UNION ALL
    SELECT c.id, c.created_at FROM names CROSS JOIN LATERAL (
        SELECT id, created_at FROM runs
        WHERE workflow = names.name AND status = 'running'
          AND lease_expires_at <= (SELECT now FROM clock)
        ORDER BY created_at + 0, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    UNION ALL
    SELECT c.id, c.created_at FROM names CROSS JOIN LATERAL (
        SELECT id, created_at FROM runs
        WHERE workflow = names.name AND status IN ('sleeping', 'waiting')
          AND wake_at <= (SELECT now FROM clock)
        ORDER BY created_at + 0, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
),
chosen AS (
    SELECT id FROM candidates
    ORDER BY created_at, id
    LIMIT %(limit)s
)
UPDATE runs
SET status = 'running', lease_id = gen_random_uuid()::text,
    claimed_at = clock.now, heartbeat_at = clock.now,
    lease_ms = %(lease_ms)s::bigint, lease_expires_at = clock.now + %(lease_ms)s::bigint,
    holder = %(holder)s::json,
    recoveries = runs.recoveries + CASE WHEN runs.status = 'running' THEN 1 ELSE 0 END,
    attempt = runs.attempt + 1, wake_at = NULL, waiting_for = NULL, updated_at = clock.now
FROM chosen, clock
WHERE runs.id = chosen.id
RETURNING runs.*;

-- name: purge_runs
-- The oldest %(limit)s finished runs with updated_at < %(before)s among the statuses
-- whose flag is set, each status read through its own partial index and locked (SKIP
-- LOCKED: a row another transaction is changing is left for the next batch), then
-- deleted; the DELETE repeats the status and age test on the locked row, so the test
-- and the delete are one step. ON DELETE CASCADE removes their step rows, buffered
-- events and event keys in the same statement. The row count is the runs deleted.
WITH candidates AS (
    SELECT * FROM (
        SELECT id, updated_at FROM runs
        WHERE %(completed)s::boolean AND status = 'completed'
          AND updated_at < %(before)s::bigint
        ORDER BY updated_at, id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED) AS c
    UNION ALL
    SELECT * FROM (
        SELECT id, updated_at FROM runs
        WHERE %(failed)s::boolean AND status = 'failed'
          AND updated_at < %(before)s::bigint
        ORDER BY updated_at, id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED) AS f
    UNION ALL
    SELECT * FROM (
        SELECT id, updated_at FROM runs
        WHERE %(cancelled)s::boolean AND status = 'cancelled'
          AND updated_at < %(before)s::bigint
        ORDER BY updated_at, id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED) AS x
),
chosen AS (SELECT id FROM candidates ORDER BY updated_at, id LIMIT %(limit)s)
DELETE FROM runs
USING chosen
WHERE runs.id = chosen.id
  AND runs.status IN ('completed', 'failed', 'cancelled')
  AND runs.updated_at < %(before)s::bigint;

-- name: heartbeat_run
-- Renews by the length stored at claim, on the server's clock.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET heartbeat_at = clock.now, lease_expires_at = clock.now + runs.lease_ms
FROM clock
WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s;

-- name: sleep_run
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = 'sleeping', wake_at = %(wake_at)s, updated_at = clock.now,
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
FROM clock
WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s;

-- name: lock_held_run
-- wait_run's and consume_event's first statement. Locking the row first serialises
-- them with deliver_event (which locks it too), with each other and with a reclaim
-- (claim_next_run skips locked rows), so the next statement's fresh snapshot sees any
-- event delivered or consumed before: no lost wake-up, no event consumed twice.
SELECT id FROM runs
WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s
FOR NO KEY UPDATE;

-- name: wait_run
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = CASE WHEN buffered.found THEN 'pending' ELSE 'waiting' END,
    waiting_for = CASE WHEN buffered.found THEN NULL ELSE %(event_name)s END,
    wake_at = CASE WHEN buffered.found THEN NULL ELSE %(wake_at)s::bigint END,
    updated_at = clock.now,
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
FROM clock,
     (SELECT EXISTS (SELECT 1 FROM events
                     WHERE run_id = %(id)s AND name = %(event_name)s) AS found) AS buffered
WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s
RETURNING runs.status;

-- name: update_run_status
-- No lease check: the lease fields go whatever the new status (the run has no holder).
-- Set to 'running' this way, a run has no holder who could renew it, so its lease ends
-- now: the next claim takes it over (otherwise no claim could ever find it again).
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = %(status)s, wake_at = NULL, waiting_for = NULL, updated_at = clock.now,
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, holder = NULL,
    lease_expires_at = CASE WHEN %(status)s::text = 'running' THEN clock.now END
FROM clock
WHERE runs.id = %(id)s
  AND (%(expected)s::text[] IS NULL OR runs.status = ANY(%(expected)s::text[]));

-- name: update_claimed_run_status
-- The lease fields are kept only when the run stays 'running'.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = %(status)s, output = %(output)s::json, error = %(error)s::json,
    updated_at = clock.now,
    lease_id = CASE WHEN %(status)s::text = 'running' THEN runs.lease_id END,
    claimed_at = CASE WHEN %(status)s::text = 'running' THEN runs.claimed_at END,
    lease_ms = CASE WHEN %(status)s::text = 'running' THEN runs.lease_ms END,
    lease_expires_at = CASE WHEN %(status)s::text = 'running' THEN runs.lease_expires_at END,
    holder = CASE WHEN %(status)s::text = 'running' THEN runs.holder END
FROM clock
WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s;

-- name: update_claimed_run_statuses
-- update_claimed_run_status for several runs in one statement and one commit (concurrent
-- callers coalesced, see coalesce.py); never for 'pending', which must notify. Each row
-- is checked and written exactly as the one-run statement does; RETURNING names the runs
-- written. The adapter never puts one run twice in a batch.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now),
batch AS (
    SELECT *
    FROM unnest(%(id)s::text[], %(lease_id)s::text[], %(status)s::text[],
                %(output)s::text[], %(error)s::text[])
         AS b(id, lease_id, status, output, error)
)
UPDATE runs
SET status = batch.status, output = batch.output::json, error = batch.error::json,
    updated_at = clock.now,
    lease_id = CASE WHEN batch.status = 'running' THEN runs.lease_id END,
    claimed_at = CASE WHEN batch.status = 'running' THEN runs.claimed_at END,
    lease_ms = CASE WHEN batch.status = 'running' THEN runs.lease_ms END,
    lease_expires_at = CASE WHEN batch.status = 'running' THEN runs.lease_expires_at END,
    holder = CASE WHEN batch.status = 'running' THEN runs.holder END
FROM clock, batch
WHERE runs.id = batch.id AND runs.status = 'running' AND runs.lease_id = batch.lease_id
RETURNING runs.id;

-- name: requeue_run
-- An operator's resume: a fresh count of recoveries.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = 'pending', output = NULL, error = NULL, wake_at = NULL, waiting_for = NULL,
    recoveries = 0, updated_at = clock.now,
    lease_id = NULL, claimed_at = NULL, lease_ms = NULL, lease_expires_at = NULL,
    holder = NULL
FROM clock
WHERE runs.id = %(id)s AND runs.status IN ('failed', 'cancelled');

-- name: delete_failed_steps
DELETE FROM steps WHERE run_id = %(id)s AND status = 'failed';

-- name: save_step_result
-- Without a lease, a plain upsert. With one, the row is written only if the run is
-- held; FOR SHARE locks the run row for the rest of the statement, so a concurrent
-- claim cannot take the lease between the check and the write. created_at of an
-- existing row is kept. Write-once: the DO UPDATE guard refuses a stored final row
-- (it is evaluated on the newest committed version of that row, so of two racing
-- writers the first wins). A different id for an existing (run_id, name) hits
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
WHERE steps.run_id = EXCLUDED.run_id AND steps.name = EXCLUDED.name
  AND steps.status NOT IN ('completed', 'completed-early', 'skipped');

-- name: save_step_results
-- save_step_result for several steps in one statement and one commit (concurrent callers
-- coalesced, see coalesce.py). Each row is guarded exactly as the one-step statement
-- guards it (lease held, FOR SHARE on its run, write-once); RETURNING names the rows
-- written. The adapter never puts one step id twice in a batch (ON CONFLICT DO UPDATE
-- may not touch a row twice in one statement). Rows go in (run_id, id) order, so two
-- batches that touch the same rows lock them in the same order.
INSERT INTO steps (id, run_id, name, status, output, error, attempts, created_at,
                   updated_at, wake_at)
SELECT b.id, b.run_id, b.name, b.status, b.output::json, b.error::json,
       b.attempts, b.created_at, b.updated_at, b.wake_at
FROM unnest(%(id)s::text[], %(run_id)s::text[], %(name)s::text[], %(status)s::text[],
            %(output)s::text[], %(error)s::text[], %(attempts)s::integer[],
            %(created_at)s::bigint[], %(updated_at)s::bigint[], %(wake_at)s::bigint[],
            %(lease_id)s::text[])
     AS b(id, run_id, name, status, output, error, attempts, created_at, updated_at,
          wake_at, lease_id)
WHERE b.lease_id IS NULL
   OR EXISTS (SELECT 1 FROM runs
              WHERE id = b.run_id AND status = 'running' AND lease_id = b.lease_id
              FOR SHARE)
ORDER BY b.run_id, b.id
ON CONFLICT (id) DO UPDATE
SET status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
    attempts = EXCLUDED.attempts, updated_at = EXCLUDED.updated_at,
    wake_at = EXCLUDED.wake_at
WHERE steps.run_id = EXCLUDED.run_id AND steps.name = EXCLUDED.name
  AND steps.status NOT IN ('completed', 'completed-early', 'skipped')
RETURNING steps.id;

-- name: get_step_owner
-- Asked only after save_step_result (or consume_event) wrote nothing, to tell "lease
-- not held" or "final row kept" from "this step id already belongs to another
-- (run_id, name)".
SELECT run_id, name FROM steps WHERE id = %(id)s;

-- name: get_step_results
SELECT * FROM steps WHERE run_id = %(run_id)s ORDER BY created_at, id;

-- name: lock_run
-- deliver_event's first statement: proves the run exists, and serialises with wait_run,
-- with every status change and with other deliveries until the transaction ends. After
-- waiting for a concurrent writer, FOR NO KEY UPDATE returns the row's newest version,
-- so a run that ended a moment ago reads as ended.
SELECT status IN ('completed', 'failed', 'cancelled') AS ended
FROM runs WHERE id = %(id)s
FOR NO KEY UPDATE;

-- name: event_key_seen
-- After lock_run (a fresh snapshot, and keys are only added under that lock).
SELECT 1 FROM event_keys WHERE run_id = %(id)s AND key = %(key)s::text;

-- name: insert_event
-- With a key, the event is stored only if the key is new to this run (event_keys keeps
-- it after the event is consumed). No row inserted: a repeated key, nothing stored.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now),
keyed AS (
    INSERT INTO event_keys (run_id, key, delivered_at)
    SELECT %(id)s, %(key)s::text, clock.now FROM clock
    WHERE %(key)s::text IS NOT NULL
    ON CONFLICT (run_id, key) DO NOTHING
    RETURNING 1
)
INSERT INTO events (run_id, name, payload, delivered_at)
SELECT %(id)s, %(event_name)s, %(payload)s::json, clock.now FROM clock
WHERE %(key)s::text IS NULL OR EXISTS (SELECT 1 FROM keyed);

-- name: wake_waiting_run
-- Only a run waiting for this very name wakes: another event name never causes a
-- spurious claim.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
UPDATE runs
SET status = 'pending', wake_at = NULL, waiting_for = NULL, updated_at = clock.now
FROM clock
WHERE runs.id = %(id)s AND runs.status = 'waiting' AND runs.waiting_for = %(event_name)s;

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
-- copied from the deleted row (the codec's json text, byte for byte). Always one row:
--   done:  a final row already stands for this checkpoint (write-once): nothing was
--          taken or written;
--   found: an event was taken (false: nothing buffered, nothing written);
--   saved = 0 with found: the upsert's guard refused the row: the step id belongs to
--          another (run_id, name), or a lease-less save_step_result made the row final
--          after this statement's snapshot. The adapter then rolls the DELETE back.
-- %(id)s is the run id, %(step_id)s the step's.
WITH settled AS (
    SELECT EXISTS (
        SELECT 1 FROM steps
        WHERE id = %(step_id)s AND run_id = %(id)s AND name = %(name)s
          AND status IN ('completed', 'completed-early', 'skipped')
    ) AS done
), taken AS (
    DELETE FROM events
    WHERE seq = (
        SELECT seq FROM events
        WHERE run_id = %(id)s AND name = %(event_name)s
        ORDER BY delivered_at, seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
      AND NOT (SELECT done FROM settled)
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
      AND steps.status NOT IN ('completed', 'completed-early', 'skipped')
    RETURNING 1
)
SELECT settled.done, taken.delivered_at IS NOT NULL AS found, taken.payload,
       taken.delivered_at, (SELECT count(*) FROM saved) AS saved
FROM settled LEFT JOIN taken ON true;

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
-- Also returns the server's now it judged by: the adapter computes the next firing
-- from it and stamps the advance with it.
WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now)
SELECT schedules.*, clock.now AS now FROM schedules, clock
WHERE schedules.workflow = ANY(%(names)s::text[]) AND schedules.next_run_at <= clock.now
ORDER BY schedules.next_run_at, schedules.key
LIMIT 1
FOR UPDATE OF schedules SKIP LOCKED;

-- name: advance_schedule
-- Guarded on the old next_run_at: an occurrence is advanced (and so fired) once.
-- %(now)s is the server's now that lock_due_schedule returned, in this transaction.
UPDATE schedules SET next_run_at = %(next_run_at)s, updated_at = %(now)s
WHERE key = %(key)s AND next_run_at = %(slot)s
RETURNING *;

-- name: delete_schedule
DELETE FROM schedules WHERE key = %(key)s;

-- name: list_schedules
SELECT * FROM schedules ORDER BY key;
