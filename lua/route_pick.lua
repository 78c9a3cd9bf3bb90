-- route_pick: choose a node for one job attempt and, for a job, record
-- the attempt: the one script call an attempt costs. Every key is in the
-- pair's slot (the job's hash too), so on Redis Cluster as on one Redis it
-- is one round trip.
--
-- KEYS[1] route:<r>    ZSET node -> lease deadline  lingua:v1:pair:{<src:tgt>}:route:<r>
-- KEYS[2] free:<r>     HASH node -> free slots     lingua:v1:pair:{<src:tgt>}:free:<r>
-- KEYS[3] leases       ZSET node -> lease deadline  lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[4] session      STRING: the node that served the session last
--                      lingua:v1:pair:{<src:tgt>}:session:<session id>
--                      (a key nobody writes when the job has no session)
-- KEYS[5] memory       HASH node -> its room (JSON)  lingua:v1:pair:{<src:tgt>}:memory
-- KEYS[6] served:<r>   ZSET node -> lease deadline  lingua:v1:pair:{<src:tgt>}:served:<r>
-- KEYS[7] job          HASH lingua:v1:pair:{<src:tgt>}:job:<job id>; absent
--                      for a pick that records nothing (lingua-bench)
-- ARGV[1] "1" when the job has a session, "0" otherwise
-- ARGV[2] session affinity lifetime in ms
-- ARGV[3] policy: "capacity", or "random" (any live member, room or not:
--         the earlier system's policy, kept only to measure against)
-- ARGV[4] the route <r>: a kind (its GPU room), or `<kind>@cpu` (its
--         fallback room, which takes no memory)
-- ARGV[5] nodes already tried for this job (excluded), comma-separated
-- ARGV[6] with a job: "open" (a job's arrival), "next" (its next attempt)
--         or "retake" (the current attempt's pick was passed over by the
--         caller, who knew the node had no room: a new pick takes its
--         number, and without one the attempt is taken back)
-- open:   ARGV[7] the request, canonical JSON; ARGV[8] key lifetime in ms
--         (job timeout + result retention); ARGV[9] the coordinator
--         instance dispatching it; ARGV[10] the job's timeout in ms (its
--         deadline is now + timeout); ARGV[11] "1" to pick, "0" to only
--         record it queued (others wait for room before it); ARGV[12] the
--         submission's mark on the instance, so that it knows its own
--         record after losing this call's answer
-- next, retake: ARGV[7] the attempt the caller believes current
-- Returns {"ok", node, attempt} (attempt 0 without a job), {"no_capacity"}
-- (live nodes serve the kind, none with room) or {"no_nodes"} (no live
-- node serves the pair and kind); with a job also {"queued"} (recorded,
-- no pick asked), {"exists", status, attempt} (open: the same request is
-- recorded already), {"conflict"} (open: the id is taken by a different
-- request in this pair) or {"stale"} (next: the job ended, or someone
-- else moved it on). A job opened without a node stays "queued" at
-- attempt 0; each attempt recorded here is "running" on its node; a later
-- pick that finds no room (or a retake taken back) records it "queued"
-- again, at the attempt it stands at.
--
-- Candidates are nodes whose last report showed free slots of the kind
-- and whose lease is current: a sampled entry whose lease is past is
-- removed, never chosen. A node's room for the kind is its free slots,
-- capped by what fits in its memory (the `memory` record of nodes that
-- report one, shared by every kind). The session's last node wins while it
-- has room; otherwise the better of two random candidates (more room),
-- which spreads bursts. The chosen node's free slots of the kind drop by
-- one and its memory by one job of the kind (best-fit, as its arbiter
-- places): every kind's room there shrinks until its next report (the
-- node stays the authority: it may refuse). Cost: a few commands on a
-- bounded sample, whatever the size of the fleet.
--
-- Numbers go to redis.call as text (string.format('%d'), or a literal):
-- Redis 7.0 writes a Lua number out with printf's %.17g: about 2,000
-- instructions a number (docs/BENCHMARKS.md).
local now = redis.call('TIME')
local now_us = tonumber(now[2])
local now_ms = tonumber(now[1]) * 1000 + math.floor(now_us / 1000)
local now_text = string.format('%d', now_ms)

