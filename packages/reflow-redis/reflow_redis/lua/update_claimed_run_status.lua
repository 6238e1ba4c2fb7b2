-- update_claimed_run_status: set a held run's status with its output and error; the
-- lease is kept only when the run stays 'running'.
-- ARGV[3] run id, ARGV[4] lease id, ARGV[5] status, ARGV[6] output (codec text),
-- ARGV[7] error JSON or ''. Returns 1 if held, else 0.
local id, status = ARGV[3], ARGV[5]
local r = load_run(id)
if not is_held(r, ARGV[4]) then
    return 0
end
local changes = {status = status, output = ARGV[6], updated_at = fmt(now_ms())}
changes.error = ARGV[7] ~= '' and ARGV[7] or false
if status ~= 'running' then
    release(changes)
end
transition(id, r, changes)
if status == 'pending' then
    notify()
end
return 1
