-- retry: put a FAILED or CANCELLED job back in its queue (RetryJob), with a fresh count of attempts;
-- its history stays. The count: the job may start as many more times as its spec allows, so its
-- 'max_attempts' field becomes the attempts made so far plus the spec's allowance ('base' keeps
-- the attempts made before this retry, from which that allowance is recovered next time). The job
-- leaves its queue's failed zset, stops expiring, and its QUEUED event is published.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] job hash
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] now ms
-- A job with a unique key takes it again, unless another unfinished job holds it.
-- returns {1, queue} queued again, {-1} missing, {-2, state} not FAILED or CANCELLED, {-3, id} its
--   unique key is held by job id (nothing changes)
local ns, jk, id, now = namespace(ARGV[1]), KEYS[NS_KEYS + 1], ARGV[2], tonumber(ARGV[3])
local j = redis.call('HMGET', jk, 'state', 'queue', 'kind', 'attempt', 'max_attempts', 'base', 'unique', 'batch')
if not j[1] then return {-1} end
local state = tonumber(j[1])
if state ~= FAILED and state ~= CANCELLED then return {-2, state} end
if j[7] then
  local uk = unique_key(ns.P, j[7])
  local holder = redis.call('GET', uk)
  if holder and holder ~= id then return {-3, holder} end
  redis.call('SET', uk, id)
end
local attempt, allowed, base = tonumber(j[4]), tonumber(j[5]), tonumber(j[6] or '0')
if j[8] then count_in_batch(ns, j[8], state, now, -1) end  -- pending again (a done batch stays done)
redis.call('PERSIST', jk)
redis.call('HDEL', jk, 'err_code', 'err_msg', 'finished', 'result', 'big_result', 'output', 'big_output', 'recorded',
  'due', 'cancel')
redis.call('DEL', apart_key(ns.P, id, 'result'), apart_key(ns.P, id, 'output'))
redis.call('HSET', jk, 'base', attempt, 'max_attempts', attempt + allowed - base)
redis.call('ZREM', failed_key(ns.P, j[2]), id)
local _, queued = requeue(ns, jk, id, now, false)
if queued == QUEUED then  -- else its concurrency key has no start left: SCHEDULED, and said so
  publish_parts(ns.results, {pb_events_of(id, {queue = j[2], kind = j[3], attempt = attempt}, QUEUED, now)})
end
return {1, j[2]}
