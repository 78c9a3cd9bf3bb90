-- job_adopt: another coordinator instance takes a job's dispatch over. A
-- coordinator that stops hands each job it holds waiting for room (no
-- attempt in flight) to another live instance, and a job recorded queued
-- by an instance that died is taken over by the instance reading it; the
-- taker adopts it here: only from the instance that gave it up, only at
-- the attempt it waited at (an attempt since may be running on a node),
-- and only while it has not ended, so that two instances never dispatch
-- it from different attempts.
--
-- KEYS[1] job hash lingua:v1:pair:{<src:tgt>}:job:<job id>
-- ARGV[1] the instance giving the job up (the hash's `coordinator`)
-- ARGV[2] the instance taking it over
-- ARGV[3] the taker's mark for the job (its `opener`)
-- ARGV[4] the attempt the job waited at
-- Taken by the same taker with the same mark already (a call whose reply
-- was lost, sent again), it answers as it did.
-- Returns {"adopted", attempt, deadline_ms, request}, or {"missing"},
-- {"ended"} (terminal), {"taken"} (another instance dispatches it) or
-- {"moved"} (at another attempt).
local fields = redis.call('HMGET', KEYS[1], 'status', 'coordinator', 'attempt', 'deadline_ms', 'request', 'opener')
if not fields[1] then
  return {'missing'}
end
if fields[1] ~= 'running' and fields[1] ~= 'queued' then
  return {'ended'}
end
local again = fields[2] == ARGV[2] and fields[6] == ARGV[3]
if fields[2] ~= ARGV[1] and not again then
  return {'taken'}
end
if (fields[3] or '0') ~= ARGV[4] then
  return {'moved'}
end
redis.call('HSET', KEYS[1], 'coordinator', ARGV[2], 'opener', ARGV[3])
return {'adopted', fields[3] or '0', fields[4] or '0', fields[5] or ''}
