-- finish_many: finish for several jobs of one worker in one call (each exactly as finish); the
-- events of the outcomes it recorded go out as one JobEvents message (several when they pass 1 MB).
-- Then, for each queue in which it freed a slot, it places waiting jobs on this worker's free slots
-- as schedule does (place_jobs in the prelude), so a busy worker refills without waiting for a
-- gateway; other workers' free slots are the gateways' (and their own finishes') to fill. With a
-- take budget (ARGV[6] > 0), up to that many of those jobs (and no more than the outcomes it
-- recorded) are started at once on the worker's behalf and returned instead of dispatched (the
-- worker runs them without a start call); slots beyond the budget are filled by dispatch.
-- KEYS[1] results channel, then KEYS[1+i] job hash of job i (i from 1)
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms, ARGV[4] most placements per queue
--   (0: place none), ARGV[5] ack timeout ms for a job stored without one, ARGV[6] most jobs to
--   start and return (0: dispatch them instead), then 8 per job i, from a = 8i - 1: job id, lease,
--   terminal state, result (Value bytes), output bytes, error code, error message, JobEvents bytes
--   holding its terminal event
-- returns {codes, placements, taken}: codes an array with finish's code (1 recorded, 2 already
--   recorded, 0 stale, -1 missing) for each job, in order; placements a flat array as schedule
--   returns them after its first entry (5 per placement); taken the DispatchJobs encoding of the
--   jobs it started (empty when none), and of the jobs an earlier call with these outcomes started
--   that still run on this worker. An error reply, with nothing written, when any state is
--   not terminal.
for i = 1, #KEYS - 1 do
  if not is_terminal(tonumber(ARGV[8 * i + 1])) then
    return redis.error_reply('ERR finish needs a terminal state')
  end
end
local codes, events, freed, seen, finished, again = {}, {}, {}, {}, {}, {}
for i = 1, #KEYS - 1 do
  local a = 8 * i - 1
  local code, queue, refill = record_outcome(KEYS[1 + i], ARGV[2], ARGV[3], {
    lease = ARGV[a + 1], state = tonumber(ARGV[a + 2]), result = ARGV[a + 3],
    output = ARGV[a + 4], code = ARGV[a + 5], message = ARGV[a + 6]})
  codes[i] = code
  if code == 2 and refill then again[#again + 1] = refill end
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
local placements, most, take = {}, tonumber(ARGV[4]), math.min(tonumber(ARGV[6]), #finished)
local taken = {}
if most > 0 then
  for _, queue in ipairs(freed) do
    local left, waiting = most, true
    if #taken < take then
      local before = #taken
      waiting = place_jobs(ARGV[1], queue, tonumber(ARGV[3]), tonumber(ARGV[5]), math.min(most, take - #taken),
        placements, ARGV[2], taken)
      left = most - (#taken - before)
    end
    if waiting and left > 0 then  -- free slots beyond the budget: dispatched as usual
      place_jobs(ARGV[1], queue, tonumber(ARGV[3]), tonumber(ARGV[5]), left, placements, ARGV[2])
    end
  end
end
-- Each taken job is noted on a job whose slot it took, so that a repeated call after a lost reply
-- (its outcomes answered 2) returns the taken jobs again while they still run here unseen.
local out = {}
for i, t in ipairs(taken) do
  redis.call('HSET', ARGV[1] .. 'job:' .. finished[i], 'refill', t.id)
  out[i] = t.d
end
for _, id in ipairs(again) do
  local j = redis.call('HMGET', ARGV[1] .. 'job:' .. id, 'state', 'worker', 'lease', 'attempt', 'spec', 'timeout_ms')
  if tonumber(j[1]) == RUNNING and j[2] == ARGV[2] then
    out[#out + 1] = pb_bytes(1, pb_dispatch(id, tonumber(j[3]), tonumber(j[4]), j[5], tonumber(j[6])))
  end
end
return {codes, placements, table.concat(out)}
