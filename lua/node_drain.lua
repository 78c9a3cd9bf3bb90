-- node_drain: mark a node draining (asked by an admin, or announced by it).
--
-- KEYS[1] node hash lingua:v1:node:{<id>}
-- KEYS[2] lease     lingua:v1:node:{<id>}:lease
-- ARGV[1] epoch of the announcing connection, or "" for an admin request
-- Returns {epoch, coordinator instance, pairs JSON, kinds JSON} of a live
-- node now draining (an admin's drain is also recorded against the agent
-- process, so that register_node re-applies it after a reconnection); "offline" when it has no live lease; "stale" when the
-- epoch given is not current; nil when the node is unknown.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return nil
end
if ARGV[1] ~= '' and ARGV[1] ~= epoch then
  return 'stale'
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 'offline'
end
redis.call('HSET', KEYS[1], 'state', 'draining')
if ARGV[1] == '' then
  redis.call('HSET', KEYS[1], 'drained_instance', redis.call('HGET', KEYS[1], 'instance'))
end
local fields = redis.call('HMGET', KEYS[1], 'coordinator', 'pairs', 'kinds')
return {tonumber(epoch), fields[1], fields[2], fields[3]}
