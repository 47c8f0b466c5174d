-- finish_many: finish for several jobs of one worker in one call (each exactly as finish); the
-- events of the outcomes it recorded go out as one JobEvents message.
-- KEYS[1] results channel, then KEYS[1+i] job hash of job i (i from 1)
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms, then 8 per job i, from a = 8i - 4:
--   job id, lease, terminal state, result (Value bytes), output bytes, error code, error message,
--   JobEvents bytes holding its terminal event
-- returns an array with finish's code (1 recorded, 2 already recorded, 0 stale, -1 missing) for
-- each job, in order; an error reply, with nothing written, when any state is not terminal
for i = 1, #KEYS - 1 do
  if not is_terminal(tonumber(ARGV[8 * i - 2])) then
    return redis.error_reply('ERR finish needs a terminal state')
  end
end
local out, events = {}, {}
for i = 1, #KEYS - 1 do
  local a = 8 * i - 4
  out[i] = record_outcome(ARGV[1], KEYS[1 + i], ARGV[2], ARGV[3], {
    job_id = ARGV[a], lease = ARGV[a + 1], state = tonumber(ARGV[a + 2]), result = ARGV[a + 3],
    output = ARGV[a + 4], code = ARGV[a + 5], message = ARGV[a + 6]})
  if out[i] == 1 then events[#events + 1] = ARGV[a + 7] end
end
if #events > 0 then redis.call('PUBLISH', KEYS[1], table.concat(events)) end
return out
