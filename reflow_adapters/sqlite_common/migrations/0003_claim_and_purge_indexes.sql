-- 0003: indexes that keep every claim, listing and purge O(log n) in the store's size,
-- whatever the mix of workflows and statuses (storage contract 2.1).
--
-- A claim looks up each named workflow on its own: its oldest pending runs through
-- reflow_runs_claim (workflow, status, created_at, id), which also serves listings by
-- workflow and status; its expired leases and due wake-ups through indexes that lead
-- with the workflow, so runs of other workflows (50,000 pending, or crashed leases no
-- worker serves) are never read. purge_runs finds the oldest finished runs through one
-- partial index per finished status: each holds only runs in that status, so
-- non-finished runs cost nothing to skip and pay nothing to maintain.

DROP INDEX reflow_runs_wake;
DROP INDEX reflow_runs_lease;

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

-- Cross-process wake-ups (notify.py): every write that may make a run claimable
-- bumps this one counter in its own transaction, as the PostgreSQL adapter sends NOTIFY.
-- A watching process that sees the file change (PRAGMA data_version) reads the counter
-- and wakes its engine only when it moved, so heartbeats and step saves wake no one.
CREATE TABLE reflow_work_signal (
    id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO reflow_work_signal (id, seq) VALUES (1, 0);
