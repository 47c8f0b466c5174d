-- submit: store a new job and queue it.
-- KEYS[1] job hash, KEYS[2] pending zset of its queue and kind, KEYS[3] queues set, KEYS[4] seq
-- counter, KEYS[5] idempotency string (any key when ARGV[9] is empty), KEYS[6] kinds set of its queue
-- ARGV[1] job id, ARGV[2] spec (JobSpec bytes), ARGV[3] queue, ARGV[4] kind, ARGV[5] priority,
-- ARGV[6] max attempts, ARGV[7] timeout ms, ARGV[8] now ms, ARGV[9] request digest or '',
-- ARGV[10] idempotency ttl s, ARGV[11] retention s (how long the job is kept once finished)
-- returns {1, id} stored (or already stored by this very call: a resend after a lost reply leaves
--         the job as it is now), {2, id} same request seen before (the original id),
--         {-2, id} idempotency key reused with a different request
-- Every request gets a fresh job id, so an existing hash means this call is a resend (a client
-- library retrying after a lost reply): the job may already be placed or running; leave it be.
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, ARGV[1]} end
local rdigest = ARGV[9]
if rdigest ~= '' then
  -- the idempotency string holds "<job id> <request digest>"
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local id, old = string.match(existing, '^(%S+) (%S+)$')
    if old == rdigest then return {2, id} end
    return {-2, id}
  end
end
local seq = redis.call('INCR', KEYS[4])
local prio = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'queue', ARGV[3], 'kind', ARGV[4], 'prio', prio,
  'seq', seq, 'state', QUEUED, 'attempt', 0, 'max_attempts', ARGV[6], 'timeout_ms', ARGV[7],
  'worker', '', 'lease', 0, 'created', ARGV[8], 'updated', ARGV[8], 'ttl', ARGV[11])
redis.call('ZADD', KEYS[2], pending_score(prio, seq), ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[6], ARGV[4])
if rdigest ~= '' then redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. rdigest, 'EX', tonumber(ARGV[10])) end
return {1, ARGV[1]}
