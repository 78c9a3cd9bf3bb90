-- pool_join: place a node in a pool of one language pair (idempotent) and
-- take its lease in that pair.
--
-- KEYS[1] members   HASH node -> pool id     lingua:v1:pair:{<src:tgt>}:members
-- KEYS[2] pools     ZSET pool id -> size     lingua:v1:pair:{<src:tgt>}:pools
-- KEYS[3] room      ZSET pool id -> size, only pools below the maximum
--                                            lingua:v1:pair:{<src:tgt>}:room
-- KEYS[4] next pool STRING counter           lingua:v1:pair:{<src:tgt>}:next_pool
-- KEYS[5] leases    ZSET node -> lease deadline (ms)
--                                            lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[6..] served:<kind> ZSET node -> lease deadline, one per kind the node
--                                            serves (it serves them from now)
--                                            lingua:v1:pair:{<src:tgt>}:served:<kind>
-- ARGV[1] node id
-- ARGV[2] max_nodes_per_pool
-- ARGV[3] lease length in ms
-- Returns the pool id (a string).
--
-- Cost is O(log pools): the fullest pool with room comes from the room
-- index, never from walking pool numbers. A few members whose lease ran out
-- (their coordinator died without cleaning up) are removed on the way.
local max = tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

local function leave(node)
  local pool = redis.call('HGET', KEYS[1], node)
  redis.call('ZREM', KEYS[5], node)
  if not pool then
    return
  end
  redis.call('HDEL', KEYS[1], node)
  local size = tonumber(redis.call('ZINCRBY', KEYS[2], -1, pool))
  if size <= 0 then
    redis.call('ZREM', KEYS[2], pool)
    redis.call('ZREM', KEYS[3], pool)
  else
    redis.call('ZADD', KEYS[3], size, pool)
  end
end

for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_ms, 'LIMIT', 0, 8)) do
  if node ~= ARGV[1] then
    leave(node)
  end
end

local pool = redis.call('HGET', KEYS[1], ARGV[1])
if not pool then
  local open = redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. max, '-inf', 'LIMIT', 0, 1)
  if #open > 0 then
    pool = open[1]
  else
    pool = tostring(redis.call('INCR', KEYS[4]))
  end
  redis.call('HSET', KEYS[1], ARGV[1], pool)
  local size = tonumber(redis.call('ZINCRBY', KEYS[2], 1, pool))
  if size >= max then
    redis.call('ZREM', KEYS[3], pool)
  else
    redis.call('ZADD', KEYS[3], size, pool)
  end
end
redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[3]), ARGV[1])
for k = 6, #KEYS do
  redis.call('ZADD', KEYS[k], now_ms + tonumber(ARGV[3]), ARGV[1])
end
return pool
