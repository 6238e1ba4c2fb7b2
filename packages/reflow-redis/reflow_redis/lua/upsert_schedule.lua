-- upsert_schedule: insert or update a schedule by key; an update keeps created_at and,
-- when the recurrence text is unchanged, next_run_at (re-registering keeps cadence).
-- ARGV[3] key, ARGV[4] workflow, ARGV[5] input, ARGV[6] recurrence JSON,
-- ARGV[7] next_run_at, ARGV[8] created_at, ARGV[9] updated_at.
-- Returns the stored schedule hash (HGETALL).
local k, wf = ARGV[3], ARGV[4]
local key = sched_key(k)
local old = load_hash(key)
local next_run_at, created_at = ARGV[7], ARGV[8]
if old then
    created_at = old.created_at
    if old.recurrence == ARGV[6] then
        next_run_at = old.next_run_at
    end
    redis.call('ZREM', schedue_key(old.workflow), k)
end
redis.call('HSET', key, 'workflow', wf, 'input', ARGV[5], 'recurrence', ARGV[6],
    'next_run_at', next_run_at, 'created_at', created_at, 'updated_at', ARGV[9])
redis.call('ZADD', scheds_key(), 0, k)
redis.call('ZADD', schedue_key(wf), next_run_at, k)
return redis.call('HGETALL', key)
