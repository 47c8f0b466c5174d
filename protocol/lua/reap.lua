-- reap: settle the jobs of workers whose heartbeat expired and of dispatches never acknowledged.
-- KEYS[1] workers zset, KEYS[2] acks zset
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] most workers/dispatches per call
-- returns a flat array of {job id, queue, new state} triples
local P, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  evict_worker(P, KEYS[1], KEYS[2], w, now, false, out)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[2], id)
  local jk = P .. 'job:' .. id
  local j = redis.call('HMGET', jk, 'state', 'worker')
  if tonumber(j[1]) == DISPATCHED then
    release_slot(P, j[2], id)
    out[#out + 1], out[#out + 2], out[#out + 3] = id, requeue(P, jk, id, now, false), QUEUED
  end
end
return out
