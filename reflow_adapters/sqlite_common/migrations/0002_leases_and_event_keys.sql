-- 0002: storage contract 2.0 (the tables are described at the top of ../queries.sql).
--
-- Leases are judged by the store's clock against a stored expiry: a claim records
-- claimed_at, the holder's lease_ms, lease_expires_at (= claim or last heartbeat +
-- lease_ms) and the holder (msgspec JSON of LeaseHolder); all four exist only while the
-- run is running. recoveries counts takeovers of expired leases. reflow_event_keys
-- remembers every delivery key a run has received, so a retried delivery stores nothing.
--
-- ADD COLUMN appends to the stored CREATE TABLE text, so schema.sql lists these columns
-- last, written exactly as here.

ALTER TABLE reflow_runs ADD COLUMN recoveries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reflow_runs ADD COLUMN claimed_at INTEGER;
ALTER TABLE reflow_runs ADD COLUMN lease_ms INTEGER;
ALTER TABLE reflow_runs ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE reflow_runs ADD COLUMN holder TEXT;

-- A run left running by a version-1 worker has only its last heartbeat. Give it the
-- version-1 default lease (30 s) from that heartbeat, so it is reclaimed once that has
-- passed, exactly as version 1 would have with default settings. When it was claimed
-- and by whom are unknown: claimed_at takes the last heartbeat, holder stays NULL.
UPDATE reflow_runs
SET claimed_at = coalesce(heartbeat_at, updated_at),
    lease_ms = 30000,
    lease_expires_at = coalesce(heartbeat_at, updated_at) + 30000
WHERE status = 'running';

-- The stale branch of the claim: only running runs have a lease_expires_at, and the
-- expired ones are found by range, however many runs are running.
CREATE INDEX reflow_runs_lease ON reflow_runs (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

CREATE TABLE reflow_event_keys (
    run_id TEXT NOT NULL REFERENCES reflow_runs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
