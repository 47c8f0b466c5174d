-- schedule: place waiting jobs of one queue on live workers with free slots and publish them
-- (place_jobs in the prelude says how).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] kinds set of the queue, KEYS[10]
--   qworkers set of the queue
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] ack timeout ms for a job stored without one, ARGV[4] queue name,
-- ARGV[5] most placements to make
-- returns a flat array: 1 when jobs are still waiting in the queue afterwards (else 0), then 5
--   entries per placement: job id, worker id, lease, attempt (of the coming start), 1 dispatched or
--   0 taken back (no subscriber on the worker's channel)
local out = {0}
if place_jobs(namespace(ARGV[1]), ARGV[4], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5]), out) then
  out[1] = 1
end
return out
