-- heartbeat_run: renew a held lease by its stored length from the store's now.
-- ARGV[3] run id, ARGV[4] lease id. Returns 1 if held, else 0.
local id = ARGV[3]
local r = load_run(id)
if not is_held(r, ARGV[4]) then
    return 0
end
local now = now_ms()
transition(id, r, {
    heartbeat_at = fmt(now),
    lease_expires_at = fmt(now + tonumber(r.lease_ms)),
})
return 1
