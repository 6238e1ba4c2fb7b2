-- list_runs (read only): newest first by (created_at, id) from one list index.
-- ARGV[3] index key suffix ('' for all runs; else as built by keys.py), ARGV[4] upper
-- bound for ZREVRANGEBYLEX ('+' or '(' .. sk prefix), ARGV[5] limit.
-- Returns one HGETALL array per run.
local index_key = P .. ':list' .. ARGV[3]
local members = redis.call('ZREVRANGEBYLEX', index_key, ARGV[4], '-', 'LIMIT', 0, tonumber(ARGV[5]))
local out = {}
for _, sk in ipairs(members) do
    local flat = redis.call('HGETALL', run_key(string.sub(sk, 9)))
    if #flat > 0 then
        out[#out + 1] = flat
    end
end
return out
