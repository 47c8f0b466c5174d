-- pause: pause or resume a queue (PauseQueue, ResumeQueue): placement leaves a paused queue's jobs
-- waiting (place_jobs and finish_many's refill check its 'paused' field).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] the queue's settings hash
-- ARGV[1] '1' pause, '0' resume
-- returns 1 when the queue was already so (nothing changed), else 0
local key, pause = KEYS[NS_KEYS + 1], ARGV[1] == '1'
local was = redis.call('HGET', key, 'paused') == '1'
if was == pause then return 1 end
if pause then
  redis.call('HSET', key, 'paused', '1')
else
  redis.call('HDEL', key, 'paused')
end
return 0
