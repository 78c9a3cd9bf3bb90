-- route_update: renew the leases and routing entries of a batch of nodes in
-- one language pair (the coordinator batches heartbeats and capacity
-- reports per pair, so a pair costs one call per flush, not one per node).
--
-- KEYS[1]          leases       ZSET node -> lease deadline (ms)
--                               lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[2..1+n]     route:<kind> ZSET node -> lease deadline, only nodes with
--                               free slots of that kind that are not draining
--                               lingua:v1:pair:{<src:tgt>}:route:<kind>
-- KEYS[2+n..1+2n]  free:<kind>  HASH node -> free slots, same kind order
--                               lingua:v1:pair:{<src:tgt>}:free:<kind>
-- ARGV[1] lease length in ms
-- ARGV[2] n, the number of kinds
-- ARGV[3..] per node: node id, then n free-slot counts (one per kind;
--           0 takes the node out of that kind's routing, -1 means the
--           node does not serve the kind)
-- Returns the ids of nodes that are no longer members of the pair (their
-- lease ran out and they were cleaned up): the caller re-joins them.
local n = tonumber(ARGV[2])
local now = redis.call('TIME')
local deadline = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[1])
local missing = {}
local i = 3
while i <= #ARGV do
  local node = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], node) then
    redis.call('ZADD', KEYS[1], deadline, node)
    for k = 1, n do
      local free = tonumber(ARGV[i + k])
      if free > 0 then
        redis.call('ZADD', KEYS[1 + k], deadline, node)
        redis.call('HSET', KEYS[1 + n + k], node, free)
      else
        redis.call('ZREM', KEYS[1 + k], node)
        redis.call('HDEL', KEYS[1 + n + k], node)
      end
    end
  else
    missing[#missing + 1] = node
  end
  i = i + 1 + n
end
return missing
