-- reap: settle the jobs of workers whose heartbeat expired and of dispatches never acknowledged.
-- KEYS[1..8] the namespace's keys (see the prelude)
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] most workers/dispatches per call
-- returns a flat array of {job id, queue, new state} triples
local ns, now, limit = namespace(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local out = {}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', ns.workers, '-inf', now, 'LIMIT', 0, limit)) do
  evict_worker(ns, w, now, false, out)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns.acks, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', ns.acks, id)
  local jk = job_key(ns.P, id)
  local j = redis.call('HMGET', jk, 'state', 'worker')
  if tonumber(j[1]) == DISPATCHED then
    release_slot(ns, j[2], id)
    out[#out + 1], out[#out + 2], out[#out + 3] = id, requeue(ns, jk, id, now, false), QUEUED
  end
end
return out
