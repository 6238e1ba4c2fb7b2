-- advance_schedule: move a due schedule to its next firing, guarded on the old
-- next_run_at, so one occurrence fires once across all workers.
-- ARGV[3] key, ARGV[4] the old next_run_at (the slot), ARGV[5] the new next_run_at,
-- ARGV[6] updated_at (the now the slot was judged due by).
-- Returns the stored schedule hash, or nil when another worker advanced it first.
local k = ARGV[3]
local key = sched_key(k)
local s = load_hash(key)
if s == nil or s.next_run_at ~= ARGV[4] then
    return nil
end
redis.call('HSET', key, 'next_run_at', ARGV[5], 'updated_at', ARGV[6])
redis.call('ZADD', schedue_key(s.workflow), ARGV[5], k)
return redis.call('HGETALL', key)
