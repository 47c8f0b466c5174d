-- limits: set a queue's limits (SetQueueLimits), replacing the ones it had; placement reads them
-- (queue_budget in the prelude).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] the queue's settings hash
-- ARGV[1] most jobs placed at once ('' for no limit), ARGV[2] rate: starts per period ('' for no
--   rate limit), ARGV[3] the rate's period in ms
-- A new or changed rate starts with a full bucket.
-- returns 1
local key = KEYS[NS_KEYS + 1]
if ARGV[1] == '' then
  redis.call('HDEL', key, 'max_running')
else
  redis.call('HSET', key, 'max_running', ARGV[1])
end
local rate = redis.call('HMGET', key, 'rate_n', 'rate_ms')
if ARGV[2] == '' then
  redis.call('HDEL', key, 'rate_n', 'rate_ms', 'tokens', 'tokens_at')
elseif rate[1] ~= ARGV[2] or rate[2] ~= ARGV[3] then
  redis.call('HSET', key, 'rate_n', ARGV[2], 'rate_ms', ARGV[3])
  redis.call('HDEL', key, 'tokens', 'tokens_at')
end
return 1
