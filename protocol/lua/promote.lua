-- promote: queue the SCHEDULED jobs that are due (delayed submits, and retries whose backoff is
-- over), in due order, and publish their QUEUED events.
-- KEYS[1..8] the namespace's keys (see the prelude)
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] most jobs per call
-- returns {queue, ...}: the queues it added jobs to (each once), then, if more are due, a last
--   entry of '' (call again)
local ns, now, limit = namespace(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', ns.delayed, '-inf', now, 'LIMIT', 0, limit)
local queues, seen, events, stale = {}, {}, {}, {}
for _, id in ipairs(due) do
  local jk = job_key(ns.P, id)
  local j = redis.call('HMGET', jk, 'state', 'queue', 'kind', 'attempt')
  if tonumber(j[1]) == SCHEDULED then
    -- out of the delayed zset first: a concurrency key with no start left schedules it again
    redis.call('ZREM', ns.delayed, id)
    count(ns, j[2], 'n_scheduled', -1)
    local queue, state = requeue(ns, jk, id, now, false)
    if state == QUEUED then
      redis.call('HDEL', jk, 'due', 'err_code', 'err_msg')  -- a retry's failure stays in its history
      events[#events + 1] = pb_events_of(id, {queue = j[2], kind = j[3], attempt = tonumber(j[4])}, QUEUED, now)
      if not seen[queue] then
        seen[queue] = true
        queues[#queues + 1] = queue
      end
    end
  else
    stale[#stale + 1] = id
  end
end
call_chunked('ZREM', ns.delayed, stale, 1000)
publish_parts(ns.results, events)
if #due == limit and redis.call('ZCOUNT', ns.delayed, '-inf', now) > 0 then queues[#queues + 1] = '' end
return queues
