-- Shared prelude, prepended to every script by protocol/scripts.py.
-- States (jobgate.v1.JobState): 1 QUEUED, 2 DISPATCHED, 3 RUNNING, 4 SUCCEEDED, 5 FAILED, 6 CANCELLED,
-- 7 SCHEDULED, 8 BLOCKED.
local QUEUED, DISPATCHED, RUNNING, SUCCEEDED, FAILED, CANCELLED, SCHEDULED = 1, 2, 3, 4, 5, 6, 7
local BLOCKED = 8
-- The states as the job hash stores them: a number passed to redis.call is turned into text by
-- sprintf for every call (about 0.35 µs), text is passed as it is.
local STATE_TEXT = {'1', '2', '3', '4', '5', '6', '7', '8'}
-- How messages go out: on a Redis Cluster, protocol/scripts.py registers the scripts with SPUBLISH
-- here (shard channels, which stay on the node of the keys' slot).
local PUBLISH = 'PUBLISH'

-- Keys. Every script but read_events receives the namespace's own keys first, as KEYS[1..8]
-- (protocol/keys.py, Keys.namespace_keys): the queues set, the seq counter, the lease counter, the
-- acks zset, the cancels zset, the workers zset, the results channel and the delayed zset. Keys named after ids a
-- script reads from Redis (a worker of a queue, a kind with jobs waiting, the queue of a finished
-- job) are built by the functions below from the key prefix P (ARGV, e.g. "{jobgate}:"), with the
-- same rules as protocol/keys.py (tests/test_protocol_contract.py holds the two together).
local NS_KEYS = 8
-- The scripts a worker calls (heartbeat, start, finish, their batched forms, leave) receive its own
-- keys next, as KEYS[9..10]: its hash and its jobs set; the job hashes of the call follow.
local OWN_KEYS = NS_KEYS + 2
local function namespace(P)
  return {P = P, queues = KEYS[1], seq = KEYS[2], lease = KEYS[3], acks = KEYS[4], cancels = KEYS[5],
    workers = KEYS[6], results = KEYS[7], delayed = KEYS[8]}
end
local function job_key(P, id) return P .. 'job:' .. id end  -- hash
-- string: a job's result or output ('result', 'output') over 4 KiB, kept apart from its hash
-- (whose 'big_result' or 'big_output' is then '1')
local function apart_key(P, id, field) return P .. 'job:' .. id .. ':' .. field end
-- string: such a value as a worker wrote it for one placement, before its finish call took it
local function staged_key(P, id, field, lease) return P .. 'job:' .. id .. ':' .. field .. ':' .. lease end
local function pending_key(P, queue, kind) return P .. 'pending:' .. queue .. ':' .. kind end  -- zset
local function kinds_key(P, queue) return P .. 'kinds:' .. queue end  -- set
local function qworkers_key(P, queue) return P .. 'qworkers:' .. queue end  -- set
local function worker_key(P, w) return P .. 'worker:' .. w end  -- hash
local function worker_jobs_key(P, w) return P .. 'worker:' .. w .. ':jobs' end  -- set
local function dispatch_channel(P, w) return P .. 'dispatch:' .. w end  -- pub/sub
local function failed_key(P, queue) return P .. 'failed:' .. queue end  -- zset: FAILED job id -> when (ms)
local function queue_key(P, queue) return P .. 'queue:' .. queue end  -- hash: the queue's settings ('paused')
local function unique_key(P, digest) return P .. 'unique:' .. digest end  -- string: the id of the job holding it
local function batch_key(P, id) return P .. 'batch:' .. id end  -- hash: a batch's counts
local function running_key(P, queue) return P .. 'running:' .. queue end  -- set: the queue's placed job ids
local function dependents_key(P, id) return P .. 'dependents:' .. id end  -- set: jobs BLOCKED on job id
local function batches_done_key(P) return P .. 'batches:done' end  -- zset: ended batches awaiting their callback
local function ckey_key(P, queue, key) return P .. 'ckey:' .. queue .. ':' .. key end  -- hash: a concurrency key's state
local function jobs_key(P, queue) return P .. 'jobs:' .. queue end  -- zset: the queue's jobs by seq (ListJobs)
local function ended_key(P, queue, hour) return P .. 'ended:' .. queue .. ':' .. hour end  -- hash: ends per minute
local function ckey_jobs_key(P, queue, key) return P .. 'ckeyjobs:' .. queue .. ':' .. key end  -- zset: its jobs in line

local function is_terminal(state)
  return state == SUCCEEDED or state == FAILED or state == CANCELLED
end

-- Priority first (0-255, higher first), then submission order.
local function pending_score(prio, seq)
  return (255 - prio) * 17592186044416 + seq
end

-- Protocol buffers encoding of the few relay messages placement publishes itself. Field numbers
-- by message (proto/jobgate/v1/relay.proto and job.proto); tests/test_protocol_contract.py checks
-- them against the generated descriptors, and the tests parse the messages with protobuf.
local PB = {
  DispatchJob = {job_id = 1, lease = 2, attempt = 3, spec = 4, timeout_ms = 5, ack_deadline = 6, spec_omitted = 7},
  DispatchJobs = {jobs = 1},
  WorkerMessage = {dispatch = 1, dispatches = 3},
  JobEvent = {job_id = 1, queue = 2, kind = 3, state = 4, attempt = 5, worker_id = 6, error = 9, time = 10,
    due_at = 12},
  JobEvents = {events = 1},
  JobError = {code = 1, message = 2},
  Attempt = {attempt = 1, worker_id = 2, started_at = 3, finished_at = 4, state = 5, error = 6},
  Job = {attempts = 13},  -- the job hash's 'history' holds Attempts as this field of a Job
  Timestamp = {seconds = 1, nanos = 2},
}
local function pb_varint(n)  -- a non-negative integer below 2^53
  if n < 128 then return string.char(n) end
  local out = {}
  repeat
    local b = n % 128
    n = (n - b) / 128
    if n > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end
local function pb_int(field, n)  -- fields 1-15, varint wire type; 0 is left out as proto3 does
  if n == 0 then return '' end
  return string.char(field * 8) .. pb_varint(n)
end
local function pb_bytes(field, s)  -- fields 1-15, length-delimited wire type
  if s == '' then return '' end
  return string.char(field * 8 + 2) .. pb_varint(#s) .. s
end
local timestamps = {}  -- encoded by ms, for this call: most of a call's events carry its `now`
local function pb_timestamp(ms)  -- google.protobuf.Timestamp
  local ts = timestamps[ms]
  if not ts then
    local nanos = (ms % 1000) * 1000000
    ts = pb_int(PB.Timestamp.seconds, (ms - ms % 1000) / 1000) .. pb_int(PB.Timestamp.nanos, nanos)
    timestamps[ms] = ts
  end
  return ts
end
-- Specs larger than this (bytes) are not carried in a DispatchJob: its spec_omitted is set instead
-- and the worker reads the spec itself. Every copy of a value inside a script costs about 1.4 µs
-- per KB (a plain HGET's reply a tenth of that), and a dispatch copies its spec several times.
local SPEC_INLINE_BYTES = 4096
-- The spec a DispatchJob of job hash `jk` carries, or false when it is too large to carry.
local function spec_to_carry(jk)
  if redis.call('HSTRLEN', jk, 'spec') > SPEC_INLINE_BYTES then return false end
  return redis.call('HGET', jk, 'spec')
end
-- A DispatchJob; `spec` false: left out (spec_omitted); `ack_by` (ms) is left out (nil) for a job
-- started on the worker's behalf.
local function pb_dispatch(id, lease, attempt, spec, timeout_ms, ack_by)
  local f = PB.DispatchJob
  local carried = spec and pb_bytes(f.spec, spec) or pb_int(f.spec_omitted, 1)
  local d = pb_bytes(f.job_id, id) .. pb_int(f.lease, lease) .. pb_int(f.attempt, attempt) .. carried
    .. pb_int(f.timeout_ms, timeout_ms)
  if ack_by then d = d .. pb_bytes(f.ack_deadline, pb_timestamp(ack_by)) end
  return d
end
-- A JobEvent of placement: DISPATCHED or RUNNING, with the placing worker and time.
local function pb_event(id, queue, kind, state, attempt, worker, ts)
  local f = PB.JobEvent
  return pb_bytes(f.job_id, id) .. pb_bytes(f.queue, queue) .. pb_bytes(f.kind, kind) .. pb_int(f.state, state)
    .. pb_int(f.attempt, attempt) .. pb_bytes(f.worker_id, worker) .. pb_bytes(f.time, ts)
end
local function pb_error(code, message)
  return pb_bytes(PB.JobError.code, code or '') .. pb_bytes(PB.JobError.message, message or '')
end
-- A JobEvents message holding one SCHEDULED or QUEUED event of a job's hash fields `j`
-- ({queue, kind, attempt, worker, err_code, err_msg}) at `now`, with `due` (ms) when SCHEDULED.
local function pb_events_of(id, j, state, now, due)
  local e = pb_event(id, j.queue, j.kind, state, j.attempt, j.worker or '', pb_timestamp(now))
  if j.err_code and j.err_code ~= '' then e = e .. pb_bytes(PB.JobEvent.error, pb_error(j.err_code, j.err_msg)) end
  if due then e = e .. pb_bytes(PB.JobEvent.due_at, pb_timestamp(due)) end
  return pb_bytes(PB.JobEvents.events, e)
end

-- History. Each attempt that ends appends a jobgate.v1.Attempt to the job hash's 'history' field,
-- encoded as field 13 of a Job, so the field parses as a Job whose `attempts` are the history.
-- `history` (the field's value, or nil) with the attempt that ended appended: the new value.
local function with_attempt(history, attempt, worker, started, now, state, code, message)
  local a = PB.Attempt
  local rec = pb_int(a.attempt, attempt) .. pb_bytes(a.worker_id, worker or '')
    .. pb_bytes(a.started_at, started and started ~= '' and pb_timestamp(tonumber(started)) or '')
    .. pb_bytes(a.finished_at, pb_timestamp(now)) .. pb_int(a.state, state)
    .. pb_bytes(a.error, pb_error(code, message))
  return (history or '') .. pb_bytes(PB.Job.attempts, rec)
end
local function record_attempt(jk, attempt, worker, started, now, state, code, message)
  local history = redis.call('HGET', jk, 'history')
  redis.call('HSET', jk, 'history', with_attempt(history, attempt, worker, started, now, state, code, message))
end

-- Retries. A failure with one of these codes, with attempts left, is retried after a backoff.
local RETRIED = {HANDLER_ERROR = true, TIMEOUT = true}
-- The wait (ms) after failed attempt `attempt`, from the job's 'backoff' field ("initial,max,
-- multiplier" in ms): initial * multiplier^(attempt-1), at most max, less up to half of it, by an
-- amount fixed per job id and attempt (a script's math.random repeats itself in every call).
local function backoff_ms(id, attempt, backoff)
  local initial, most, mult = string.match(backoff or '', '^([%d.]+),([%d.]+),([%d.]+)$')
  initial, most, mult = tonumber(initial) or 1000, tonumber(most) or 300000, tonumber(mult) or 2
  local wait = math.min(most, initial * mult ^ math.max(0, attempt - 1))
  local u = ((tonumber(string.sub(id, 5, 8), 16) or 0) + attempt * 40503) % 65536 / 65536
  return math.floor(wait * (1 - u / 2))
end
local unbook  -- defined with the concurrency keys below

-- Counts for GetQueueStats, added up in these tables during a script call and written once at its
-- end (flush_counts, which protocol/scripts.py runs after every script's body): per hash key, its
-- fields in order and what to add to each, and the key's TTL in seconds if it has one.
local counts, counted = {}, {}
local function add_count(key, field, by, ttl)
  local c = counts[key]
  if not c then
    c = {ttl = ttl}
    counts[key] = c
    counted[#counted + 1] = key
  end
  if not c[field] then
    c[field] = 0
    c[#c + 1] = field
  end
  c[field] = c[field] + by
end

-- Counts kept per queue in its settings hash: 'n_scheduled' (its SCHEDULED jobs), 'n_blocked'
-- (BLOCKED), 'n_lined' (QUEUED in a concurrency key's line), changed where a job enters or leaves
-- what they count.
local function count(ns, queue, field, by)
  if by ~= 0 then add_count(queue_key(ns.P, queue), field, by) end
end

-- Counts a job of `queue` that ended in `state` in the hour's `P ended:<queue>:<hour>` hash, field
-- "<minute of the hour>:<state>", kept 8 days (the longest window GetQueueStats counts is 7).
local ended = {}  -- per queue and state: the key and field of the last `now` counted, for this call
local function count_ended(ns, queue, state, now)
  local by_state = ended[queue]
  if not by_state then
    by_state = {}
    ended[queue] = by_state
  end
  local e = by_state[state]
  if not e or e.now ~= now then
    local ms = tonumber(now)
    e = {now = now, key = ended_key(ns.P, queue, math.floor(ms / 3600000)),
      field = math.floor(ms / 60000) % 60 .. ':' .. state}
    by_state[state] = e
  end
  add_count(e.key, e.field, 1, 691200)
end

local function flush_counts()
  for _, key in ipairs(counted) do
    local c = counts[key]
    for _, field in ipairs(c) do
      if c[field] ~= 0 and redis.call('HINCRBY', key, field, c[field]) == c[field] and c.ttl then
        redis.call('EXPIRE', key, c.ttl)
      end
    end
  end
end

-- Puts a job in the delayed zset, SCHEDULED until `due` (ms).
local function schedule_job(ns, jk, id, queue, due, now)
  redis.call('HSET', jk, 'state', STATE_TEXT[SCHEDULED], 'worker', '', 'due', due, 'updated', now)
  redis.call('HDEL', jk, 'progress')
  count(ns, queue, 'n_scheduled', redis.call('ZADD', ns.delayed, due, id))
  unbook(ns, queue, id, redis.call('HGET', jk, 'ckey'), now)  -- a retry waiting out its backoff
end

-- Pub/sub messages stay under this size where they can: Redis disconnects a subscriber whose
-- output buffer passes its pubsub limit (32 MB by default), so one huge message would cut every
-- gateway's subscription.
local MESSAGE_BYTES = 1048576

-- Publishes `parts` (encodings that concatenate into one message, such as one-event JobEvents) on
-- `channel` in as few messages as fit MESSAGE_BYTES (a part bigger than that goes alone).
local function publish_parts(channel, parts)
  local chunk, size = {}, 0
  for _, part in ipairs(parts) do
    if #chunk > 0 and size + #part > MESSAGE_BYTES then
      redis.call(PUBLISH, channel, table.concat(chunk))
      chunk, size = {}, 0
    end
    chunk[#chunk + 1] = part
    size = size + #part
  end
  if #chunk > 0 then redis.call(PUBLISH, channel, table.concat(chunk)) end
end

-- Concurrency keys (PROTOCOL.md, "Concurrency keys"). The waiting jobs of a queue with one
-- concurrency_key (the job hash's 'ckey') stand in the key's line (its ckeyjobs zset, scored as
-- pending zsets are), all but one: the key's head, which waits in its placement group's pending
-- zset like any job. When the head is placed, the key's next job becomes its head with a fresh
-- place at the back of the pending zset, so keys take turns (round robin) however many jobs each
-- holds, at a constant cost per job. The key's hash counts its placed jobs ('running') and names its
-- head ('head'); a key with the queue's max_running_per_key placed puts no head in line until one of
-- its jobs stops, and a key with no start left in its rate bucket ('tokens', 'tokens_at', as
-- queue_budget's) is given a head SCHEDULED for when its bucket holds one. An idle key's hash is
-- deleted, or kept one period while its bucket refills.

-- The queue's limits per key, read once per script call: {most, rate_n, rate_ms}.
local key_limit_cache = {}
local function key_limits(ns, queue)
  local l = key_limit_cache[queue]
  if not l then
    local q = redis.call('HMGET', queue_key(ns.P, queue), 'key_max_running', 'key_rate_n', 'key_rate_ms')
    l = {most = tonumber(q[1]) or math.huge, rate_n = tonumber(q[2]), rate_ms = tonumber(q[3])}
    key_limit_cache[queue] = l
  end
  return l
end

-- A key's rate bucket now, from its hash's 'tokens' and 'tokens_at' (math.huge without a rate).
local function key_tokens(l, tokens, at, now)
  if not l.rate_n then return math.huge end
  tokens, at = tonumber(tokens or l.rate_n), tonumber(at or now)
  if now > at then tokens = math.min(l.rate_n, tokens + (now - at) * l.rate_n / l.rate_ms) end
  return tokens
end

-- Puts job `id` (its hash `jk`) in its placement group's pending zset, behind every job there of
-- its priority; returns its group and score.
local function line_up(ns, jk, id, queue)
  local j = redis.call('HMGET', jk, 'prio', 'kind', 'group')
  local group = j[3] or j[2]
  local score = pending_score(tonumber(j[1]), redis.call('INCRBY', ns.seq, 1))
  redis.call('ZADD', pending_key(ns.P, queue, group), score, id)
  redis.call('SADD', kinds_key(ns.P, queue), group)
  redis.call('SADD', ns.queues, queue)
  return group, score
end

-- Gives key `key` of `queue` its next head, when it has none, jobs in its line and room under its
-- limits: lined up (returns its group, score and id), or SCHEDULED when the key's bucket is empty.
local function key_next(ns, queue, key, now)
  now = tonumber(now)
  local hk = ckey_key(ns.P, queue, key)
  local h = redis.call('HMGET', hk, 'running', 'head', 'tokens', 'tokens_at')
  if h[2] then return end
  local l = key_limits(ns, queue)
  local running = tonumber(h[1] or '0')
  if running >= l.most then return end
  local line = ckey_jobs_key(ns.P, queue, key)
  local id = redis.call('ZRANGE', line, 0, 0)[1]
  if not id then
    if running <= 0 then
      if l.rate_n and h[3] then redis.call('EXPIRE', hk, math.ceil(l.rate_ms / 1000)) else redis.call('DEL', hk) end
    end
    return
  end
  count(ns, queue, 'n_lined', -redis.call('ZREM', line, id))
  if h[3] then redis.call('PERSIST', hk) end  -- a key with a bucket may have been set to expire while idle
  redis.call('HSET', hk, 'head', id)
  local jk = job_key(ns.P, id)
  local tokens = key_tokens(l, h[3], h[4], now)
  if tokens < 1 then
    local due = now + math.ceil((1 - tokens) * l.rate_ms / l.rate_n)
    local j = redis.call('HMGET', jk, 'kind', 'attempt')
    schedule_job(ns, jk, id, queue, due, now)
    publish_parts(ns.results, {pb_events_of(id, {queue = queue, kind = j[1], attempt = tonumber(j[2])}, SCHEDULED,
      now, due)})
    return
  end
  local group, score = line_up(ns, jk, id, queue)
  return group, score, id
end

-- Puts waiting job `id` of key `key` in the key's line (by its priority and submission order), or
-- in its pending zset when it is the key's head back from a wait for a start in the key's bucket.
local function key_wait(ns, jk, id, queue, key)
  if redis.call('HGET', ckey_key(ns.P, queue, key), 'head') == id then return line_up(ns, jk, id, queue) end
  local j = redis.call('HMGET', jk, 'prio', 'seq')
  count(ns, queue, 'n_lined', redis.call('ZADD', ckey_jobs_key(ns.P, queue, key), pending_score(tonumber(j[1]),
    tonumber(j[2])), id))
end

-- Takes a job that stops waiting without being placed (cancelled) out of its key's line.
local function key_forget(ns, queue, key, id, now)
  count(ns, queue, 'n_lined', -redis.call('ZREM', ckey_jobs_key(ns.P, queue, key), id))
  local hk = ckey_key(ns.P, queue, key)
  if redis.call('HGET', hk, 'head') == id then
    redis.call('HDEL', hk, 'head')
    key_next(ns, queue, key, now)
  end
end

-- Whether placement may place job `id`, of key `key`: the key is under its limits. If so, the job
-- counts as one of the key's placed jobs and takes a start from its bucket; if not (the limits were
-- lowered since it was lined up), it goes back to the key's line. Either way it is no longer the
-- key's head.
local function key_take(ns, queue, key, id, now)
  local hk = ckey_key(ns.P, queue, key)
  local h = redis.call('HMGET', hk, 'running', 'head', 'tokens', 'tokens_at')
  local l = key_limits(ns, queue)
  local tokens = key_tokens(l, h[3], h[4], now)
  if h[2] == id then redis.call('HDEL', hk, 'head') end
  if tonumber(h[1] or '0') >= l.most or tokens < 1 then
    key_wait(ns, job_key(ns.P, id), id, queue, key)
    key_next(ns, queue, key, now)
    return false
  end
  redis.call('HINCRBY', hk, 'running', 1)
  if l.rate_n then redis.call('HSET', hk, 'tokens', tostring(tokens - 1), 'tokens_at', now) end
  return true
end

-- Takes job `id` off its queue's placed jobs (its running set) when it is there; a job of a
-- concurrency key `key` then no longer counts for the key, which may line up its next job.
unbook = function(ns, queue, id, key, now)
  if redis.call('SREM', running_key(ns.P, queue), id) == 1 and key then
    redis.call('HINCRBY', ckey_key(ns.P, queue, key), 'running', -1)
    key_next(ns, queue, key, now)
  end
end

-- Put a placed job back in its queue; returns its queue and its state: QUEUED, or SCHEDULED when
-- it is the head of a concurrency key with no start left in its bucket (key_next scheduled it and
-- published its SCHEDULED event). `interrupted` is true when it had started running
-- on purpose-stopped worker (hand-back), which does not use up an attempt.
local function requeue(ns, jk, job_id, now, interrupted)
  local j = redis.call('HMGET', jk, 'queue', 'prio', 'seq', 'attempt', 'kind', 'group', 'ckey')
  local attempt = tonumber(j[4])
  if interrupted and attempt > 0 then attempt = attempt - 1 end
  redis.call('HSET', jk, 'state', STATE_TEXT[QUEUED], 'worker', '', 'attempt', attempt, 'updated', now)
  redis.call('HDEL', jk, 'progress')
  if j[7] then  -- back in its key's line, then the key may line up its next job (perhaps this one)
    key_wait(ns, jk, job_id, j[1], j[7])
    unbook(ns, j[1], job_id, j[7], now)
    key_next(ns, j[1], j[7], now)
    return j[1], tonumber(redis.call('HGET', jk, 'state'))  -- SCHEDULED when its key has no start left
  end
  local group = j[6] or j[5]
  unbook(ns, j[1], job_id, nil, now)
  redis.call('ZADD', pending_key(ns.P, j[1], group), pending_score(tonumber(j[2]), tonumber(j[3])), job_id)
  redis.call('SADD', kinds_key(ns.P, j[1]), group)
  redis.call('SADD', ns.queues, j[1])  -- placement may have dropped the emptied queue
  return j[1], QUEUED
end

-- Record a terminal state and start the job's retention clock: its 'ttl' field, or for FAILED its
-- 'dttl' field (dead letters are kept longer), both set at submit from the gateway's settings for
-- its queue, so every writer keeps a finished job equally long. A FAILED job is listed in its
-- queue's failed zset (the dead letters, by when they failed), which forgets the entries whose jobs
-- have expired. A job with a unique key lets it go; a job of a batch counts its end there (see
-- count_in_batch). `more`, when given, holds further field/value pairs written with the state, and
-- `known` the job's 'ttl', 'cancel', 'dttl', 'unique' and 'batch' fields when the caller has read
-- them already.
-- The batch counts of each terminal state.
local BATCH_COUNTS = {[SUCCEEDED] = 'succeeded', [FAILED] = 'failed', [CANCELLED] = 'cancelled'}

-- Counts the end of a job of batch `batch` as `state` (by `by`, -1 when RetryJob takes it back).
-- When every job of the batch has ended the first time, the batch is done: 'done' = now, it keeps
-- its jobs' retention, and a batch with a callback is listed in `P batches:done` for the gateways
-- to submit it.
local function count_in_batch(ns, batch, state, now, by, ttl)
  local bk = batch_key(ns.P, batch)
  if redis.call('EXISTS', bk) == 0 then return end
  redis.call('HINCRBY', bk, BATCH_COUNTS[state], by)
  if by < 0 then return end
  local b = redis.call('HMGET', bk, 'total', 'succeeded', 'failed', 'cancelled', 'done', 'callback')
  if not b[5] and tonumber(b[2]) + tonumber(b[3]) + tonumber(b[4]) >= tonumber(b[1]) then
    redis.call('HSET', bk, 'done', now)
    if ttl and ttl > 0 then redis.call('EXPIRE', bk, ttl) end
    if b[6] and b[6] ~= '' then redis.call('ZADD', batches_done_key(ns.P), now, batch) end
  end
end

local resolve_dependents  -- defined below finish_job, which calls it

-- With `unbooked` (a table), a job without a concurrency key is not taken off its queue's running
-- set here: its id is added to unbooked[queue], for the caller to remove with the others at once
-- (before anything reads the set).
local function finish_job(ns, jk, id, queue, state, code, message, now, more, known, unbooked)
  local fields = {'state', STATE_TEXT[state], 'err_code', code, 'err_msg', message, 'finished', now, 'updated', now}
  if more then
    for _, v in ipairs(more) do fields[#fields + 1] = v end
  end
  redis.call('HSET', jk, unpack(fields))
  count_ended(ns, queue, state, now)
  known = known or redis.call('HMGET', jk, 'ttl', 'cancel', 'dttl', 'unique', 'batch', 'dependents', 'ckey')
  if unbooked and not known[7] then
    local ids = unbooked[queue]
    if not ids then
      ids = {}
      unbooked[queue] = ids
    end
    ids[#ids + 1] = id
  else
    unbook(ns, queue, id, known[7], now)
  end
  if known[2] then redis.call('HDEL', jk, 'cancel') end
  if known[4] then
    local uk = unique_key(ns.P, known[4])
    if redis.call('GET', uk) == id then redis.call('DEL', uk) end
  end
  local ttl = tonumber(known[1] or '0')
  if state == FAILED then
    ttl = tonumber(known[3] or '') or ttl
    local failed = failed_key(ns.P, queue)
    redis.call('ZADD', failed, now, id)
    if ttl and ttl > 0 then redis.call('ZREMRANGEBYSCORE', failed, '-inf', tonumber(now) - ttl * 1000) end
  end
  if ttl and ttl > 0 then redis.call('EXPIRE', jk, ttl) end
  if known[5] then count_in_batch(ns, known[5], state, now, 1, tonumber(known[1] or '0')) end
  if known[6] then resolve_dependents(ns, id, state, now) end
end

-- Job `id` ended in `state`: each job BLOCKED on it counts it off when it SUCCEEDED, and is queued
-- (or SCHEDULED, when it is due later) once none is left; when it FAILED or was CANCELLED, each one
-- ends FAILED with DEPENDENCY_FAILED (and so on down the chain, through finish_job). The events of
-- the jobs it moved are published.
resolve_dependents = function(ns, id, state, now)
  local dk = dependents_key(ns.P, id)
  local ids = redis.call('SMEMBERS', dk)
  redis.call('DEL', dk)
  local events = {}
  for _, d in ipairs(ids) do
    local jk = job_key(ns.P, d)
    local j = redis.call('HMGET', jk, 'state', 'queue', 'kind', 'due', 'attempt')
    if tonumber(j[1]) == BLOCKED then
      count(ns, j[2], 'n_blocked', -1)
      local fields = {queue = j[2], kind = j[3], attempt = tonumber(j[5])}
      if state == SUCCEEDED then
        if redis.call('HINCRBY', jk, 'deps_left', -1) <= 0 then
          local due = tonumber(j[4] or '0')
          if due > tonumber(now) then
            schedule_job(ns, jk, d, j[2], due, now)
            events[#events + 1] = pb_events_of(d, fields, SCHEDULED, tonumber(now), due)
          else
            local _, st = requeue(ns, jk, d, now, false)
            if st == QUEUED then
              redis.call('HDEL', jk, 'due')
              events[#events + 1] = pb_events_of(d, fields, QUEUED, tonumber(now))
            end
          end
        end
      else
        local why = 'job ' .. id .. ' it depends on ended ' .. (state == FAILED and 'FAILED' or 'CANCELLED')
        finish_job(ns, jk, d, j[2], FAILED, 'DEPENDENCY_FAILED', why, now)
        fields.err_code, fields.err_msg = 'DEPENDENCY_FAILED', why
        events[#events + 1] = pb_events_of(d, fields, FAILED, tonumber(now))
      end
    end
  end
  publish_parts(ns.results, events)
end

-- Runs `cmd key` followed by `args`, at most `step` of them per call (Lua's unpack is bounded),
-- and returns the sum of the integer replies.
local function call_chunked(cmd, key, args, step)
  local total = 0
  for first = 1, #args, step do
    total = total + redis.call(cmd, key, unpack(args, first, math.min(first + step - 1, #args)))
  end
  return total
end

-- Take jobs off a worker's books: its job set and busy-slot count (a job not in its set is left
-- alone, so releasing twice counts once).
local function release_slots(ns, worker_id, job_ids)
  if worker_id == nil or worker_id == '' or #job_ids == 0 then return end
  local freed = call_chunked('SREM', worker_jobs_key(ns.P, worker_id), job_ids, 1000)
  if freed > 0 then
    local wk = worker_key(ns.P, worker_id)
    if redis.call('EXISTS', wk) == 1 then redis.call('HINCRBY', wk, 'used', -freed) end
  end
end
local function release_slot(ns, worker_id, job_id)
  release_slots(ns, worker_id, {job_id})
end

-- Whether `instance` is the token of the process that registered worker `w` now: a placement is
-- started or refilled only by the process whose registration it was placed on.
local function registered_instance(ns, w, instance)
  return redis.call('HGET', worker_key(ns.P, w), 'instance') == instance
end

-- Remove a worker and settle every job placed on it. `handback` is true for a worker that left on
-- purpose (its running jobs go back without using an attempt); false for a worker that was lost
-- (a started job uses an attempt; after max_attempts it is FAILED with WORKER_LOST).
-- Appends {job id, queue, new state} triples to `out`.
local function evict_worker(ns, w, now, handback, out)
  local wk = worker_key(ns.P, w)
  local jobs_key = worker_jobs_key(ns.P, w)
  for _, id in ipairs(redis.call('SMEMBERS', jobs_key)) do
    local jk = job_key(ns.P, id)
    local j = redis.call('HMGET', jk, 'state', 'worker', 'attempt', 'max_attempts', 'cancel', 'queue', 'started')
    local state = tonumber(j[1])
    if j[2] == w and (state == DISPATCHED or state == RUNNING) then
      redis.call('ZREM', ns.acks, id)
      if state == RUNNING and not handback then
        record_attempt(jk, tonumber(j[3]), w, j[7], tonumber(now), FAILED, 'WORKER_LOST',
          'worker ' .. w .. ' was lost during attempt ' .. j[3])
      end
      local new_state = QUEUED
      if state == RUNNING and j[5] == '1' then
        new_state = CANCELLED
        finish_job(ns, jk, id, j[6], CANCELLED, 'CANCELLED', 'cancelled while its worker stopped', now)
      elseif state == RUNNING and not handback and tonumber(j[3]) >= tonumber(j[4]) then
        new_state = FAILED
        finish_job(ns, jk, id, j[6], FAILED, 'WORKER_LOST',
          'worker ' .. w .. ' was lost during attempt ' .. j[3] .. ' of ' .. j[4], now)
      else
        requeue(ns, jk, id, now, handback and state == RUNNING)
      end
      out[#out + 1], out[#out + 2], out[#out + 3] = id, j[6], new_state
    end
  end
  local queues = redis.call('HGET', wk, 'queues')
  if queues then
    for q in string.gmatch(queues, '[^,]+') do redis.call('SREM', qworkers_key(ns.P, q), w) end
  end
  redis.call('DEL', wk, jobs_key)
  redis.call('ZREM', ns.workers, w)
end


-- A worker acknowledges one dispatch (the start and start_many scripts; contract in start.lua).
-- Returns 1 running, 0 stale, -1 missing; and true when it changed the job: its RUNNING event is
-- to be published and the caller takes it off the acks zset. `instance` must be the token of the
-- worker's current registration: a process that took over the id of a crashed one cannot start
-- what was placed on its predecessor.
local function start_job(ns, jk, lease, worker_id, instance, now)
  local j = redis.call('HMGET', jk, 'state', 'lease', 'worker', 'attempt')
  if not j[1] then return -1 end
  if j[2] ~= lease or j[3] ~= worker_id then return 0 end
  if tonumber(j[1]) == RUNNING then return 1 end
  if tonumber(j[1]) ~= DISPATCHED then return 0 end
  if not registered_instance(ns, worker_id, instance) then return 0 end
  redis.call('HSET', jk, 'state', STATE_TEXT[RUNNING], 'attempt', tonumber(j[4]) + 1, 'started', now, 'updated', now)
  return 1, true
end

-- A worker records one outcome (the finish and finish_many scripts; contract in finish.lua).
-- `o` holds lease, state (a number), result, output, code, message, and optionally `unbooked`
-- (see finish_job: the caller then takes the recorded jobs off their running sets itself).
-- Returns 1 recorded (its event is to be published and the caller releases its slot), 2 already
-- recorded by this placement, 0 stale, -1 missing, -2 not a terminal state (nothing written); and
-- the job's queue; and, with 2, the id of the job finish_many started in its slot (its 'refill'
-- field), if any; and, with 1 for a failure that is retried (see RETRIED), the JobEvents of its
-- SCHEDULED event, to be published in place of the worker's.
-- Values written apart: a result argument that starts with a NUL byte (which no encoded Value
-- does) is not a result but says which of the result and the output the worker SET apart, at
-- staged_key for its lease, so that they never enter Lua: 'r' the result, 'o' the output (the
-- output argument is then ''). A recorded outcome renames them to apart_key (expiring with the
-- job) and marks the hash 'big_result' or 'big_output'; any other answer deletes them; a missing
-- one counts as empty.
local APART_FIELDS = {r = 'result', o = 'output'}
local record_outcome_of

local function record_outcome(ns, jk, worker_id, now, o, id)
  if string.byte(o.result, 1) ~= 0 then return record_outcome_of(ns, jk, worker_id, now, o, id) end
  local staged = {}
  for flag in string.gmatch(string.sub(o.result, 2), '.') do
    local field = APART_FIELDS[flag]
    local key = field and staged_key(ns.P, id, field, o.lease)
    if key and redis.call('EXISTS', key) == 1 then staged[field] = key end
  end
  o.result, o.staged = '', staged
  local code, queue, refill, retry_event = record_outcome_of(ns, jk, worker_id, now, o, id)
  for _, key in pairs(o.staged) do redis.call('DEL', key) end  -- not taken
  return code, queue, refill, retry_event
end

record_outcome_of = function(ns, jk, worker_id, now, o, id)
  local j = redis.call('HMGET', jk, 'state', 'lease', 'worker', 'queue', 'recorded', 'ttl', 'cancel', 'refill',
    'attempt', 'max_attempts', 'started', 'backoff', 'kind', 'dttl', 'unique', 'batch', 'dependents', 'ckey',
    'history')
  if not j[1] then return -1 end
  if not is_terminal(o.state) then return -2 end
  -- 'recorded' names the lease and state of the outcome this script wrote last ("<lease>:<state>";
  -- the job may have moved on to a retry since); reap, leave and cancel never set it
  local recorded = o.lease .. ':' .. o.state
  if j[5] == recorded then return 2, j[4], j[8] end
  if j[2] ~= o.lease or j[3] ~= worker_id then return 0 end
  if tonumber(j[1]) ~= RUNNING then return 0 end
  local attempt = tonumber(j[9])
  -- the attempt goes into the history with the outcome's own write
  local history = with_attempt(j[19], attempt, worker_id, j[11], tonumber(now), o.state, o.code, o.message)
  if o.state == FAILED and RETRIED[o.code] and j[7] ~= '1' and attempt < tonumber(j[10]) then
    local due = tonumber(now) + backoff_ms(id, attempt, j[12])
    redis.call('HSET', jk, 'err_code', o.code, 'err_msg', o.message, 'recorded', recorded, 'history', history)
    schedule_job(ns, jk, id, j[4], due, now)
    return 1, j[4], nil, pb_events_of(id, {queue = j[4], kind = j[13], attempt = attempt, worker = worker_id,
      err_code = o.code, err_msg = o.message}, SCHEDULED, tonumber(now), due)
  end
  local fields = {'result', o.result, 'output', o.output, 'recorded', recorded, 'history', history}
  if o.staged and o.staged.result then fields[1], fields[2] = 'big_result', '1' end
  if o.staged and o.staged.output then fields[3], fields[4] = 'big_output', '1' end
  finish_job(ns, jk, id, j[4], o.state, o.code, o.message, now, fields, {j[6], j[7], j[14], j[15], j[16], j[17], j[18]},
    o.unbooked)
  if o.staged then
    local ttl = redis.call('PTTL', jk)
    for field, key in pairs(o.staged) do
      local kept = apart_key(ns.P, id, field)
      redis.call('RENAME', key, kept)
      if ttl > 0 then redis.call('PEXPIRE', kept, ttl) else redis.call('PERSIST', kept) end
    end
    o.staged = {}
  end
  return 1, j[4]
end

-- Take back a placement whose dispatch reached nobody: the job goes back to its queue and the
-- worker takes no more jobs until its next heartbeat says it is subscribed again.
-- Returns true when put back, false when the placement had already moved on.
local function unassign_job(ns, job_id, lease, worker_id, now)
  local jk = job_key(ns.P, job_id)
  local j = redis.call('HMGET', jk, 'state', 'lease', 'worker')
  if tonumber(j[1]) ~= DISPATCHED or j[2] ~= lease or j[3] ~= worker_id then return false end
  release_slot(ns, worker_id, job_id)
  redis.call('ZREM', ns.acks, job_id)
  requeue(ns, jk, job_id, now, false)
  local wk = worker_key(ns.P, worker_id)
  if redis.call('EXISTS', wk) == 1 then redis.call('HSET', wk, 'off', '1') end
  return true
end


-- Placement, in steps: the kinds of a queue with jobs waiting; the live workers of the queue with
-- free slots; the choice of jobs for those slots (assign, which also books them); then either
-- dispatch (place_jobs, here: DISPATCHED, acknowledged within a deadline, published on the
-- workers' dispatch channels) or, in finish_many.lua, a start on the finishing worker's behalf.

-- How many jobs of `queue` may be placed now: 0 while it is paused (PauseQueue), at most its
-- 'max_running' less the jobs placed (its running set), at most the whole tokens of its rate
-- bucket (SetQueueLimits); math.huge without limits. Also returns the bucket's tokens now, when
-- it has a rate (spend_tokens takes the placed jobs off).
local function queue_budget(ns, queue, now)
  local q = redis.call('HMGET', queue_key(ns.P, queue), 'paused', 'max_running', 'rate_n', 'rate_ms', 'tokens',
    'tokens_at')
  if q[1] == '1' then return 0 end
  local budget, tokens = math.huge, nil
  if q[2] then
    budget = math.max(0, tonumber(q[2]) - redis.call('SCARD', running_key(ns.P, queue)))
  end
  if q[3] then
    local n, period = tonumber(q[3]), tonumber(q[4])
    tokens = tonumber(q[5] or q[3])
    local at = tonumber(q[6] or now)
    if now > at then tokens = math.min(n, tokens + (now - at) * n / period) end
    budget = math.min(budget, math.floor(tokens))
  end
  return budget, tokens
end

-- Takes `placed` jobs' tokens off the rate bucket of `queue` (`tokens`: as queue_budget read them).
local function spend_tokens(ns, queue, tokens, placed, now)
  if tokens then
    redis.call('HSET', queue_key(ns.P, queue), 'tokens', tostring(tokens - placed), 'tokens_at', now)
  end
end

-- The kinds of `queue` with jobs waiting, forgetting the others; drops the queue from the queues
-- set when none has any (submit and requeue add it back), so the gateways' periodic pass only
-- visits queues that hold jobs.
local function waiting_kinds(ns, queue)
  local kinds = kinds_key(ns.P, queue)
  local waiting = {}
  for _, kind in ipairs(redis.call('SMEMBERS', kinds)) do
    if redis.call('EXISTS', pending_key(ns.P, queue, kind)) == 1 then
      waiting[#waiting + 1] = kind
    else
      redis.call('SREM', kinds, kind)
    end
  end
  if #waiting == 0 then redis.call('SREM', ns.queues, queue) end
  return waiting
end

-- Whether jobs of `queue` still wait after placement (forgetting the kinds that emptied).
local function still_waiting(ns, queue, waiting)
  local left = false
  for _, kind in ipairs(waiting) do
    if redis.call('EXISTS', pending_key(ns.P, queue, kind)) == 1 then
      left = true
    else
      redis.call('SREM', kinds_key(ns.P, queue), kind)  -- nothing waits: forget the kind until a job of it comes
    end
  end
  return left
end

-- The live workers serving `queue` that take jobs and have a free slot ({id, slots, used, kinds}),
-- and their free slots in all. With `only` (a worker id), that worker alone is considered: a
-- worker refilling the slots it has just freed costs the same however many workers serve the queue.
local function candidates(ns, queue, now, only)
  local qworkers = qworkers_key(ns.P, queue)
  local workers
  if only then
    workers = redis.call('SISMEMBER', qworkers, only) == 1 and {only} or {}
  else
    workers = redis.call('SMEMBERS', qworkers)
  end
  local cands, free = {}, 0
  for _, w in ipairs(workers) do
    local h = redis.call('HMGET', worker_key(ns.P, w), 'slots', 'used', 'expires', 'kinds', 'off', 'labels')
    if not h[1] then
      redis.call('SREM', qworkers, w)
    elseif tonumber(h[3]) > now and h[5] ~= '1' then
      local slots, used = tonumber(h[1]), tonumber(h[2])
      if used < slots then
        local kinds = h[4]
        if kinds ~= '' then kinds = ',' .. kinds .. ',' end
        cands[#cands + 1] = {id = w, slots = slots, used = used, kinds = kinds, labels = ',' .. (h[6] or '') .. ','}
        free = free + slots - used
      end
    end
  end
  return cands, free
end

-- A placement group: the jobs of one kind that require the same worker labels (PROTOCOL.md,
-- "Labels"). Its name is the kind, then, with labels, '|' and the sorted "name=value" pairs joined
-- by ','; returns the kind and the list of required pairs.
local groups = {}
local function group_of(group)
  local g = groups[group]
  if not g then
    local kind, labels = string.match(group, '^([^|]*)|(.*)$')
    g = {kind = kind or group, labels = {}}
    for pair in string.gmatch(labels or '', '[^,]+') do g.labels[#g.labels + 1] = ',' .. pair .. ',' end
    groups[group] = g
  end
  return g
end

-- Whether candidate `c` can run jobs of group `g`: it handles the kind and has every label.
local function fits(c, g)
  if c.kinds ~= '' and not string.find(c.kinds, ',' .. g.kind .. ',', 1, true) then return false end
  for _, pair in ipairs(g.labels) do
    if not string.find(c.labels, pair, 1, true) then return false end
  end
  return true
end

-- A pass hands a worker consecutive jobs while its load stays under the least loaded candidate's
-- plus this share of its slots: placements go out in runs, so that a worker's start and finish
-- calls carry several jobs however many workers serve the queue, and loads stay within it.
local STICK = 0.25
-- Whether candidate `c` may take the next job of a run: a free slot, and its load under `floor`
-- (the least load among the candidates) plus STICK.
local function sticks(c, g, floor)
  return c.used < c.slots and c.used / c.slots < floor + STICK and fits(c, g)
end
-- The candidate with a free slot that can run jobs of `group`: `last` (the one placed on last)
-- while it sticks, else the least loaded. `floors` keeps, per group, the least load the last look
-- over every candidate found: loads only grow during a pass, so `last` sticks against it too, and
-- a pass looks over every candidate once per run, not once per job.
local function pick(cands, group, last, floors)
  local g = group_of(group)
  if last and floors and floors[group] and sticks(last, g, floors[group]) then return last end
  local best, best_load = nil, 2
  for _, c in ipairs(cands) do
    if c.used < c.slots and fits(c, g) then
      local load = c.used / c.slots
      if load < best_load then best, best_load = c, load end
    end
  end
  if floors then floors[group] = best_load end
  if last and best and last ~= best and sticks(last, g, best_load) then return last end
  return best
end

-- Chooses up to `most` waiting jobs of `queue` for the candidates' free slots: across the kinds
-- some candidate handles, in priority then submission order, each on the least loaded candidate
-- that handles its kind. Each chosen job gets the next lease, leaves its pending zset and is
-- booked on its worker (job set, busy slots). The caller writes the job's new state.
-- Returns the placements in order, {id, worker, lease, attempt (of the coming start), kind, spec
-- (false when too large to carry: spec_to_carry), timeout_ms, ack (the job's ack timeout ms, or nil)}.
local function assign(ns, queue, waiting, cands, free, most, now)
  local limit = math.min(most, free)
  local heads = {}  -- per kind: the first waiting jobs, as many as can be placed
  for _, kind in ipairs(waiting) do
    if pick(cands, kind) then
      local key = pending_key(ns.P, queue, kind)
      local first = redis.call('ZRANGE', key, 0, limit - 1, 'WITHSCORES')
      if first[1] then
        -- with `more`, jobs past the last one read may wait too: nothing is put in after it
        heads[kind] = {key = key, ids = first, pos = 1, score = tonumber(first[2]), taken = {},
          more = #first == 2 * limit, last = tonumber(first[#first])}
      end
    end
  end
  -- A key's next head, lined up while this call places its jobs, joins the chosen ones in order
  -- (unless jobs this call has not read may come before it: then a later call places it).
  local function insert(group, id, score)
    local h = heads[group]
    if h and h.more and score > h.last then return end
    if not h then
      h = {key = pending_key(ns.P, queue, group), ids = {}, pos = 1, taken = {}}
      heads[group] = h
      waiting[#waiting + 1] = group
    end
    local i = #h.ids - 1
    while i >= h.pos and tonumber(h.ids[i + 1]) > score do i = i - 2 end
    table.insert(h.ids, i + 2, id)
    table.insert(h.ids, i + 3, score)
    if not h.full then h.score = tonumber(h.ids[h.pos + 1]) end
  end
  local placed, books, last, floors = {}, {}, nil, {}
  local lease = tonumber(redis.call('GET', ns.lease) or '0')
  while #placed < most and free > 0 do
    local kind, head = nil, nil
    for k, h in pairs(heads) do
      if h.score and (not head or h.score < head.score) then kind, head = k, h end
    end
    if not head then break end
    local c = pick(cands, kind, last, floors)
    if not c then
      head.score, head.full = nil, true  -- its workers are full now
    else
      local id = head.ids[head.pos]
      head.taken[#head.taken + 1] = id
      head.pos = head.pos + 2
      head.score = tonumber(head.ids[head.pos + 1])
      local jk = job_key(ns.P, id)
      local j = redis.call('HMGET', jk, 'state', 'attempt', 'ckey', 'timeout_ms', 'ack')
      if j[1] and tonumber(j[1]) == QUEUED and (not j[3] or key_take(ns, queue, j[3], id, now)) then
        lease = lease + 1
        last = c
        c.used = c.used + 1
        free = free - 1
        placed[#placed + 1] = {id = id, worker = c.id, lease = lease, attempt = tonumber(j[2]) + 1, kind = group_of(kind).kind,
          spec = spec_to_carry(jk), timeout_ms = tonumber(j[4]), ack = tonumber(j[5])}
        if not books[c.id] then books[c.id] = {} end
        table.insert(books[c.id], id)
        if j[3] then
          local group, score, next_id = key_next(ns, queue, j[3], now)
          if next_id then insert(group, next_id, score) end
        end
      end  -- else: expired or already moved on (so it was not waiting any more), or over its key's limits
    end
  end
  for _, h in pairs(heads) do call_chunked('ZREM', h.key, h.taken, 1000) end
  if #placed > 0 then redis.call('SET', ns.lease, string.format('%.0f', lease)) end
  for w, ids in pairs(books) do
    call_chunked('SADD', worker_jobs_key(ns.P, w), ids, 1000)
    call_chunked('SADD', running_key(ns.P, queue), ids, 1000)
    redis.call('HINCRBY', worker_key(ns.P, w), 'used', #ids)
  end
  return placed
end

-- Publishes the dispatched placements: per worker, WorkerMessages under MESSAGE_BYTES (`dispatch`
-- for a lone job, else `dispatches`), in placement order. Sets each placement's `reached`: false
-- when its worker's channel had no subscriber.
local function publish_dispatches(ns, placed)
  local order, by_worker = {}, {}
  for _, p in ipairs(placed) do
    if not by_worker[p.worker] then
      by_worker[p.worker] = {}
      order[#order + 1] = p.worker
    end
    table.insert(by_worker[p.worker], p)
  end
  for _, w in ipairs(order) do
    local ps, first = by_worker[w], 1
    while first <= #ps do
      local last, size = first, #ps[first].d
      while last < #ps and size + #ps[last + 1].d <= MESSAGE_BYTES do
        last = last + 1
        size = size + #ps[last].d
      end
      local msg
      if last == first then
        msg = pb_bytes(PB.WorkerMessage.dispatch, ps[first].d)
      else
        local jobs = {}
        for i = first, last do jobs[#jobs + 1] = pb_bytes(PB.DispatchJobs.jobs, ps[i].d) end
        msg = pb_bytes(PB.WorkerMessage.dispatches, table.concat(jobs))
      end
      local ok = redis.call(PUBLISH, dispatch_channel(ns.P, w), msg) > 0
      for i = first, last do ps[i].reached = ok end
      first = last + 1
    end
  end
end

-- Appends 5 entries per placement to `out`: job id, worker id, lease, attempt (of the coming
-- start), 1 dispatched (or started) or 0 taken back (its worker had no subscriber).
local function report_placements(placed, out)
  for _, p in ipairs(placed) do
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = p.id, p.worker, p.lease, p.attempt
    out[n + 5] = p.reached and 1 or 0
  end
end

-- Places waiting jobs of one queue on live workers with free slots, least loaded first, and
-- dispatches them: DISPATCHED, to be acknowledged (started) within the job's 'ack' field (ms,
-- stored at submit) or `ack_ms` for a job stored without one; published on the workers' dispatch
-- channels, then one JobEvents with the DISPATCHED events on the results channel. A dispatch that
-- reaches nobody is taken back at once (unassign_job). Waiting jobs are kept per kind, so kinds that
-- no free worker handles cost nothing and never hold up the others. A paused queue places nothing. With `only` (a worker id), only
-- that worker is a candidate. Appends 5 entries per placement to `out` (report_placements).
-- Returns true when jobs are still waiting in the queue afterwards.
local function place_jobs(ns, queue, now, ack_ms, most, out, only)
  local budget, tokens = queue_budget(ns, queue, now)
  if budget < 1 then return true end
  most = math.min(most, budget)
  local waiting = waiting_kinds(ns, queue)
  if #waiting == 0 then return false end
  local cands, free = candidates(ns, queue, now, only)
  if free == 0 then return true end
  local placed = assign(ns, queue, waiting, cands, free, most, now)
  spend_tokens(ns, queue, tokens, #placed, now)
  local acks = {}
  for _, p in ipairs(placed) do
    local ack_by = now + (p.ack or ack_ms)
    redis.call('HSET', job_key(ns.P, p.id), 'state', STATE_TEXT[DISPATCHED], 'worker', p.worker,
      'lease', string.format('%.0f', p.lease), 'updated', now)
    acks[#acks + 1], acks[#acks + 2] = ack_by, p.id
    p.d = pb_dispatch(p.id, p.lease, p.attempt, p.spec, p.timeout_ms, ack_by)
  end
  call_chunked('ZADD', ns.acks, acks, 1000)
  publish_dispatches(ns, placed)
  local events, ts = {}, pb_timestamp(now)
  for _, p in ipairs(placed) do
    if p.reached then
      events[#events + 1] = pb_bytes(PB.JobEvents.events,
        pb_event(p.id, queue, p.kind, DISPATCHED, p.attempt, p.worker, ts))
    else
      unassign_job(ns, p.id, string.format('%.0f', p.lease), p.worker, now)
    end
  end
  report_placements(placed, out)
  publish_parts(ns.results, events)
  return still_waiting(ns, queue, waiting)
end
