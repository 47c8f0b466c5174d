-- submit: store a batch of new jobs and queue them, all or none; then place what can run now on
-- free worker slots (place_jobs in the prelude) for each queue it added jobs to.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] the batch hash (any key when the call
--   opens no batch: then untouched), KEYS[10] the set of every queue that has had jobs, then 5 per
--   job i (from 0): KEYS[11+5i] job hash, KEYS[12+5i] pending zset of its queue and kind,
--   KEYS[13+5i] idempotency string (any key when the job has no idempotency key), KEYS[14+5i] kinds
--   set of its queue, KEYS[15+5i] unique string (any key when the job has no unique key: then
--   untouched)
-- Each stored job is listed in its queue's jobs zset, scored now * 1000 + seq % 1000 (submission
-- order, for ListJobs), which forgets the jobs that expired: each call looks at as many entries as
-- it stores, among those older than the shortest retention of its jobs in that queue (younger ones
-- cannot have expired), from where the last call stopped (the queue's 'trim_at'), round and round.
-- ARGV[1] now ms, ARGV[2] idempotency ttl s, ARGV[3] most queues with waiting jobs, ARGV[4] most
--   kinds with waiting jobs per queue, ARGV[5] key prefix, ARGV[6] ack timeout ms (stored as the
--   job's 'ack': how long a worker has to start it once dispatched), ARGV[7] most placements per
--   queue (0: place none), ARGV[8] batch id or '' (with one, the new jobs of the call form a batch:
--   its hash counts them, each job's 'batch' field names it; see count_in_batch), ARGV[9] the
--   batch's callback (SubmitJobRequest bytes) or '',
--   then 16 per job i: ARGV[10+16i] job id, spec (JobSpec bytes; '' when it came apart: see below), queue, kind, priority, max attempts,
--   timeout ms, request digest or '', due ms (0: at once; a job due later is stored SCHEDULED in the
--   delayed zset instead of its queue), backoff ("initial,max,multiplier", ms: see backoff_ms),
--   retention s (how long it is kept once finished: its 'ttl'), dead-letter retention s (once
--   FAILED: its 'dttl'), unique digest or '' (with one, the unique string holds the job's id while it
--   has not finished: see finish_job), placement group or '' (a job that requires worker labels
--   waits in the group "<kind>|<labels>": its pending zset and its entry in the kinds set are the
--   group's, and its 'group' field names it; see group_of), dependencies (the ids of the jobs it
--   depends on, joined by ','; '': none), concurrency key or '' (with one, its 'ckey' field names
--   it, and the job waits in its key's line: see key_next)
-- returns {0, placements, visited, code, id, code, id, ...}: placements a flat array as schedule
--   returns them after its first entry (5 entries per placement), visited a flat array of
--   queue name, 1 when jobs still wait in it afterwards (else 0), for each queue it placed on; then
--   per job, 1 stored (or already stored by this very call: a
--   resend after a lost reply leaves the job as it is now) or 2 the same request was seen before
--   (the original id); or, with nothing stored: {-2, i, id} job i's idempotency key was used for a
--   different request (by job id), {-3, i} job i would add a queue over the limit, {-4, i} job i
--   would add a kind to its queue over the limit, {-5, i, id} job i's unique key is held by job id
--   (unfinished) or by an earlier job of this call, {-6, i, id} job i depends on job id, which does not
--   exist (i from 0). A stored job with dependencies answers 3 when it is BLOCKED (some have not
--   ended: it waits in their dependents sets), 4 when one of them has already ended FAILED or
--   CANCELLED (it is FAILED at once, DEPENDENCY_FAILED); with all of them SUCCEEDED it is stored as
--   any other (1).
-- A spec over 4 KiB comes apart, so that it never enters Lua (every byte that does costs about a
-- ns): the caller writes it into the job hash's 'spec' field itself, in the same MULTI/EXEC just
-- before this call, and passes ''. A stored job is one whose hash has a 'state'; a job this call
-- does not store (refused, or an idempotent repeat of another) leaves no hash behind.
local ns = namespace(ARGV[5])
local n = (#KEYS - NS_KEYS - 2) / 5
local A, B = 16, 10  -- ARGV entries per job, from ARGV[B]

local function drop_unstored()
  for i = 0, n - 1 do
    if ARGV[B + A * i + 1] == '' then
      local jk = KEYS[NS_KEYS + 3 + 5 * i]
      if redis.call('HEXISTS', jk, 'state') == 0 then redis.call('DEL', jk) end
    end
  end
end

local function refuse(reply)
  drop_unstored()
  return reply
end

local now, idem_ttl = ARGV[1], tonumber(ARGV[2])
local max_queues, max_kinds = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {0, {}, {}}
local fresh = {}  -- indexes of the jobs to store
local seen_queues, queue_count = {}, nil  -- queues and kinds checked once per call
local seen_kinds, kind_counts = {}, {}
local seen_unique = {}

for i = 0, n - 1 do
  local k, a = NS_KEYS + 3 + 5 * i, B + A * i
  local id, queue, kind, rdigest = ARGV[a], ARGV[a + 2], ARGV[a + 3], ARGV[a + 7]
  if ARGV[a + 13] ~= '' then kind = ARGV[a + 13] end  -- its placement group counts as a kind
  local code, stored_id = 1, id
  -- Every request gets fresh job ids, so a stored job means this call is a resend.
  if redis.call('HEXISTS', KEYS[k], 'state') == 0 then
    local existing = rdigest ~= '' and redis.call('GET', KEYS[k + 2])
    if existing then
      local old_id, old = string.match(existing, '^(%S+) (%S+)$')
      if old ~= rdigest then return refuse({-2, i, old_id or ''}) end
      code, stored_id = 2, old_id
    else
      fresh[#fresh + 1] = i
      for dep in string.gmatch(ARGV[a + 14], '[^,]+') do
        if redis.call('HEXISTS', job_key(ns.P, dep), 'state') == 0 then return refuse({-6, i, dep}) end
      end
      local unique = ARGV[a + 12]
      if unique ~= '' then
        local holder = seen_unique[unique] or redis.call('GET', KEYS[k + 4])
        if holder then return refuse({-5, i, holder}) end
        seen_unique[unique] = id
      end
      if not seen_queues[queue] then
        if redis.call('SISMEMBER', ns.queues, queue) == 0 then
          queue_count = (queue_count or redis.call('SCARD', ns.queues)) + 1
          if queue_count > max_queues then return refuse({-3, i}) end
        end
        seen_queues[queue] = true
      end
      local qk = queue .. ':' .. kind
      if not seen_kinds[qk] then
        if redis.call('SISMEMBER', KEYS[k + 3], kind) == 0 then
          kind_counts[queue] = (kind_counts[queue] or redis.call('SCARD', KEYS[k + 3])) + 1
          if kind_counts[queue] > max_kinds then return refuse({-4, i}) end
        end
        seen_kinds[qk] = true
      end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = stored_id
end

local seq = #fresh > 0 and redis.call('INCRBY', ns.seq, #fresh) - #fresh or 0
local batch = ARGV[8] ~= '' and #fresh > 0 and redis.call('EXISTS', KEYS[NS_KEYS + 1]) == 0
if batch then
  local ids = {}
  for _, i in ipairs(fresh) do ids[#ids + 1] = ARGV[B + A * i] end
  redis.call('HSET', KEYS[NS_KEYS + 1], 'total', #fresh, 'succeeded', 0, 'failed', 0, 'cancelled', 0,
    'created', now, 'callback', ARGV[9], 'queue', ARGV[B + A * fresh[1] + 2], 'jobs', table.concat(ids))
end

-- A job's dependencies: nil when they have all SUCCEEDED; else 'blocked' (waiting for some, each
-- noting the job in its dependents set) or the failed one's id and state.
local function depend(id, deps)
  local waiting, failed, how = {}, nil, nil
  for dep in string.gmatch(deps, '[^,]+') do
    local st = tonumber(redis.call('HGET', job_key(ns.P, dep), 'state'))
    if st == FAILED or st == CANCELLED then
      failed, how = dep, st
    elseif st ~= SUCCEEDED then
      waiting[#waiting + 1] = dep
    end
  end
  if failed then return failed, how end
  if #waiting == 0 then return nil end
  for _, dep in ipairs(waiting) do
    redis.call('SADD', dependents_key(ns.P, dep), id)
    redis.call('HSET', job_key(ns.P, dep), 'dependents', '1')
  end
  return 'blocked', #waiting
end

local pending, pending_keys = {}, {}  -- per pending zset: score, id pairs
local listed, listed_queues = {}, {}  -- per queue: score, id pairs for its jobs zset
local horizon = {}  -- per queue: the shortest retention (s) of the call's jobs
local keyed, keyed_seen = {}, {}  -- the concurrency keys that had jobs stored in line: {queue, key}, once each
local later = {}  -- indexes of the jobs stored SCHEDULED
for _, i in ipairs(fresh) do
  local k, a = NS_KEYS + 3 + 5 * i, B + A * i
  local id, queue, kind, prio, rdigest = ARGV[a], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 7]
  local group = ARGV[a + 13] ~= '' and ARGV[a + 13] or kind
  local due = tonumber(ARGV[a + 8])
  seq = seq + 1
  if not listed[queue] then
    listed[queue] = {}
    listed_queues[#listed_queues + 1] = queue
  end
  table.insert(listed[queue], tonumber(now) * 1000 + seq % 1000)
  table.insert(listed[queue], id)
  horizon[queue] = math.min(horizon[queue] or math.huge, tonumber(ARGV[a + 10]))
  local spec = ARGV[a + 1]  -- '': written apart (then 'queue' is set twice instead)
  redis.call('HSET', KEYS[k], spec ~= '' and 'spec' or 'queue', spec ~= '' and spec or queue, 'queue', queue, 'kind', kind, 'prio', ARGV[a + 4],
    'seq', seq, 'state', STATE_TEXT[QUEUED], 'attempt', '0', 'max_attempts', ARGV[a + 5], 'timeout_ms', ARGV[a + 6],
    'worker', '', 'lease', '0', 'created', now, 'updated', now, 'ack', ARGV[6], 'backoff', ARGV[a + 9],
    'ttl', ARGV[a + 10], 'dttl', ARGV[a + 11])
  if ARGV[a + 12] ~= '' then
    redis.call('HSET', KEYS[k], 'unique', ARGV[a + 12])
    redis.call('SET', KEYS[k + 4], id)
  end
  if group ~= kind then redis.call('HSET', KEYS[k], 'group', group) end
  local ckey = ARGV[a + 15]
  if ckey ~= '' then redis.call('HSET', KEYS[k], 'ckey', ckey) end
  if batch then redis.call('HSET', KEYS[k], 'batch', ARGV[8]) end
  if rdigest ~= '' then redis.call('SET', KEYS[k + 2], id .. ' ' .. rdigest, 'EX', idem_ttl) end
  local blocker, detail = nil, nil
  if ARGV[a + 14] ~= '' then blocker, detail = depend(id, ARGV[a + 14]) end
  if blocker == 'blocked' then
    redis.call('HSET', KEYS[k], 'state', STATE_TEXT[BLOCKED], 'deps_left', detail)
    count(ns, queue, 'n_blocked', 1)
    if due > tonumber(now) then redis.call('HSET', KEYS[k], 'due', due) end
    later[i] = true
    out[4 + 2 * i] = 3
  elseif blocker then
    local why = 'job ' .. blocker .. ' it depends on ended ' .. (detail == FAILED and 'FAILED' or 'CANCELLED')
    finish_job(ns, KEYS[k], id, queue, FAILED, 'DEPENDENCY_FAILED', why, now)
    publish_parts(ns.results, {pb_events_of(id, {queue = queue, kind = kind, attempt = 0,
      err_code = 'DEPENDENCY_FAILED', err_msg = why}, FAILED, tonumber(now))})
    later[i] = true
    out[4 + 2 * i] = 4
  elseif due > tonumber(now) then
    schedule_job(ns, KEYS[k], id, queue, due, now)
    later[i] = true
  elseif ckey ~= '' then
    count(ns, queue, 'n_lined', redis.call('ZADD', ckey_jobs_key(ns.P, queue, ckey), pending_score(prio, seq), id))
    if not keyed_seen[queue .. ':' .. ckey] then
      keyed_seen[queue .. ':' .. ckey] = true
      keyed[#keyed + 1] = {queue, ckey}
    end
  else
    local members = pending[KEYS[k + 1]]
    if not members then
      members = {}
      pending[KEYS[k + 1]] = members
      pending_keys[#pending_keys + 1] = KEYS[k + 1]
    end
    members[#members + 1] = pending_score(prio, seq)
    members[#members + 1] = id
    if seen_queues[queue] ~= 'added' then
      redis.call('SADD', ns.queues, queue)
      seen_queues[queue] = 'added'
    end
    if seen_kinds[queue .. ':' .. group] ~= 'added' then
      redis.call('SADD', KEYS[k + 3], group)
      seen_kinds[queue .. ':' .. group] = 'added'
    end
  end
end
for _, key in ipairs(pending_keys) do call_chunked('ZADD', key, pending[key], 1000) end
for _, queue in ipairs(listed_queues) do
  local jobs = jobs_key(ns.P, queue)
  call_chunked('ZADD', jobs, listed[queue], 1000)
  redis.call('SADD', KEYS[NS_KEYS + 2], queue)
  local qk = queue_key(ns.P, queue)
  local from = redis.call('HGET', qk, 'trim_at') or '0'
  local older = string.format('(%.0f', (tonumber(now) - horizon[queue] * 1000) * 1000)
  local rows = redis.call('ZRANGEBYSCORE', jobs, '(' .. from, older, 'WITHSCORES', 'LIMIT', 0, #listed[queue] / 2)
  local gone = {}
  for r = 1, #rows, 2 do
    if redis.call('EXISTS', job_key(ns.P, rows[r])) == 0 then gone[#gone + 1] = rows[r] end
  end
  call_chunked('ZREM', jobs, gone, 1000)
  local at = #rows < #listed[queue] and '0' or rows[#rows]
  if at ~= from then redis.call('HSET', qk, 'trim_at', at) end
end
for _, qk in ipairs(keyed) do key_next(ns, qk[1], qk[2], now) end
if #fresh < n then drop_unstored() end  -- idempotent repeats of earlier jobs

local placed_queues = {}
if tonumber(ARGV[7]) <= 0 then fresh = {} end
for _, i in ipairs(fresh) do
  local queue = ARGV[B + A * i + 2]
  if not placed_queues[queue] and not later[i] then
    placed_queues[queue] = true
    local left = place_jobs(ns, queue, tonumber(now), tonumber(ARGV[6]), tonumber(ARGV[7]), out[2])
    table.insert(out[3], queue)
    table.insert(out[3], left and 1 or 0)
  end
end
return out
