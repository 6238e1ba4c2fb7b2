-- save_step_result: upsert a step row by id; with a lease, only while the run is held.
-- A final row ('completed', 'completed-early', 'skipped') is never overwritten.
-- ARGV[3] step id, ARGV[4] run id, ARGV[5] name, ARGV[6] lease id or '' (no check),
-- ARGV[7..] field/value pairs ('' = unset).
-- Returns 1 (written), 0 (not held, or a final row stands), or a clash (see lib.lua).
local id, run, name, lease_id = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if lease_id ~= '' and not is_held(load_run(run), lease_id) then
    return 0
end
local refused = step_clash(id, run, name)
if refused ~= nil then
    return refused
end
write_step(id, run, name, step_fields(7))
return 1
