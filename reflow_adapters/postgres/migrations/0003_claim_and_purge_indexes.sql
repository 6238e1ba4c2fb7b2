-- 0003: storage contract 2.1 (claim_runs, purge_runs): indexes that keep every claim,
-- listing and purge O(log n) in the table's size, for any mix of workflows and statuses.
--
-- Runs like 0001: inside ``initialize``'s one transaction, under the schema's
-- transaction-level advisory lock, with ``search_path`` set to the adapter's schema.

-- A claim looks up each named workflow on its own (a LATERAL subquery per name): its
-- oldest pending runs by an ordered walk of this index, so 50,000 pending runs of
-- another workflow are never read. It also serves list_runs by workflow and status
-- (walked backwards). Every lookup is an equality prefix plus the ORDER BY columns, so
-- the planner picks it without statistics (a fresh schema, before ANALYZE).
CREATE INDEX runs_workflow_status_idx ON runs (workflow, status, created_at, id);

-- Expired leases and due wake-ups, by range within one workflow: neither live leases,
-- future wake-ups nor any other workflow's runs are read.
DROP INDEX runs_lease_expiry_idx;
DROP INDEX runs_wake_idx;
CREATE INDEX runs_lease_expiry_idx ON runs (workflow, lease_expires_at)
    WHERE status = 'running';
CREATE INDEX runs_wake_idx ON runs (workflow, wake_at)
    WHERE status IN ('sleeping', 'waiting');

-- purge_runs: the oldest finished runs of each finished status, by (updated_at, id).
-- One partial index per status, so a purge narrowed to one status never reads the
-- others, and runs that are not finished are in none of them.
CREATE INDEX runs_completed_idx ON runs (updated_at, id) WHERE status = 'completed';
CREATE INDEX runs_failed_idx ON runs (updated_at, id) WHERE status = 'failed';
CREATE INDEX runs_cancelled_idx ON runs (updated_at, id) WHERE status = 'cancelled';
