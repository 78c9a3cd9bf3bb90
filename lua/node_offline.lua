-- node_offline: mark a node offline when its connection ends.
--
-- KEYS[1] node hash lingua:v1:node:{<id>}
-- KEYS[2] lease     lingua:v1:node:{<id>}:lease
-- ARGV[1] epoch of the connection that ended
-- Returns 1, or 0 when a newer registration exists (then nothing changes:
-- the node is alive on its newer connection).
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1],
  'state', 'offline',
  'last_seen_ms', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('DEL', KEYS[2])
return 1
