-- finish_many: finish for several jobs of one worker in one call (each exactly as finish); the
-- events of the outcomes it recorded go out as one JobEvents message (several when they pass 1 MB).
-- Then, for each queue in which it freed a slot, it places waiting jobs on this worker's free slots
-- as schedule does (place_jobs in the prelude), so a busy worker refills without waiting for a
-- gateway; other workers' free slots are the gateways' (and their own finishes') to fill.
-- KEYS[1] results channel, then KEYS[1+i] job hash of job i (i from 1)
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms, ARGV[4] most placements per queue
--   (0: place none), ARGV[5] ack timeout ms for a job stored without one, then 8 per job i, from
--   a = 8i - 2: job id, lease, terminal state, result (Value bytes), output bytes, error code,
--   error message, JobEvents bytes holding its terminal event
-- returns {codes, placements}: codes an array with finish's code (1 recorded, 2 already recorded,
--   0 stale, -1 missing) for each job, in order; placements a flat array as schedule returns them
--   after its first entry (5 per placement). An error reply, with nothing written, when any state
--   is not terminal.
for i = 1, #KEYS - 1 do
  if not is_terminal(tonumber(ARGV[8 * i])) then
    return redis.error_reply('ERR finish needs a terminal state')
  end
end
local codes, events, freed, seen, finished = {}, {}, {}, {}, {}
for i = 1, #KEYS - 1 do
  local a = 8 * i - 2
  local code, queue = record_outcome(KEYS[1 + i], ARGV[2], ARGV[3], {
    lease = ARGV[a + 1], state = tonumber(ARGV[a + 2]), result = ARGV[a + 3],
    output = ARGV[a + 4], code = ARGV[a + 5], message = ARGV[a + 6]})
  codes[i] = code
  if code == 1 then
    events[#events + 1] = ARGV[a + 7]
    finished[#finished + 1] = ARGV[a]
    if not seen[queue] then
      seen[queue] = true
      freed[#freed + 1] = queue
    end
  end
end
release_slots(ARGV[1], ARGV[2], finished)
publish_parts(KEYS[1], events)
local placements = {}
if tonumber(ARGV[4]) > 0 then
  for _, queue in ipairs(freed) do
    place_jobs(ARGV[1], queue, tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[4]), placements, ARGV[2])
  end
end
return {codes, placements}
