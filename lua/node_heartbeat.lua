-- node_heartbeat: extend a node's lease and record its latest capacity.
--
-- KEYS[1] node hash lingua:v1:node:{<id>}
-- KEYS[2] lease     lingua:v1:node:{<id>}:lease
-- KEYS[3] epoch counter lingua:v1:node:{<id>}:epoch
-- ARGV[1] epoch of the connection sending the heartbeat
-- ARGV[2] lease length in ms
-- ARGV[3] capacity JSON
-- ARGV[4] how long the node's keys outlive this sign of life, ms
-- Returns 1, or 0 when the epoch is stale (a newer registration exists)
-- or the node was marked offline since (its connection ended; a
-- heartbeat recorded late must not bring its lease back): the caller
-- closes that connection, if it is still open.
local fields = redis.call('HMGET', KEYS[1], 'epoch', 'state')
if fields[1] ~= ARGV[1] or fields[2] == 'offline' then
  return 0
end
local now = redis.call('TIME')
-- A number goes to redis.call as text (see route_pick.lua).
redis.call('HSET', KEYS[1],
  'last_seen_ms', string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)),
  'capacity', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 1
