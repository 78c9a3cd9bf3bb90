-- job_finish: record a job's one terminal state.
--
-- KEYS[1] job hash lingua:v1:pair:{<src:tgt>}:job:<job id>
-- ARGV[1] the attempt that produced the outcome
-- ARGV[2] "completed" or "failed"
-- ARGV[3] the outcome JSON (output, or error code and message)
-- ARGV[4] how long to keep the result, ms
-- ARGV[5] the node reporting the outcome, or "" when the dispatching
--         coordinator ends the job itself (timeout, no capacity)
-- Returns {"applied", latency_ms} (submission to now: the caller builds
-- the answer from this and what it knows), "duplicate" (already terminal:
-- a repeated or late result), "stale" (from an attempt that was
-- superseded) or
-- {"foreign", node}: the current attempt was assigned to that other node,
-- so the reporter has no say in it.
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'created_ms', 'node')
if not fields[1] then
  return 'stale'
end
if fields[1] ~= 'running' and fields[1] ~= 'queued' then
  return 'duplicate'
end
if fields[2] ~= ARGV[1] then
  return 'stale'
end
if ARGV[5] ~= '' and fields[4] ~= ARGV[5] then
  return {'foreign', fields[4]}
end
-- Numbers go to redis.call as text (see route_pick.lua).
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
-- A clock behind the one that recorded the submission (a failover to a
-- master whose clock is behind) gives 0, not a negative time.
local latency_ms = math.max(0, now_ms - tonumber(fields[3]))
redis.call('HSET', KEYS[1],
  'status', ARGV[2],
  'outcome', ARGV[3],
  'finished_ms', string.format('%d', now_ms),
  'latency_ms', string.format('%d', latency_ms))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'applied', latency_ms}
