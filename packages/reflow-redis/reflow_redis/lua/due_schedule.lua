-- due_schedule (read only): the earliest due schedule of the named workflows by
-- (next_run_at, key), judged by the store's now.
-- ARGV[3..] workflow names. Returns {now} or {now, key, schedule hash}.
local now = now_ms()
local best_key, best_at = nil, nil
for i = 3, #ARGV do
    local head = redis.call('ZRANGEBYSCORE', schedue_key(ARGV[i]), '-inf', now,
        'WITHSCORES', 'LIMIT', 0, 1)
    if #head > 0 then
        local at = tonumber(head[2])
        if best_key == nil or at < best_at or (at == best_at and bytes_less(head[1], best_key)) then
            best_key, best_at = head[1], at
        end
    end
end
if best_key == nil then
    return {fmt(now)}
end
return {fmt(now), best_key, redis.call('HGETALL', sched_key(best_key))}
