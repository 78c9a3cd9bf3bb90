-- job_start: create a job, queued (no node yet) or with its first attempt,
-- or find the job already there (idempotent submission).
--
-- KEYS[1] job hash lingua:v1:job:{<job id>}
-- ARGV[1] the request, canonical JSON (kind, pair, session, payload, timeout)
-- ARGV[2] node chosen for attempt 1, or "" to record it queued (attempt 0;
--         job_attempt gives it its first node)
-- ARGV[3] key lifetime in ms (job timeout + result retention)
-- ARGV[4] coordinator instance dispatching it
-- ARGV[5] the job's timeout in ms (its deadline is now + timeout)
-- Returns {"new", attempt}, {"exists", status, attempt} for the same request, or
-- {"conflict"} when the id is taken by a different request.
local request = redis.call('HGET', KEYS[1], 'request')
if request then
  if request ~= ARGV[1] then
    return {'conflict'}
  end
  local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt')
  return {'exists', fields[1], tonumber(fields[2])}
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local attempt = 1
local status = 'running'
if ARGV[2] == '' then
  attempt = 0
  status = 'queued'
end
redis.call('HSET', KEYS[1],
  'request', ARGV[1],
  'status', status,
  'attempt', attempt,
  'node', ARGV[2],
  'nodes', ARGV[2],
  'coordinator', ARGV[4],
  'created_ms', now_ms,
  'deadline_ms', now_ms + tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'new', attempt}
