-- job_expire: end a job that nobody else will end. A job still running
-- past its deadline plus a grace lost its dispatcher (the coordinator that
-- dispatched it died) and its result (the node died too, or never got the
-- assignment); any coordinator that sees it records it failed.
--
-- KEYS[1] job hash lingua:v1:pair:{<src:tgt>}:job:<job id>
-- ARGV[1] grace after the deadline, ms (the live dispatcher ends its own
--         jobs at the deadline; the grace lets it win)
-- ARGV[2] the outcome JSON (error code and message)
-- ARGV[3] how long to keep the result, ms
-- Returns "expired", "running" (not past deadline + grace), "ended"
-- (already terminal) or "missing".
local fields = redis.call('HMGET', KEYS[1], 'status', 'created_ms', 'deadline_ms')
if not fields[1] then
  return 'missing'
end
if fields[1] ~= 'running' and fields[1] ~= 'queued' then
  return 'ended'
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
if now_ms < tonumber(fields[3] or '0') + tonumber(ARGV[1]) then
  return 'running'
end
redis.call('HSET', KEYS[1],
  'status', 'failed',
  'outcome', ARGV[2],
  'finished_ms', now_ms,
  'latency_ms', now_ms - tonumber(fields[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'expired'
