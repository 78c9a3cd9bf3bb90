-- job_attempt: move a running job to its next attempt on another node.
--
-- KEYS[1] job hash lingua:v1:job:{<job id>}
-- ARGV[1] the attempt the caller believes is current
-- ARGV[2] node for the new attempt
-- Returns the new attempt number, or 0 when the job already ended or the
-- caller's attempt is stale (someone else moved it on).
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'nodes')
if fields[1] ~= 'running' or fields[2] ~= ARGV[1] then
  return 0
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'nodes', fields[3] .. ',' .. ARGV[2])
return attempt
