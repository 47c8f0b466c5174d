-- start: a worker acknowledges a dispatch and starts running it (also publishes RUNNING).
-- KEYS[1] job hash, KEYS[2] acks zset, KEYS[3] results channel
-- ARGV[1] job id, ARGV[2] lease, ARGV[3] worker id, ARGV[4] now ms, ARGV[5] RUNNING JobEvent bytes
-- returns 1 running (also when this placement was already started: a retried call after a lost
-- reply), 0 stale (lease superseded, cancelled, or not this worker's), -1 missing
local j = redis.call('HMGET', KEYS[1], 'state', 'lease', 'worker', 'attempt')
if not j[1] then return -1 end
if j[2] ~= ARGV[2] or j[3] ~= ARGV[3] then return 0 end
if tonumber(j[1]) == RUNNING then return 1 end
if tonumber(j[1]) ~= DISPATCHED then return 0 end
redis.call('HSET', KEYS[1], 'state', RUNNING, 'attempt', tonumber(j[4]) + 1, 'started', ARGV[4],
  'updated', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
