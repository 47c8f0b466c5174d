-- finish_many: finish for several jobs of one worker in one call (each exactly as finish, retries
-- included); the
-- events of the outcomes it recorded go out as one JobEvents message (several when they pass 1 MB).
-- Then, for each queue in which it freed a slot, it refills this worker's free slots with waiting
-- jobs, so a busy worker refills without waiting for a gateway; other workers' free slots are the
-- gateways' (and their own finishes') to fill. Up to the take budget (ARGV[7]; no more than the
-- outcomes it recorded, and only for the worker's current registration) those jobs are started at
-- once on the worker's behalf and returned instead of dispatched (the worker runs them without a
-- start call); slots beyond the budget are filled by dispatch (place_jobs in the prelude).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set,
--   then KEYS[10+i] job hash of job i (i from 1)
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] instance token of the worker's registration,
--   ARGV[4] now ms, ARGV[5] most placements per queue (0: place none), ARGV[6] ack timeout ms for a
--   job stored without one, ARGV[7] most jobs to start and return (0: dispatch them instead),
--   then 8 per job i, from a = 8i: job id, lease, terminal state, result (Value bytes, or a NUL byte
--   and flags when values were written apart: see record_outcome in the prelude), output
--   bytes, error code, error message, JobEvents bytes holding its terminal event
-- returns {codes, placements, taken}: codes an array with finish's code (1 recorded, 2 already
--   recorded, 0 stale, -1 missing) for each job, in order; placements a flat array as schedule
--   returns them after its first entry (5 per placement, taken jobs included); taken the
--   DispatchJobs encoding of the jobs it started (empty when none), and of the jobs an earlier call
--   with these outcomes started that still run on this worker. An error reply, with nothing
--   written, when any state is not terminal.
local ns = namespace(ARGV[1])
local worker, now, now_text = ARGV[2], tonumber(ARGV[4]), ARGV[4]  -- text for redis.call (see STATE_TEXT)
local jobs = #KEYS - OWN_KEYS

-- Starts up to `most` waiting jobs of `queue` on `worker` at once, as start would on its behalf:
-- RUNNING, no acknowledgement deadline, nothing on the dispatch channel; their DISPATCHED and
-- RUNNING events are published. Appends their DispatchJob encodings to `taken` and 5 entries per
-- job to `out` (report_placements). Returns true when jobs are still waiting in the queue.
local function take_jobs(queue, most, out, taken)
  local budget, tokens = queue_budget(ns, queue, now)
  if budget < 1 then return true end
  most = math.min(most, budget)
  local waiting = waiting_kinds(ns, queue)
  if #waiting == 0 then return false end
  local cands, free = candidates(ns, queue, now, worker)
  if free == 0 then return true end
  local placed = assign(ns, queue, waiting, cands, free, most, now)
  spend_tokens(ns, queue, tokens, #placed, now)
  local events, ts = {}, pb_timestamp(now)
  local e = PB.JobEvent
  local dispatched, running = pb_int(e.state, DISPATCHED), pb_int(e.state, RUNNING)
  local tail = pb_bytes(e.worker_id, worker) .. pb_bytes(e.time, ts)
  for _, p in ipairs(placed) do
    redis.call('HSET', job_key(ns.P, p.id), 'state', STATE_TEXT[RUNNING], 'worker', p.worker,
      'lease', string.format('%.0f', p.lease), 'attempt', p.attempt, 'started', now_text, 'updated', now_text)
    taken[#taken + 1] = {id = p.id, d = pb_bytes(PB.DispatchJobs.jobs,
      pb_dispatch(p.id, p.lease, p.attempt, p.spec, p.timeout_ms))}
    p.reached = true
    -- its DISPATCHED and RUNNING events, as pb_event encodes them (they differ in state only)
    local head = pb_bytes(e.job_id, p.id) .. pb_bytes(e.queue, queue) .. pb_bytes(e.kind, p.kind)
    local rest = pb_int(e.attempt, p.attempt) .. tail
    events[#events + 1] = pb_bytes(PB.JobEvents.events, head .. dispatched .. rest)
    events[#events + 1] = pb_bytes(PB.JobEvents.events, head .. running .. rest)
  end
  report_placements(placed, out)
  publish_parts(ns.results, events)
  return still_waiting(ns, queue, waiting)
end

for i = 1, jobs do
  if not is_terminal(tonumber(ARGV[8 * i + 2])) then
    return redis.error_reply('ERR finish needs a terminal state')
  end
end
local codes, events, freed, seen, finished, again = {}, {}, {}, {}, {}, {}
local unbooked = {}  -- per queue, the recorded jobs to take off its running set
for i = 1, jobs do
  local a = 8 * i
  local code, queue, refill, retry_event = record_outcome(ns, KEYS[OWN_KEYS + i], worker, ARGV[4], {
    lease = ARGV[a + 1], state = tonumber(ARGV[a + 2]), result = ARGV[a + 3],
    output = ARGV[a + 4], code = ARGV[a + 5], message = ARGV[a + 6], unbooked = unbooked}, ARGV[a])
  codes[i] = code
  if code == 2 and refill then again[#again + 1] = refill end
  if code == 1 then
    events[#events + 1] = retry_event or ARGV[a + 7]
    finished[#finished + 1] = ARGV[a]
    if not seen[queue] then
      seen[queue] = true
      freed[#freed + 1] = queue
    end
  end
end
for queue, ids in pairs(unbooked) do call_chunked('SREM', running_key(ns.P, queue), ids, 1000) end
release_slots(ns, worker, finished)
publish_parts(ns.results, events)
local placements, most, take = {}, tonumber(ARGV[5]), math.min(tonumber(ARGV[7]), #finished)
if take > 0 and not registered_instance(ns, worker, ARGV[3]) then take = 0 end
local taken = {}
if most > 0 then
  for _, queue in ipairs(freed) do
    local left, waiting = most, true
    if #taken < take then
      local before = #taken
      waiting = take_jobs(queue, math.min(most, take - #taken), placements, taken)
      left = most - (#taken - before)
    end
    if waiting and left > 0 then  -- free slots beyond the budget: dispatched as usual
      place_jobs(ns, queue, now, tonumber(ARGV[6]), left, placements, worker)
    end
  end
end
-- Each taken job is noted on a job whose slot it took, so that a repeated call after a lost reply
-- (its outcomes answered 2) returns the taken jobs again while they still run here unseen.
local out = {}
for i, t in ipairs(taken) do
  redis.call('HSET', job_key(ns.P, finished[i]), 'refill', t.id)
  out[i] = t.d
end
for _, id in ipairs(again) do
  local jk = job_key(ns.P, id)
  local j = redis.call('HMGET', jk, 'state', 'worker', 'lease', 'attempt', 'timeout_ms')
  if tonumber(j[1]) == RUNNING and j[2] == worker then
    local spec = spec_to_carry(jk)
    out[#out + 1] = pb_bytes(PB.DispatchJobs.jobs, pb_dispatch(id, tonumber(j[3]), tonumber(j[4]), spec, tonumber(j[5])))
  end
end
return {codes, placements, table.concat(out)}