local job = KEYS[7]

-- An arriving job, not recorded yet: recorded once its pick is known.
local opening = false
-- Its deadline, worked out before anything is written (a bad timeout
-- fails the call with nothing changed).
local deadline_text

-- Records an arriving job, in one write of its hash: running its first
-- attempt on `node`, or queued at attempt 0 (`node` is '').
local function record_open(node)
  local status, attempt = 'queued', '0'
  if node ~= '' then
    status, attempt = 'running', '1'
  end
  redis.call('HSET', job,
    'request', ARGV[7],
    'status', status,
    'attempt', attempt,
    'node', node,
    'nodes', node,
    'coordinator', ARGV[9],
    'opener', ARGV[12],
    'created_ms', now_text,
    'deadline_ms', deadline_text)
  redis.call('PEXPIRE', job, ARGV[8])
end

if job then
  if ARGV[6] == 'open' then
    local request = redis.call('HGET', job, 'request')
    if request then
      if request ~= ARGV[7] then
        return {'conflict'}
      end
      local fields = redis.call('HMGET', job, 'status', 'attempt')
      return {'exists', fields[1], tonumber(fields[2])}
    end
    deadline_text = string.format('%d', now_ms + tonumber(ARGV[10]))
    if ARGV[11] ~= '1' then
      record_open('')
      return {'queued'}
    end
    opening = true
  else
    local fields = redis.call('HMGET', job, 'status', 'attempt')
    if (fields[1] ~= 'running' and fields[1] ~= 'queued') or fields[2] ~= ARGV[7] then
      return {'stale'}
    end
  end
end
local retake = job and ARGV[6] == 'retake'

local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_text, 'LIMIT', '0', '16')
for _, node in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
  redis.call('HDEL', KEYS[5], node)
end
-- Under the limit, the sweep left no lapsed lease in the route: a sample
-- of it needs no deadlines (Redis 7.0 writes each score out with %.17g,
-- and Lua reads it back with strtod: more than the sample itself costs).
local swept = #lapsed < 16

local kind = ARGV[4]
local tried = 0
local excluded = {}
for node in string.gmatch(ARGV[5], '[^,]+') do
  excluded[node] = true
  tried = tried + 1
end

-- The node's room for the kind now, and its memory record (nil when it
-- reports none).
local function room_for(node)
  local free = tonumber(redis.call('HGET', KEYS[2], node) or '0')
  local text = redis.call('HGET', KEYS[5], node)
  if not text then
    return free, nil
  end
  local memory = cjson.decode(text)
  local size = tonumber(memory.vram_mb[kind] or 0)
  if size > 0 then
    local fits = 0
    for _, mb in ipairs(memory.devices_mb) do
      fits = fits + math.floor(mb / size)
    end
    if fits < free then
      free = fits
    end
  end
  return free, memory
end

-- Takes one job of the kind from a memory record: the device with the
-- least room that still fits it. False when the kind takes no memory (a
-- fallback route, `<kind>@cpu`, is not in the record) or fits nowhere.
local function take(memory)
  local size = tonumber(memory.vram_mb[kind] or 0)
  if size <= 0 then
    return false
  end
  local best = nil
  for d, mb in ipairs(memory.devices_mb) do
    if mb >= size and (not best or mb < memory.devices_mb[best]) then
      best = d
    end
  end
  if best then
    memory.devices_mb[best] = memory.devices_mb[best] - size
    return true
  end
  return false
end

-- The nodes picked for the job, less the one a retake replaces.
local function nodes_kept()
  local nodes = redis.call('HGET', job, 'nodes')
  if retake then
    nodes = string.match(nodes, '^(.*),[^,]*$') or ''
  end
  return nodes
end

-- Records the job's next attempt (a retake: the current one), on `node`:
-- its number (0 without a job).
local function record_attempt(node)
  if not job then
    return 0
  end
  if opening then
    record_open(node)
    return 1
  end
  local attempt = tonumber(ARGV[7])
  if not retake then
    attempt = redis.call('HINCRBY', job, 'attempt', '1')
  end
  local nodes = nodes_kept()
  if nodes ~= '' then
    nodes = nodes .. ',' .. node
  else
    nodes = node
  end
  redis.call('HSET', job, 'status', 'running', 'node', node, 'nodes', nodes)
  return attempt
