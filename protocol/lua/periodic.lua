-- periodic: the state changes of a periodic schedule, all on shard 0. Gateways compute tick times
-- (cron and time zones are theirs); this script keeps a schedule's stored state consistent across
-- gateways: a tick is advanced by exactly one of them (compare and set on the 'next' field).
-- KEYS[1..8] the namespace's keys of shard 0 (see the prelude), KEYS[9] `P schedules` (zset: every
--   schedule name, score 0, listed by name), KEYS[10] `P schedules:due` (zset: name -> next tick ms,
--   schedules not paused), KEYS[11] `P schedule:<name>` (hash), KEYS[12] `P schedule:<name>:runs`
--   (list: the last runs, newest first, jobgate.v1.ScheduleRun bytes)
-- ARGV[1] operation, ARGV[2] name, then per operation:
--   create: ARGV[3] ScheduleSpec bytes, ARGV[4] first tick ms, ARGV[5] now ms
--     returns 1 created, 0 the name is taken (nothing changes)
--   advance: ARGV[3] the tick handled (ms), ARGV[4] the next tick ms, ARGV[5] job id or '',
--     ARGV[6] ScheduleRun bytes
--     returns 1 advanced, 0 the schedule is gone, paused or already past that tick (nothing changes)
--   pause: returns 1 paused (or already paused), 0 missing
--   resume: ARGV[3] the next tick ms; returns 1 resumed (or was not paused: nothing changes), 0 missing
--   delete: returns 1 deleted, 0 missing
--   record: ARGV[3] job id, ARGV[4] ScheduleRun bytes (a run outside the timing, TriggerSchedule):
--     returns 1 recorded (the next tick does not change), 0 missing
local names, due, hash, runs = KEYS[NS_KEYS + 1], KEYS[NS_KEYS + 2], KEYS[NS_KEYS + 3], KEYS[NS_KEYS + 4]
local op, name = ARGV[1], ARGV[2]
local RUNS_KEPT = 10

if op == 'create' then
  if redis.call('EXISTS', hash) == 1 then return 0 end
  redis.call('HSET', hash, 'spec', ARGV[3], 'paused', '0', 'next', ARGV[4], 'created', ARGV[5])
  redis.call('ZADD', names, 0, name)
  redis.call('ZADD', due, ARGV[4], name)
  return 1
end
local s = redis.call('HMGET', hash, 'next', 'paused')
if not s[1] then return 0 end
if op == 'advance' then
  if s[1] ~= ARGV[3] or s[2] == '1' then return 0 end
  redis.call('HSET', hash, 'next', ARGV[4])
  if ARGV[5] ~= '' then redis.call('HSET', hash, 'last_job', ARGV[5]) end
  redis.call('ZADD', due, ARGV[4], name)
  redis.call('LPUSH', runs, ARGV[6])
  redis.call('LTRIM', runs, 0, RUNS_KEPT - 1)
  return 1
elseif op == 'record' then
  redis.call('HSET', hash, 'last_job', ARGV[3])
  redis.call('LPUSH', runs, ARGV[4])
  redis.call('LTRIM', runs, 0, RUNS_KEPT - 1)
  return 1
elseif op == 'pause' then
  redis.call('HSET', hash, 'paused', '1')
  redis.call('ZREM', due, name)
  return 1
elseif op == 'resume' then
  if s[2] == '1' then
    redis.call('HSET', hash, 'paused', '0', 'next', ARGV[3])
    redis.call('ZADD', due, ARGV[3], name)
  end
  return 1
elseif op == 'delete' then
  redis.call('DEL', hash, runs)
  redis.call('ZREM', names, name)
  redis.call('ZREM', due, name)
  return 1
end
return redis.error_reply('ERR periodic: unknown operation ' .. tostring(op))
