-- deliver_event: buffer an event for a run that has not ended and wake the run if it
-- waits for that name. A key already delivered to the run stores nothing and answers
-- 1 (even if the run ended since); a refused delivery does not use its key up.
-- ARGV[3] run id, ARGV[4] event name, ARGV[5] payload (codec text), ARGV[6] key or ''.
-- Returns 1 (stored, or delivered before under that key) or 0 (refused).
local id, name, payload, ekey = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local r = load_run(id)
if r == nil then
    return 0
end
if TERMINAL[r.status] then
    if ekey ~= '' and redis.call('SISMEMBER', evkeys_key(id), ekey) == 1 then
        return 1
    end
    return 0
end
if ekey ~= '' and redis.call('SADD', evkeys_key(id), ekey) == 0 then
    return 1
end
local now = fmt(now_ms())
redis.call('RPUSH', ev_key(id, name), now .. ':' .. payload)
redis.call('SADD', evnames_key(id), name)
if r.status == 'waiting' and r.waiting_for == name then
    transition(id, r, {status = 'pending', wake_at = false, waiting_for = false, updated_at = now})
    notify()
end
return 1
