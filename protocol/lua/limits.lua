-- limits: set a queue's limits (SetQueueLimits), replacing the ones it had; placement reads them
-- (queue_budget for the queue's, key_limits for its concurrency keys', in the prelude).
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] the queue's settings hash
-- ARGV[1] most jobs placed at once ('' for no limit), ARGV[2] rate: starts per period ('' for no
--   rate limit), ARGV[3] the rate's period in ms, ARGV[4..6] the same three per concurrency key
-- A new or changed queue rate starts with a full bucket. A key keeps its bucket, and a key at its
-- old max_running_per_key lines up its next job when one of its jobs stops.
-- returns 1
local key = KEYS[NS_KEYS + 1]
local function set(field, value)
  if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end
set('max_running', ARGV[1])
local rate = redis.call('HMGET', key, 'rate_n', 'rate_ms')
if ARGV[2] == '' then
  redis.call('HDEL', key, 'rate_n', 'rate_ms', 'tokens', 'tokens_at')
elseif rate[1] ~= ARGV[2] or rate[2] ~= ARGV[3] then
  redis.call('HSET', key, 'rate_n', ARGV[2], 'rate_ms', ARGV[3])
  redis.call('HDEL', key, 'tokens', 'tokens_at')
end
set('key_max_running', ARGV[4])
set('key_rate_n', ARGV[5])
set('key_rate_ms', ARGV[6])
return 1
