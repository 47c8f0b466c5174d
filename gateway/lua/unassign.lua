-- unassign: a dispatch reached nobody (PUBLISH returned 0); put the job back and stop placing on
-- that worker until its next heartbeat says it is subscribed again.
-- KEYS[1] job hash, KEYS[2] acks zset, KEYS[3] worker hash
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] lease, ARGV[4] worker id, ARGV[5] now ms
-- returns 1 put back, 0 stale (the placement already moved on)
local P = ARGV[1]
local j = redis.call('HMGET', KEYS[1], 'state', 'lease', 'worker')
if tonumber(j[1]) ~= DISPATCHED or j[2] ~= ARGV[3] or j[3] ~= ARGV[4] then return 0 end
release_slot(P, ARGV[4], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
requeue(P, KEYS[1], ARGV[2], ARGV[5], false)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], 'off', '1') end
return 1
