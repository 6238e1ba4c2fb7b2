-- wait_run: a held run to 'waiting' for an event (until wake_at, if given), or straight
-- to 'pending' when an event of that name is already buffered; the lease is released.
-- ARGV[3] run id, ARGV[4] lease id, ARGV[5] event name, ARGV[6] wake_at or ''.
-- Returns 1 if held, else 0.
local id, name = ARGV[3], ARGV[5]
local r = load_run(id)
if not is_held(r, ARGV[4]) then
    return 0
end
local changes = release({updated_at = fmt(now_ms())})
if redis.call('EXISTS', ev_key(id, name)) == 1 then
    changes.status = 'pending'
    changes.waiting_for = false
    changes.wake_at = false
    transition(id, r, changes)
    notify()
else
    changes.status = 'waiting'
    changes.waiting_for = name
    changes.wake_at = ARGV[6] ~= '' and ARGV[6] or false
    transition(id, r, changes)
end
return 1
