-- start: a worker acknowledges a dispatch and starts running it (also publishes RUNNING).
-- KEYS[1] job hash, KEYS[2] acks zset, KEYS[3] results channel
-- ARGV[1] job id, ARGV[2] lease, ARGV[3] worker id, ARGV[4] now ms, ARGV[5] JobEvents bytes
--   holding the RUNNING event
-- returns 1 running (also when this placement was already started: a retried call after a lost
-- reply), 0 stale (lease superseded, cancelled, or not this worker's), -1 missing
local code, changed = start_job(KEYS[1], ARGV[2], ARGV[3], ARGV[4])
if changed then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[5])
end
return code
