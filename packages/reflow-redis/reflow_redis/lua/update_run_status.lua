-- update_run_status: set a status without a lease check (to cancel, say); clears the
-- lease and wake fields. 'running' this way has no holder, so its lease ends now and
-- the next claim takes it over.
-- ARGV[3] run id, ARGV[4] status, ARGV[5] '1' if ARGV[6..] lists the expected statuses.
-- Returns 1 if written, else 0.
local id, status = ARGV[3], ARGV[4]
local r = load_run(id)
if r == nil then
    return 0
end
if ARGV[5] == '1' then
    local ok = false
    for i = 6, #ARGV do
        if r.status == ARGV[i] then
            ok = true
        end
    end
    if not ok then
        return 0
    end
end
local now = now_ms()
local changes = release({status = status, wake_at = false, waiting_for = false, updated_at = fmt(now)})
if status == 'running' then
    changes.lease_expires_at = fmt(now)
end
transition(id, r, changes)
if status == 'pending' or status == 'running' then
    notify()
end
return 1
