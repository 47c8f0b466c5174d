-- finish: a worker records the outcome of a running job and publishes it.
-- KEYS[1] job hash, KEYS[2] results channel
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] lease, ARGV[4] worker id, ARGV[5] terminal state,
-- ARGV[6] now ms, ARGV[7] result (google.protobuf.Value bytes), ARGV[8] output bytes,
-- ARGV[9] error code, ARGV[10] error message, ARGV[11] JobEvent bytes
-- returns {1, receivers} recorded, {2} this very outcome was already recorded by this script for
--         this placement (a retried call after a lost reply), {0} stale (superseded attempt, or the
--         job was settled by a gateway or an eviction), {-1} missing
local P = ARGV[1]
local j = redis.call('HMGET', KEYS[1], 'state', 'lease', 'worker')
if not j[1] then return {-1} end
local state = tonumber(ARGV[5])
if not is_terminal(state) then return redis.error_reply('ERR finish needs a terminal state') end
if j[2] ~= ARGV[3] or j[3] ~= ARGV[4] then return {0} end
-- 'recorded' names the lease whose outcome this script wrote; reap, leave and cancel never set it
if tonumber(j[1]) == state and redis.call('HGET', KEYS[1], 'recorded') == ARGV[3] then return {2} end
if tonumber(j[1]) ~= RUNNING then return {0} end
redis.call('HSET', KEYS[1], 'result', ARGV[7], 'output', ARGV[8], 'recorded', ARGV[3])
finish_job(KEYS[1], state, ARGV[9], ARGV[10], ARGV[6])
release_slot(P, ARGV[4], ARGV[2])
return {1, redis.call('PUBLISH', KEYS[2], ARGV[11])}
