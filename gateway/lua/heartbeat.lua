-- heartbeat: register or refresh a worker.
-- KEYS[1] workers zset, KEYS[2] worker hash, KEYS[3] worker jobs set
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms, ARGV[4] expiry ms, ARGV[5] slots,
-- ARGV[6] queues (comma-separated), ARGV[7] kinds (comma-separated, '' = any),
-- ARGV[8] host, ARGV[9] pid, ARGV[10] off ('1' = take no new jobs: draining or unsubscribed)
-- returns 1 newly registered (or registered again after being evicted), 0 refreshed
local P, w = ARGV[1], ARGV[2]
local new = redis.call('EXISTS', KEYS[2]) == 0
if new then redis.call('HSET', KEYS[2], 'since', ARGV[3]) end
redis.call('HSET', KEYS[2], 'slots', ARGV[5], 'used', redis.call('SCARD', KEYS[3]),
  'queues', ARGV[6], 'kinds', ARGV[7], 'host', ARGV[8], 'pid', ARGV[9], 'off', ARGV[10],
  'seen', ARGV[3], 'expires', ARGV[4])
redis.call('ZADD', KEYS[1], tonumber(ARGV[4]), w)
for q in string.gmatch(ARGV[6], '[^,]+') do redis.call('SADD', P .. 'qworkers:' .. q, w) end
if new then return 1 end
return 0
