-- job_attempt: give a queued job its first node, or move a running job to
-- its next attempt on another node.
--
-- KEYS[1] job hash lingua:v1:job:{<job id>}
-- ARGV[1] the attempt the caller believes is current
-- ARGV[2] node for the new attempt
-- Returns the new attempt number, or 0 when the job already ended or the
-- caller's attempt is stale (someone else moved it on).
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'nodes')
if (fields[1] ~= 'running' and fields[1] ~= 'queued') or fields[2] ~= ARGV[1] then
  return 0
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local nodes = ARGV[2]
if fields[3] ~= '' then
  nodes = fields[3] .. ',' .. ARGV[2]
end
redis.call('HSET', KEYS[1], 'status', 'running', 'node', ARGV[2], 'nodes', nodes)
return attempt
