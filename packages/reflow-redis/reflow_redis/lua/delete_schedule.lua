-- delete_schedule: remove a schedule. ARGV[3] key. Returns 1, or 0 if there was none.
local k = ARGV[3]
local wf = redis.call('HGET', sched_key(k), 'workflow')
if not wf then
    return 0
end
redis.call('DEL', sched_key(k))
redis.call('ZREM', scheds_key(), k)
redis.call('ZREM', schedue_key(wf), k)
return 1
