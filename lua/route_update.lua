-- route_update: renew the leases and routing entries of a batch of nodes in
-- one language pair (the coordinator batches heartbeats and capacity
-- reports per pair, so a pair costs one call per flush, not one per node).
--
-- KEYS[1]          leases       ZSET node -> lease deadline (ms)
--                               lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[2]          memory       HASH node -> its room (JSON), for nodes
--                               that report one
--                               lingua:v1:pair:{<src:tgt>}:memory
-- KEYS[3..2+n]     route:<kind> ZSET node -> lease deadline, only nodes with
--                               free slots of that kind that are not draining
--                               lingua:v1:pair:{<src:tgt>}:route:<kind>
-- KEYS[3+n..2+2n]  free:<kind>  HASH node -> free slots, same kind order
--                               lingua:v1:pair:{<src:tgt>}:free:<kind>
-- KEYS[3+2n..2+3n] served:<kind> ZSET node -> lease deadline, every node
--                               serving the kind, room or not
--                               lingua:v1:pair:{<src:tgt>}:served:<kind>
-- KEYS[3+3n]       waiting      ZSET instance -> deadline: coordinator
--                               instances with jobs waiting for room here
--                               lingua:v1:pair:{<src:tgt>}:waiting
-- ARGV[1] lease length in ms
-- ARGV[2] n, the number of kinds
-- ARGV[3..] per node: node id, its room as JSON ("" when it reports none),
--           then n free-slot counts (one per kind; 0 takes the node out of
--           that kind's routing, -1 means the node does not serve the kind)
-- Returns {missing, waiting}: the ids of nodes that are no longer members
-- of the pair (their lease ran out and they were cleaned up: the caller
-- re-joins them), and the instances with jobs waiting for room here (the
-- caller tells them when the update shows room).
-- Numbers go to redis.call as text (see route_pick.lua).
local n = tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local now_text = string.format('%d', now_ms)
local deadline = string.format('%d', now_ms + tonumber(ARGV[1]))
local missing = {}
local i = 3
while i <= #ARGV do
  local node = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], node) then
    redis.call('ZADD', KEYS[1], deadline, node)
    if ARGV[i + 1] ~= '' then
      redis.call('HSET', KEYS[2], node, ARGV[i + 1])
    else
      redis.call('HDEL', KEYS[2], node)
    end
    for k = 1, n do
      local free = tonumber(ARGV[i + 1 + k])
      if free > 0 then
        redis.call('ZADD', KEYS[2 + k], deadline, node)
        redis.call('HSET', KEYS[2 + n + k], node, string.format('%d', free))
      else
        redis.call('ZREM', KEYS[2 + k], node)
        redis.call('HDEL', KEYS[2 + n + k], node)
      end
      if free >= 0 then
        redis.call('ZADD', KEYS[2 + 2 * n + k], deadline, node)
      else
        redis.call('ZREM', KEYS[2 + 2 * n + k], node)
      end
    end
  else
    missing[#missing + 1] = node
  end
  i = i + 2 + n
end
-- Nodes whose lease ran out leave the served sets (O(log N) plus the
-- nodes removed).
for k = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[2 + 2 * n + k], '-inf', now_text)
end
local waiting = KEYS[3 + 3 * n]
redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now_text)
return {missing, redis.call('ZRANGE', waiting, '0', '-1')}
