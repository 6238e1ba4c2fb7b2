-- get_step_results (read only): every step row of a run, one HGETALL array each
-- (the adapter orders them by (created_at, id)). ARGV[3] run id.
local out = {}
local names = redis.call('HVALS', steps_key(ARGV[3]))
for _, step_id in ipairs(names) do
    local flat = redis.call('HGETALL', step_key(step_id))
    if #flat > 0 then
        flat[#flat + 1] = 'id'
        flat[#flat + 1] = step_id
        out[#out + 1] = flat
    end
end
return out
