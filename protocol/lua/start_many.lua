-- start_many: start for several dispatches of one worker in one call (each exactly as start);
-- the RUNNING events of the jobs it started go out as one JobEvents message (several when they pass 1 MB).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set,
--   then KEYS[10+i] job hash of job i (i from 1)
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] instance token of the worker's registration,
--   ARGV[4] now ms, then 3 per job i: ARGV[3i+2] job id, ARGV[3i+3] lease, ARGV[3i+4] JobEvents
--   bytes holding its RUNNING event
-- returns an array with start's code (1 running, 0 stale, -1 missing) for each job, in order
local ns = namespace(ARGV[1])
local out, events, started = {}, {}, {}
for i = 1, #KEYS - OWN_KEYS do
  local a = 3 * i + 2
  local code, changed = start_job(ns, KEYS[OWN_KEYS + i], ARGV[a + 1], ARGV[2], ARGV[3], ARGV[4])
  out[i] = code
  if changed then
    events[#events + 1] = ARGV[a + 2]
    started[#started + 1] = ARGV[a]
  end
end
call_chunked('ZREM', ns.acks, started, 1000)
publish_parts(ns.results, events)
return out
