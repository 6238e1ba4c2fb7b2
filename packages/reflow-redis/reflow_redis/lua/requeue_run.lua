-- requeue_run: a failed or cancelled run back to 'pending', deleting only its failed
-- step rows; output and error cleared, recoveries back to 0.
-- ARGV[3] run id. Returns 1 if requeued, else 0.
local id = ARGV[3]
local r = load_run(id)
if r == nil or (r.status ~= 'failed' and r.status ~= 'cancelled') then
    return 0
end
local changes = release({
    status = 'pending', output = false, error = false, wake_at = false,
    waiting_for = false, recoveries = '0', updated_at = fmt(now_ms()),
})
transition(id, r, changes)
local names = redis.call('HGETALL', steps_key(id))
for i = 1, #names, 2 do
    local step_id = names[i + 1]
    if redis.call('HGET', step_key(step_id), 'status') == 'failed' then
        redis.call('DEL', step_key(step_id))
        redis.call('HDEL', steps_key(id), names[i])
    end
end
notify()
return 1
