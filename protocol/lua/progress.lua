-- progress: a worker records how far its running jobs have come, and publishes it.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set,
--   then KEYS[11+i] the job hash of report i (from 0)
-- ARGV[1] key prefix, ARGV[2] worker id, then 3 per report i: ARGV[3+3i] lease, jobgate.v1.Progress
--   bytes, JobEvents bytes holding the job's progress event (RUNNING, with `progress`)
-- A report is recorded (the job's 'progress' field) only while the job is RUNNING under that lease on
-- this worker; the events of the recorded reports are published together on the results channel.
-- returns the number of reports recorded
local ns = namespace(ARGV[1])
local events = {}
for i = 0, #KEYS - OWN_KEYS - 1 do
  local jk, a = KEYS[OWN_KEYS + 1 + i], 3 + 3 * i
  local j = redis.call('HMGET', jk, 'state', 'lease', 'worker')
  if tonumber(j[1]) == RUNNING and j[2] == ARGV[a] and j[3] == ARGV[2] then
    redis.call('HSET', jk, 'progress', ARGV[a + 1])
    events[#events + 1] = ARGV[a + 2]
  end
end
publish_parts(ns.results, events)
return #events