end

local function forget(node)
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
end

local chosen, chosen_free, chosen_memory = nil, 0, nil
if ARGV[1] == '1' then
  local last = redis.call('GET', KEYS[4])
  local deadline = last and redis.call('ZSCORE', KEYS[1], last)
  if last and not excluded[last] and deadline and tonumber(deadline) > now_ms then
    local free, memory = room_for(last)
    if free > 0 then
      chosen, chosen_free, chosen_memory = last, free, memory
    end
  end
end

if not chosen and ARGV[3] == 'random' then
  -- A negative count samples with repetition, each draw uniform (a
  -- positive count at or above the set's size returns it in set order).
  local sampled = redis.call('ZRANDMEMBER', KEYS[3], string.format('%d', -(4 + tried)), 'WITHSCORES')
  for i = 1, #sampled, 2 do
    if not chosen and not excluded[sampled[i]] and tonumber(sampled[i + 1]) > now_ms then
      chosen = sampled[i]
    end
  end
  if not chosen then
    -- Every draw hit a tried node: take the first live untried one.
    local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now_text, '+inf', 'LIMIT', '0', string.format('%d', tried + 1))
    for _, node in ipairs(live) do
      if not chosen and not excluded[node] then
        chosen = node
      end
    end
  end
  if chosen then
    return {'ok', chosen, record_attempt(chosen)}
  end
end

if not chosen then
  local seen = 0
  -- Sampling four more than the excluded count leaves at least two
  -- candidates that were not tried yet, when there are that many, with
  -- two to spare for nodes whose memory other kinds took since their
  -- report. A sample as large as the set comes back in set order: start at
  -- a varying offset so that ties do not always go to the same node.
  local size = string.format('%d', 4 + tried)
  local sampled, step
  if swept then
    sampled, step = redis.call('ZRANDMEMBER', KEYS[1], size), 1
  else
    sampled, step = redis.call('ZRANDMEMBER', KEYS[1], size, 'WITHSCORES'), 2
  end
  local count = #sampled / step
  for i = 1, count do
    local at = ((i + now_us) % count) * step + 1
    local node = sampled[at]
    if step == 2 and tonumber(sampled[at + 1]) <= now_ms then
      forget(node)
      redis.call('HDEL', KEYS[5], node)
    elseif not excluded[node] and seen < 2 then
      local free, memory = room_for(node)
      if free <= 0 then
        -- Other kinds took its memory: out of this kind's routing until
        -- its next report.
        forget(node)
      else
        seen = seen + 1
        if free > chosen_free then
          chosen, chosen_free, chosen_memory = node, free, memory
        end
      end
    end
  end
end

if not chosen then
  if opening then
    record_open('')
  end
  if retake then
    -- The passed-over attempt is taken back: no node holds it.
    local attempt = tonumber(ARGV[7]) - 1
    redis.call('HSET', job, 'attempt', string.format('%d', attempt), 'status', 'queued', 'node', '', 'nodes', nodes_kept())
  elseif job and not opening then
    -- Its last attempt ended without a result: it waits for room, and
    -- says so (another instance takes a queued job over when its
    -- dispatcher is gone). Its node stays named, which may still report
    -- a result for that attempt.
    redis.call('HSET', job, 'status', 'queued')
  end
  if redis.call('ZCOUNT', KEYS[6], '(' .. now_text, '+inf') == 0 then
    return {'no_nodes'}
  end
  return {'no_capacity'}
end

local left = redis.call('HINCRBY', KEYS[2], chosen, '-1')
if chosen_memory and take(chosen_memory) then
  redis.call('HSET', KEYS[5], chosen, cjson.encode(chosen_memory))
end
if left <= 0 or chosen_free <= 1 then
  forget(chosen)
end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[4], chosen, 'PX', ARGV[2])
end
return {'ok', chosen, record_attempt(chosen)}
