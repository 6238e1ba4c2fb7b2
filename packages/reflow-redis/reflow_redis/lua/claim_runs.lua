-- claim_runs: claim up to N claimable runs of the named workflows, oldest first by
-- (created_at, id), judged by one reading of the store's clock.
-- ARGV[3] lease_ms, ARGV[4] holder JSON or '', ARGV[5] N, ARGV[6 .. 5+N] the lease ids
-- to issue, ARGV[6+N ..] the workflow names (distinct).
-- Returns {now, {lease_id, fields}...}.
--
-- Runs whose lease expired or whose wake time passed are first moved from the lease
-- and wake sets into the ready set (each move is O(log n) and happens once per
-- expiry), so a claim reads only the head of each ready set.
local now = now_ms()
local lease_ms = tonumber(ARGV[3])
local holder = ARGV[4]
local n = tonumber(ARGV[5])
local names = {}
for i = 6 + n, #ARGV do
    names[#names + 1] = ARGV[i]
end

for _, wf in ipairs(names) do
    for _, timed in ipairs({lease_key(wf), wake_key(wf)}) do
        for _, sk in ipairs(redis.call('ZRANGEBYSCORE', timed, '-inf', now)) do
            redis.call('ZREM', timed, sk)
            redis.call('ZADD', ready_key(wf), 0, sk)
        end
    end
end

local claimed = {}
while #claimed < n do
    local best, best_wf = nil, nil
    for _, wf in ipairs(names) do
        local head = redis.call('ZRANGE', ready_key(wf), 0, 0)[1]
        if head and (best == nil or bytes_less(head, best)) then
            best, best_wf = head, wf
        end
    end
    if best == nil then
        break
    end
    local id = string.sub(best, 9)
    local r = load_run(id)
    if r == nil then
        redis.call('ZREM', ready_key(best_wf), best)  -- cannot happen: purge unindexes
    else
        local lease_id = ARGV[5 + #claimed + 1]
        local changes = release({})
        changes.status = 'running'
        changes.lease_id = lease_id
        changes.claimed_at = fmt(now)
        changes.heartbeat_at = fmt(now)
        changes.lease_ms = fmt(lease_ms)
        changes.lease_expires_at = fmt(now + lease_ms)
        if holder ~= '' then
            changes.holder = holder
        end
        changes.wake_at = false
        changes.waiting_for = false
        changes.attempt = fmt(tonumber(r.attempt or '0') + 1)
        if r.status == 'running' then
            changes.recoveries = fmt(tonumber(r.recoveries or '0') + 1)
        end
        changes.updated_at = fmt(now)
        transition(id, r, changes)
        claimed[#claimed + 1] = {lease_id, redis.call('HGETALL', run_key(id))}
    end
end
local out = {fmt(now)}
for _, c in ipairs(claimed) do
    out[#out + 1] = c
end
return out
