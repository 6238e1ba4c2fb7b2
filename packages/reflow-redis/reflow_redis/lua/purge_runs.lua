-- purge_runs: delete up to N finished runs with updated_at < cutoff, oldest first by
-- (updated_at, id), with everything stored for them (steps, events, event keys, the
-- idempotency key). The status check and the deletion are this one script.
-- ARGV[3] cutoff, ARGV[4] N, ARGV[5..] the statuses to purge.
-- Returns how many runs were deleted.
local cutoff, n = ARGV[3], tonumber(ARGV[4])
local found = {}
for i = 5, #ARGV do
    local rows = redis.call('ZRANGEBYSCORE', done_key(ARGV[i]), '-inf', '(' .. cutoff,
        'WITHSCORES', 'LIMIT', 0, n)
    for j = 1, #rows, 2 do
        found[#found + 1] = {tonumber(rows[j + 1]), rows[j]}
    end
end
table.sort(found, function(a, b)
    if a[1] ~= b[1] then
        return a[1] < b[1]
    end
    return bytes_less(a[2], b[2])
end)
local deleted = 0
for i = 1, math.min(n, #found) do
    local id = found[i][2]
    local r = load_run(id)
    if r ~= nil then
        unindex(id, r)
        redis.call('ZREM', list_key(), r.sk)
        redis.call('ZREM', list_wf_key(r.workflow), r.sk)
        if r.idempotency_key and redis.call('HGET', idem_key(r.workflow), r.idempotency_key) == id then
            redis.call('HDEL', idem_key(r.workflow), r.idempotency_key)
        end
        for _, step_id in ipairs(redis.call('HVALS', steps_key(id))) do
            redis.call('DEL', step_key(step_id))
        end
        for _, name in ipairs(redis.call('SMEMBERS', evnames_key(id))) do
            redis.call('DEL', ev_key(id, name))
        end
        redis.call('DEL', steps_key(id), evnames_key(id), evkeys_key(id), run_key(id))
        deleted = deleted + 1
    end
end
return deleted
