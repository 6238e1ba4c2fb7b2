-- 0002: storage contract 2.0: the server's clock, stored leases, idempotent events.
--
-- Runs like 0001: inside ``initialize``'s one transaction, under the schema's
-- transaction-level advisory lock, with ``search_path`` set to the adapter's schema.

-- The store's clock. Every statement that needs "now" reads it once through this
-- function (in a MATERIALIZED CTE, so one value per statement): the server's
-- clock_timestamp() in epoch milliseconds, never a client's clock. ``override`` is the
-- test-only clock of ``PostgresStorage(clock=...)``; production passes NULL.
CREATE FUNCTION reflow_now(override bigint) RETURNS bigint
    LANGUAGE sql VOLATILE
    AS $$ SELECT coalesce(override, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) $$;

-- The lease as granted at claim (only while running; every move out of running clears
-- these) and the count of takeovers from expired leases.
ALTER TABLE runs
    ADD COLUMN recoveries       integer NOT NULL DEFAULT 0,
    ADD COLUMN claimed_at       bigint,
    ADD COLUMN lease_ms         bigint,
    ADD COLUMN lease_expires_at bigint,
    ADD COLUMN holder           json;

-- Runs held under 1.x have no stored lease: give them the 1.x default (30 s) from their
-- last heartbeat, so a run whose worker died before the upgrade is still reclaimed.
UPDATE runs
SET claimed_at = heartbeat_at, lease_ms = 30000,
    lease_expires_at = coalesce(heartbeat_at, updated_at) + 30000
WHERE status = 'running';

-- claim_next_run looks for each kind of claimable run through its own index, so a claim
-- never walks the (possibly many) healthy running, sleeping or waiting runs: pending
-- runs, oldest first, through runs_status_list_idx (status, created_at DESC, id DESC);
-- running runs whose lease expired (the stale-claim branch) as a range scan of the few
-- leases that ended, however many are live;
CREATE INDEX runs_lease_expiry_idx ON runs (lease_expires_at) WHERE status = 'running';
-- and sleeping or waiting runs that are due, likewise.
CREATE INDEX runs_wake_idx ON runs (wake_at) WHERE status IN ('sleeping', 'waiting');
-- The single index these replace: walking it in (created_at, id) order passed over
-- every live lease and every future wake-up older than the first claimable run.
DROP INDEX runs_claim_idx;

-- Keys already delivered to a run (deliver_event(..., key=...)): kept after the event is
-- consumed, so a retried delivery stores nothing; deleted with the run.
CREATE TABLE event_keys (
    run_id       text   COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key          text   NOT NULL,
    delivered_at bigint NOT NULL,
    PRIMARY KEY (run_id, key)
);
