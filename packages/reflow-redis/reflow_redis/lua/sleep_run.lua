-- sleep_run: a held run to 'sleeping' until wake_at; the lease is released.
-- ARGV[3] run id, ARGV[4] lease id, ARGV[5] wake_at. Returns 1 if held, else 0.
local id = ARGV[3]
local r = load_run(id)
if not is_held(r, ARGV[4]) then
    return 0
end
local changes = release({status = 'sleeping', wake_at = ARGV[5], updated_at = fmt(now_ms())})
transition(id, r, changes)
notify()  -- idle workers recompute their next wake-up
return 1
