-- job_finish: record a job's one terminal state.
--
-- KEYS[1] job hash lingua:v1:pair:{<src:tgt>}:job:<job id>
-- ARGV[1] the attempt that produced the outcome
-- ARGV[2] "completed" or "failed"
-- ARGV[3] the outcome JSON (output, or error code and message)
-- ARGV[4] how long to keep the result, ms
-- ARGV[5] the node reporting the outcome, or "" when the dispatching
--         coordinator ends the job itself (timeout, no capacity)
-- ARGV[6] how long past the job's deadline a node's outcome is still
--         taken as it says, ms (the dispatcher times the job on its own
--         clock, from a moment after this one's deadline was written)
-- Returns {"applied", latency_ms} (submission to now: the caller builds
-- the answer from this and what it knows), {"late", latency_ms, outcome}
-- (a node's outcome after the job's deadline: recorded as this failure,
-- `timeout`, instead), "duplicate" (already terminal: a repeated or late
-- result), "stale" (from an attempt that was superseded) or
-- {"foreign", node}: the current attempt was assigned to that other node,
-- so the reporter has no say in it.
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'created_ms', 'node', 'deadline_ms')
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
local status, outcome, reply = ARGV[2], ARGV[3], 'applied'
-- Real time: a node's answer after the job's deadline is a failed one
-- (its client's time is up), whatever it says.
if ARGV[5] ~= '' and fields[5] and now_ms > tonumber(fields[5]) + tonumber(ARGV[6]) then
  status, reply = 'failed', 'late'
  outcome = string.format(
    '{"error":{"code":"timeout","message":"the result came %d ms after the job\'s deadline"}}',
    now_ms - tonumber(fields[5]))
end
redis.call('HSET', KEYS[1],
  'status', status,
  'outcome', outcome,
  'finished_ms', string.format('%d', now_ms),
  'latency_ms', string.format('%d', latency_ms))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if reply == 'late' then
  return {'late', latency_ms, outcome}
end
return {'applied', latency_ms}
