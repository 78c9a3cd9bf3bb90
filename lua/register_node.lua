-- register_node: record a node's registration and give it a new epoch.
--
-- KEYS[1] node hash     lingua:v1:node:{<id>}
-- KEYS[2] epoch counter lingua:v1:node:{<id>}:epoch
-- KEYS[3] lease         lingua:v1:node:{<id>}:lease
-- ARGV[1] agent instance (random per agent process)
-- ARGV[2] coordinator instance holding the socket
-- ARGV[3] lease length in ms (missed_heartbeats x heartbeat interval)
-- ARGV[4] state: "ready" or "draining"
-- ARGV[5] node fields as a JSON object (languages, kinds, pairs, gpus,
--         capacity, agent version), stored as given
-- ARGV[6] how long the node's keys outlive its last sign of life, ms
--         (lease + offline retention)
-- Returns {"ok", epoch, previous pairs JSON, previous kinds JSON, drained}
--         or {"conflict", instance of the live agent holding the id}.
-- drained is 1 when an admin drained this same agent process (instance)
-- before: the drain outlives reconnections and coordinator restarts, and
-- ends when a new agent process registers.
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

local holder = redis.call('HGET', KEYS[1], 'instance')
if holder and holder ~= ARGV[1] and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'conflict', holder}
end

local previous = redis.call('HMGET', KEYS[1], 'pairs', 'kinds', 'drained_instance')
local drained = 0
local state = ARGV[4]
if previous[3] == ARGV[1] then
  drained = 1
  state = 'draining'
else
  redis.call('HDEL', KEYS[1], 'drained_instance')
end
local epoch = redis.call('INCR', KEYS[2])
local fields = cjson.decode(ARGV[5])
redis.call('HSET', KEYS[1],
  'instance', ARGV[1],
  'coordinator', ARGV[2],
  'epoch', epoch,
  'state', state,
  'registered_ms', now_ms,
  'last_seen_ms', now_ms,
  'src_langs', fields.src_langs,
  'tgt_langs', fields.tgt_langs,
  'kinds', fields.kinds,
  'pairs', fields.pairs,
  'gpus', fields.gpus,
  'capacity', fields.capacity,
  'agent_version', fields.agent_version)
redis.call('SET', KEYS[3], epoch, 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {'ok', epoch, previous[1] or '[]', previous[2] or '[]', drained}
