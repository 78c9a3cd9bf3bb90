-- route_pick: choose a node for one job attempt. The one script call a
-- dispatch costs.
--
-- KEYS[1] route:<kind> ZSET node -> lease deadline  lingua:v1:pair:{<src:tgt>}:route:<kind>
-- KEYS[2] free:<kind>  HASH node -> free slots     lingua:v1:pair:{<src:tgt>}:free:<kind>
-- KEYS[3] leases       ZSET node -> lease deadline  lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[4] session      STRING: the node that served the session last
--                      lingua:v1:pair:{<src:tgt>}:session:<session id>
--                      (a key nobody writes when the job has no session)
-- ARGV[1] "1" when the job has a session, "0" otherwise
-- ARGV[2] session affinity lifetime in ms
-- ARGV[3] policy: "capacity", or "random" (any live member, room or not:
--         the earlier system's policy, kept only to measure against)
-- ARGV[4..] nodes already tried for this job (excluded)
-- Returns {"ok", node} or {"no_capacity"} (live members, none with room)
-- or {"no_nodes"} (no live member serves the pair and kind).
--
-- Candidates are nodes whose last report showed free slots of the kind
-- and whose lease is current: a sampled entry whose lease is past is
-- removed, never chosen. The session's last node wins while it has
-- room; otherwise the better of two random candidates (more free slots),
-- which spreads bursts. The chosen node's free-slot hint drops by one
-- until its next report (the node stays the authority: it may refuse).
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, 16)) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
end

local excluded = {}
for i = 4, #ARGV do
  excluded[ARGV[i]] = true
end

local chosen = nil
if ARGV[1] == '1' then
  local last = redis.call('GET', KEYS[4])
  local deadline = last and redis.call('ZSCORE', KEYS[1], last)
  if last and not excluded[last] and deadline and tonumber(deadline) > now_ms then
    chosen = last
  end
end

if not chosen and ARGV[3] == 'random' then
  -- A negative count samples with repetition, each draw uniform (a
  -- positive count at or above the set's size returns it in set order).
  local sampled = redis.call('ZRANDMEMBER', KEYS[3], -(4 + (#ARGV - 3)), 'WITHSCORES')
  for i = 1, #sampled, 2 do
    if not chosen and not excluded[sampled[i]] and tonumber(sampled[i + 1]) > now_ms then
      chosen = sampled[i]
    end
  end
  if not chosen then
    -- Every draw hit a tried node: take the first live untried one.
    local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now_ms, '+inf', 'LIMIT', 0, #ARGV - 2)
    for _, node in ipairs(live) do
      if not chosen and not excluded[node] then
        chosen = node
      end
    end
  end
  if chosen then
    return {'ok', chosen}
  end
end

if not chosen then
  local best_free = -1
  local seen = 0
  -- Sampling two more than the excluded count leaves at least two
  -- candidates that were not tried yet, when there are that many.
  -- A sample as large as the set comes back in set order: start at a
  -- varying offset so that ties do not always go to the same node.
  local sampled = redis.call('ZRANDMEMBER', KEYS[1], 2 + (#ARGV - 3), 'WITHSCORES')
  local count = #sampled / 2
  for i = 1, count do
    local at = ((i + now[2]) % count) * 2 + 1
    local node = sampled[at]
    if tonumber(sampled[at + 1]) <= now_ms then
      redis.call('ZREM', KEYS[1], node)
      redis.call('HDEL', KEYS[2], node)
    elseif not excluded[node] and seen < 2 then
      seen = seen + 1
      local free = tonumber(redis.call('HGET', KEYS[2], node) or '0')
      if free > best_free then
        best_free = free
        chosen = node
      end
    end
  end
end

if not chosen then
  if redis.call('ZCOUNT', KEYS[3], '(' .. now_ms, '+inf') == 0 then
    return {'no_nodes'}
  end
  return {'no_capacity'}
end

if redis.call('HINCRBY', KEYS[2], chosen, -1) <= 0 then
  redis.call('ZREM', KEYS[1], chosen)
  redis.call('HDEL', KEYS[2], chosen)
end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[4], chosen, 'PX', ARGV[2])
end
return {'ok', chosen}
