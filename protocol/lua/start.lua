-- start: a worker acknowledges a dispatch and starts running it (also publishes RUNNING).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set,
--   KEYS[11] job hash
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] lease, ARGV[4] worker id, ARGV[5] instance token of
--   the worker's registration (as its heartbeat sent it), ARGV[6] now ms, ARGV[7] JobEvents bytes
--   holding the RUNNING event
-- returns 1 running (also when this placement was already started: a retried call after a lost
-- reply), 0 stale (lease superseded, cancelled, not this worker's, or placed on an earlier
-- registration of its id than the caller's), -1 missing
local ns = namespace(ARGV[1])
local code, changed = start_job(ns, KEYS[OWN_KEYS + 1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if changed then
  redis.call('ZREM', ns.acks, ARGV[2])
  redis.call(PUBLISH, ns.results, ARGV[7])
end
return code
