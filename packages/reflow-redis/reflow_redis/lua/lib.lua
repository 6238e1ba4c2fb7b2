-- Shared helpers, prepended to every script in this directory when it is loaded
-- (scripts.py). Nothing here writes on its own.
--
-- Calling convention of every script: ARGV[1] is the key prefix, ARGV[2] the test
-- clock ('' in production: the server's TIME decides), the rest is the script's own.
-- KEYS is not used: keys are derived from ids inside the script (the claim script only
-- learns which runs it touches as it goes), which a standalone server allows and a
-- Redis Cluster does not; see the README.
--
-- Key layout. P is the prefix (letters, digits, '_', '-', '.': never ':'); an
-- identifier x becomes E(x) = <byte length of x> ':' x, so no two different ids, and no
-- id and a suffix, ever make the same key whatever characters they contain.
--   P:run:E(id)            hash: one run (fields as WorkflowRun, plus lease_id, sk)
--   P:steps:E(run)         hash: step name -> step id
--   P:step:E(step id)      hash: one step row (fields as StepResult)
--   P:ev:E(run)E(name)     list: buffered events, oldest first: "<delivered_at>:<payload>"
--   P:evnames:E(run)       set: event names that ever had a list (for purge)
--   P:evkeys:E(run)        set: event keys delivered to the run
--   P:idem:E(workflow)     hash: idempotency key -> run id
--   P:ready:E(workflow)    zset (score 0, member sk): claimable now, by (created_at, id)
--   P:lease:E(workflow)    zset (score lease_expires_at, member sk): running runs
--   P:wake:E(workflow)     zset (score wake_at, member sk): sleeping/waiting with a wake time
--   P:list, P:list:wf:E(workflow), P:list:st:<status>, P:list:ws:<status>:E(workflow)
--                          zsets (score 0, member sk): list_runs indexes
--   P:done:<status>        zset (score updated_at, member id): finished runs, for purge
--   P:sched:E(key)         hash: one schedule
--   P:scheds               zset (score 0, member key): all schedule keys
--   P:schedue:E(workflow)  zset (score next_run_at, member key)
--   P:meta                 hash: layout version
-- sk ("sort key") = 8-byte big-endian (created_at + 2^63) followed by the run id: with
-- all scores 0, a zset orders members bytewise, which is (created_at, id) with ids in
-- UTF-8 byte order = code point order. Runs move between the ready, lease and wake sets
-- only inside scripts, always through transition().

local P = ARGV[1]
local NOW_ARG = ARGV[2]

local function now_ms()
    if NOW_ARG ~= '' then
        return tonumber(NOW_ARG)
    end
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers as decimal text: Lua's tostring would print 1.7e+12.
local function fmt(n)
    return string.format('%d', n)
end

local function E(x)
    return #x .. ':' .. x
end

local function run_key(id) return P .. ':run:' .. E(id) end
local function steps_key(run) return P .. ':steps:' .. E(run) end
local function step_key(id) return P .. ':step:' .. E(id) end
local function ev_key(run, name) return P .. ':ev:' .. E(run) .. E(name) end
local function evnames_key(run) return P .. ':evnames:' .. E(run) end
local function evkeys_key(run) return P .. ':evkeys:' .. E(run) end
local function idem_key(wf) return P .. ':idem:' .. E(wf) end
local function ready_key(wf) return P .. ':ready:' .. E(wf) end
local function lease_key(wf) return P .. ':lease:' .. E(wf) end
local function wake_key(wf) return P .. ':wake:' .. E(wf) end
local function list_key() return P .. ':list' end
local function list_wf_key(wf) return P .. ':list:wf:' .. E(wf) end
local function list_st_key(st) return P .. ':list:st:' .. st end
local function list_ws_key(st, wf) return P .. ':list:ws:' .. st .. ':' .. E(wf) end
local function done_key(st) return P .. ':done:' .. st end
local function sched_key(k) return P .. ':sched:' .. E(k) end
local function scheds_key() return P .. ':scheds' end
local function schedue_key(wf) return P .. ':schedue:' .. E(wf) end
local function channel() return P .. ':work' end

-- Bytewise a < b. Lua's own '<' uses strcoll, which follows the server's locale.
local function bytes_less(a, b)
    local n = math.min(#a, #b)
    for i = 1, n do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then
            return x < y
        end
    end
    return #a < #b
end

local TERMINAL = {completed = true, failed = true, cancelled = true}
local FINAL_STEP = {completed = true, ['completed-early'] = true, skipped = true}

-- A hash as a Lua table; nil when the key does not exist.
local function load_hash(key)
    local flat = redis.call('HGETALL', key)
    if #flat == 0 then
        return nil
    end
    local t = {}
    for i = 1, #flat, 2 do
        t[flat[i]] = flat[i + 1]
    end
    return t
end

local function flatten(t)
    local out = {}
    for k, v in pairs(t) do
        out[#out + 1] = k
        out[#out + 1] = v
    end
    return out
end

local function load_run(id)
    return load_hash(run_key(id))
end

local function is_held(r, lease_id)
    return r ~= nil and r.status == 'running' and r.lease_id == lease_id
end

-- Remove a run from the indexes its current state puts it in.
local function unindex(id, r)
    local wf = r.workflow
    redis.call('ZREM', ready_key(wf), r.sk)
    redis.call('ZREM', lease_key(wf), r.sk)
    redis.call('ZREM', wake_key(wf), r.sk)
    redis.call('ZREM', list_st_key(r.status), r.sk)
    redis.call('ZREM', list_ws_key(r.status, wf), r.sk)
    if TERMINAL[r.status] then
        redis.call('ZREM', done_key(r.status), id)
    end
end

-- Add a run to the indexes its current state calls for.
local function index(id, r)
    local wf = r.workflow
    local st = r.status
    if st == 'pending' then
        redis.call('ZADD', ready_key(wf), 0, r.sk)
    elseif st == 'running' and r.lease_expires_at then
        redis.call('ZADD', lease_key(wf), r.lease_expires_at, r.sk)
    elseif (st == 'sleeping' or st == 'waiting') and r.wake_at then
        redis.call('ZADD', wake_key(wf), r.wake_at, r.sk)
    elseif TERMINAL[st] then
        redis.call('ZADD', done_key(st), r.updated_at, id)
    end
    redis.call('ZADD', list_st_key(st), 0, r.sk)
    redis.call('ZADD', list_ws_key(st, wf), 0, r.sk)
end

-- Apply changes (field -> text, or false to delete the field) to run r, keeping every
-- index in step. The only way scripts change a stored run.
local function transition(id, r, changes)
    unindex(id, r)
    local set, del = {}, {}
    for k, v in pairs(changes) do
        if v == false then
            r[k] = nil
            del[#del + 1] = k
        else
            r[k] = v
            set[#set + 1] = k
            set[#set + 1] = v
        end
    end
    local key = run_key(id)
    if #set > 0 then
        redis.call('HSET', key, unpack(set))
    end
    if #del > 0 then
        redis.call('HDEL', key, unpack(del))
    end
    index(id, r)
end

-- The lease fields, cleared by every write that moves a run out of 'running'.
local function release(changes)
    changes.lease_id = false
    changes.claimed_at = false
    changes.lease_ms = false
    changes.lease_expires_at = false
    changes.holder = false
    return changes
end

local function notify()
    redis.call('PUBLISH', channel(), '')
end

-- Upsert step row `id` of (run, name) with `fields` (a table; created_at is kept for an
-- existing row). Returns 1 (written), 0 (a final row stands: written once), or
-- {'clash', owner run, owner name, owner id} when the id belongs to another
-- (run, name) or the (run, name) to another id. Checks before it writes anything.
local function step_clash(id, run, name)
    local skey = step_key(id)
    local owner = redis.call('HMGET', skey, 'run_id', 'name', 'status')
    if owner[1] then
        if owner[1] ~= run or owner[2] ~= name then
            return {'clash', owner[1], owner[2], id}
        end
        if FINAL_STEP[owner[3]] then
            return 0
        end
        return nil
    end
    local other = redis.call('HGET', steps_key(run), name)
    if other and other ~= id then
        return {'clash', run, name, other}
    end
    return nil
end

local function write_step(id, run, name, fields)
    local skey = step_key(id)
    local set, del = {}, {}
    local exists = redis.call('EXISTS', skey) == 1
    for k, v in pairs(fields) do
        if not (exists and k == 'created_at') then
            if v == false then
                del[#del + 1] = k
            else
                set[#set + 1] = k
                set[#set + 1] = v
            end
        end
    end
    redis.call('HSET', skey, 'run_id', run, 'name', name, unpack(set))
    if #del > 0 then
        redis.call('HDEL', skey, unpack(del))
    end
    redis.call('HSET', steps_key(run), name, id)
end

-- The step fields a script got as ARGV pairs from index i on ('' means unset).
local function step_fields(i)
    local fields = {}
    while i < #ARGV do
        local v = ARGV[i + 1]
        fields[ARGV[i]] = v ~= '' and v or false
        i = i + 2
    end
    return fields
end
