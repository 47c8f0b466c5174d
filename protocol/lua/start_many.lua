-- start_many: start for several dispatches of one worker in one call (each exactly as start);
-- the RUNNING events of the jobs it started go out as one JobEvents message (several when they pass 1 MB).
-- KEYS[1] acks zset, KEYS[2] results channel, then KEYS[2+i] job hash of job i (i from 1)
-- ARGV[1] worker id, ARGV[2] now ms, then 3 per job i: ARGV[3i] job id, ARGV[3i+1] lease,
--   ARGV[3i+2] JobEvents bytes holding its RUNNING event
-- returns an array with start's code (1 running, 0 stale, -1 missing) for each job, in order
local out, events, started = {}, {}, {}
for i = 1, #KEYS - 2 do
  local a = 3 * i
  local code, changed = start_job(KEYS[2 + i], ARGV[a + 1], ARGV[1], ARGV[2])
  out[i] = code
  if changed then
    events[#events + 1] = ARGV[a + 2]
    started[#started + 1] = ARGV[a]
  end
end
call_chunked('ZREM', KEYS[1], started, 1000)
publish_parts(KEYS[2], events)
return out
