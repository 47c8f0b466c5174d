-- heartbeat: register or refresh a worker.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms, ARGV[4] expiry ms, ARGV[5] slots,
-- ARGV[6] queues (comma-separated), ARGV[7] kinds (comma-separated, '' = any),
-- ARGV[8] host, ARGV[9] pid, ARGV[10] off ('1' = take no new jobs: draining or unsubscribed),
-- ARGV[11] instance token (random per worker process), ARGV[12] labels (sorted "name=value" pairs
--   joined by ','; '' or absent: none)
-- returns {registered, job id, queue, new state, ...}: registered is 1 when the worker was not
-- registered (first beat, or evicted meanwhile), else 0. When the id is still registered by an
-- earlier process (another instance token: it crashed and this one restarted under its id), that
-- registration is evicted first, as if its heartbeat had expired; the jobs it held follow as
-- {job id, queue, new state} triples.
local ns, w = namespace(ARGV[1]), ARGV[2]
local wk, jobs_key = KEYS[NS_KEYS + 1], KEYS[OWN_KEYS]
local out = {0}
local instance = redis.call('HGET', wk, 'instance')
if instance and instance ~= ARGV[11] then
  evict_worker(ns, w, ARGV[3], false, out)
  instance = nil
end
if not instance then
  out[1] = 1
  redis.call('HSET', wk, 'since', ARGV[3], 'instance', ARGV[11])
end
redis.call('HSET', wk, 'slots', ARGV[5], 'used', redis.call('SCARD', jobs_key),
  'queues', ARGV[6], 'kinds', ARGV[7], 'host', ARGV[8], 'pid', ARGV[9], 'off', ARGV[10],
  'seen', ARGV[3], 'expires', ARGV[4], 'labels', ARGV[12] or '')
redis.call('ZADD', ns.workers, tonumber(ARGV[4]), w)
for q in string.gmatch(ARGV[6], '[^,]+') do redis.call('SADD', qworkers_key(ns.P, q), w) end
return out
