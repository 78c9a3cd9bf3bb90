-- pool_leave: take a node out of one language pair: its pool seat, its
-- lease and its routing entries.
--
-- KEYS[1] members HASH node -> pool id   lingua:v1:pair:{<src:tgt>}:members
-- KEYS[2] pools   ZSET pool id -> size   lingua:v1:pair:{<src:tgt>}:pools
-- KEYS[3] room    ZSET pool id -> size   lingua:v1:pair:{<src:tgt>}:room
-- KEYS[4] leases  ZSET node -> deadline  lingua:v1:pair:{<src:tgt>}:leases
-- KEYS[5] next pool STRING counter       lingua:v1:pair:{<src:tgt>}:next_pool
-- KEYS[6..5+n]    route:<kind> ZSET per kind the node serves
-- KEYS[6+n..5+2n] free:<kind>  HASH per kind, in the same order
-- KEYS[6+2n..5+3n] served:<kind> ZSET per kind, in the same order
-- KEYS[6+3n]      memory HASH node -> room  lingua:v1:pair:{<src:tgt>}:memory
-- ARGV[1] node id
-- ARGV[2] n, the number of kinds
-- ARGV[3] (optional) "moving": the node's coordinator instance is
--         stopping and the node is moving to another; it stays in the
--         served sets until its lease deadline there, so that the pair is
--         not taken for unserved (`no_nodes`) while it reconnects.
-- Returns 1 when the node was a member, 0 otherwise.
--
-- The last member out deletes the pool-id counter: with no pool left no
-- id can collide, and a pair nobody serves keeps no key at all (a moving
-- node's served entries go once their lease ran out, with the pair's
-- next route_update, or when it joins again).
local node = ARGV[1]
local n = tonumber(ARGV[2])
local moving = ARGV[3] == 'moving'
for i = 1, n do
  redis.call('ZREM', KEYS[5 + i], node)
  redis.call('HDEL', KEYS[5 + n + i], node)
  if not moving then
    redis.call('ZREM', KEYS[5 + 2 * n + i], node)
  end
end
redis.call('HDEL', KEYS[6 + 3 * n], node)
redis.call('ZREM', KEYS[4], node)
local pool = redis.call('HGET', KEYS[1], node)
if not pool then
  return 0
end
redis.call('HDEL', KEYS[1], node)
local size = tonumber(redis.call('ZINCRBY', KEYS[2], -1, pool))
if size <= 0 then
  redis.call('ZREM', KEYS[2], pool)
  redis.call('ZREM', KEYS[3], pool)
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[5])
  end
else
  redis.call('ZADD', KEYS[3], size, pool)
end
return 1
