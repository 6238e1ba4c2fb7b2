-- create_run: store a new run, or return the run that already has its idempotency key.
-- ARGV[3] run id, ARGV[4] workflow, ARGV[5] idempotency key or '', ARGV[6] notify
-- ('1' when the new run is claimable), ARGV[7..] field/value pairs of the run hash.
-- Returns {1, fields} (created), {0, fields} (the existing run of that key), or
-- {-1} (a run with this id already exists).
local id, wf, ikey = ARGV[3], ARGV[4], ARGV[5]
if ikey ~= '' then
    local existing = redis.call('HGET', idem_key(wf), ikey)
    if existing then
        return {0, redis.call('HGETALL', run_key(existing))}
    end
end
local key = run_key(id)
if redis.call('EXISTS', key) == 1 then
    return {-1}
end
local fields = {}
for i = 7, #ARGV do
    fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', key, unpack(fields))
local r = load_run(id)
redis.call('ZADD', list_key(), 0, r.sk)
redis.call('ZADD', list_wf_key(wf), 0, r.sk)
index(id, r)
if ikey ~= '' then
    redis.call('HSET', idem_key(wf), ikey, id)
end
if ARGV[6] == '1' then
    notify()
end
return {1, redis.call('HGETALL', key)}
