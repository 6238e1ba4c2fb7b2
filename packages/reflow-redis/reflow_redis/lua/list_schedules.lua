-- list_schedules (read only): every schedule by key (bytewise = code point order).
-- Returns {key, schedule hash} pairs, flattened.
local out = {}
for _, k in ipairs(redis.call('ZRANGE', scheds_key(), 0, -1)) do
    out[#out + 1] = k
    out[#out + 1] = redis.call('HGETALL', sched_key(k))
end
return out
