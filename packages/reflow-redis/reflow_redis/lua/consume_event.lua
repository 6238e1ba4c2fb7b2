-- consume_event: take the oldest buffered event of a name and checkpoint its payload,
-- as one step: there is no moment at which the event is gone and its checkpoint is not
-- stored.
-- ARGV[3] run id, ARGV[4] lease id, ARGV[5] event name, ARGV[6] step id, ARGV[7] step
-- name, ARGV[8..] field/value pairs of the checkpoint without output ('' = unset).
-- Returns {0} (not held, or a final row stands: nothing taken), {1} (held, nothing
-- buffered), {1, event} (taken and checkpointed), or a clash (see lib.lua; nothing taken).
local run, lease_id, name, step_id, step_name = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if not is_held(load_run(run), lease_id) then
    return {0}
end
local settled = redis.call('HMGET', step_key(step_id), 'run_id', 'name', 'status')
if settled[1] == run and settled[2] == step_name and FINAL_STEP[settled[3]] then
    return {0}
end
local key = ev_key(run, name)
local head = redis.call('LINDEX', key, 0)
if not head then
    return {1}
end
local refused = step_clash(step_id, run, step_name)
if refused ~= nil then
    return refused
end
redis.call('LPOP', key)
local fields = step_fields(8)
local colon = string.find(head, ':', 1, true)
fields.output = string.sub(head, colon + 1)
write_step(step_id, run, step_name, fields)
return {1, head}
