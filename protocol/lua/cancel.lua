-- cancel: cancel a job. A queued, scheduled or not yet acknowledged job ends CANCELLED at once; a running one
-- is flagged, its worker is told to stop it, and it is listed in the cancels zset so that gateways
-- tell the worker again until the job ends.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] job hash
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] now ms
-- returns {1, queue} cancelled now, {2, worker id, lease} running: worker must be told,
--         {-1} missing, {-2} already terminal
local ns, jk = namespace(ARGV[1]), KEYS[NS_KEYS + 1]
local j = redis.call('HMGET', jk, 'state', 'queue', 'worker', 'lease', 'kind', 'group', 'ckey')
if not j[1] then return {-1} end
local state = tonumber(j[1])
if is_terminal(state) then return {-2} end
if state == RUNNING then
  redis.call('HSET', jk, 'cancel', '1', 'updated', ARGV[3])
  -- gateways tell the worker again until the job ends, in case this message is lost
  redis.call('ZADD', ns.cancels, ARGV[3], ARGV[2])
  return {2, j[3], j[4]}
end
redis.call('ZREM', pending_key(ns.P, j[2], j[6] or j[5]), ARGV[2])
if j[7] then key_forget(ns, j[2], j[7], ARGV[2], ARGV[3]) end
if state == SCHEDULED then count(ns, j[2], 'n_scheduled', -redis.call('ZREM', ns.delayed, ARGV[2])) end
if state == BLOCKED then count(ns, j[2], 'n_blocked', -1) end
if state == DISPATCHED then
  redis.call('ZREM', ns.acks, ARGV[2])
  release_slot(ns, j[3], ARGV[2])
end
finish_job(ns, jk, ARGV[2], j[2], CANCELLED, 'CANCELLED', 'cancelled by request', ARGV[3])
return {1, j[2]}
