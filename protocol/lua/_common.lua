-- Shared prelude, prepended to every script by protocol/scripts.py.
-- States (jobgate.v1.JobState): 1 QUEUED, 2 DISPATCHED, 3 RUNNING, 4 SUCCEEDED, 5 FAILED, 6 CANCELLED.
-- Key rules for names built from a prefix P (ARGV, e.g. "{jobgate}:"): P.."job:"..id (hash),
-- P.."pending:"..queue..":"..kind (zset), P.."kinds:"..queue (set), P.."worker:"..id (hash),
-- P.."worker:"..id..":jobs" (set), P.."qworkers:"..queue (set), P.."queues" (set), P.."acks" (zset),
-- P.."lease" (counter); channels P.."dispatch:"..worker id and P.."results". All share P's hash tag.
local QUEUED, DISPATCHED, RUNNING, SUCCEEDED, FAILED, CANCELLED = 1, 2, 3, 4, 5, 6

local function is_terminal(state)
  return state == SUCCEEDED or state == FAILED or state == CANCELLED
end

-- Priority first (0-255, higher first), then submission order.
local function pending_score(prio, seq)
  return (255 - prio) * 17592186044416 + seq
end

-- Put a placed job back in its queue. `interrupted` is true when it had started running
-- on purpose-stopped worker (hand-back), which does not use up an attempt.
local function requeue(P, job_key, job_id, now, interrupted)
  local j = redis.call('HMGET', job_key, 'queue', 'prio', 'seq', 'attempt', 'kind')
  local attempt = tonumber(j[4])
  if interrupted and attempt > 0 then attempt = attempt - 1 end
  redis.call('HSET', job_key, 'state', QUEUED, 'worker', '', 'attempt', attempt, 'updated', now)
  redis.call('ZADD', P .. 'pending:' .. j[1] .. ':' .. j[5], pending_score(tonumber(j[2]), tonumber(j[3])), job_id)
  redis.call('SADD', P .. 'kinds:' .. j[1], j[5])
  redis.call('SADD', P .. 'queues', j[1])  -- placement may have dropped the emptied queue
  return j[1]
end

-- Record a terminal state and start the job's retention clock (its 'ttl' field, set at submit
-- from the gateway's retention setting, so every writer keeps a finished job equally long).
-- `more`, when given, holds further field/value pairs written with the state, and `known` the
-- job's 'ttl' and 'cancel' fields when the caller has read them already ({ttl, cancel}).
local function finish_job(job_key, state, code, message, now, more, known)
  local fields = {'state', state, 'err_code', code, 'err_msg', message, 'finished', now, 'updated', now}
  if more then
    for _, v in ipairs(more) do fields[#fields + 1] = v end
  end
  redis.call('HSET', job_key, unpack(fields))
  known = known or redis.call('HMGET', job_key, 'ttl', 'cancel')
  if known[2] then redis.call('HDEL', job_key, 'cancel') end
  local ttl = tonumber(known[1] or '0')
  if ttl and ttl > 0 then redis.call('EXPIRE', job_key, ttl) end
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
local function release_slots(P, worker_id, job_ids)
  if worker_id == nil or worker_id == '' or #job_ids == 0 then return end
  local freed = call_chunked('SREM', P .. 'worker:' .. worker_id .. ':jobs', job_ids, 1000)
  if freed > 0 then
    local wk = P .. 'worker:' .. worker_id
    if redis.call('EXISTS', wk) == 1 then redis.call('HINCRBY', wk, 'used', -freed) end
  end
end
local function release_slot(P, worker_id, job_id)
  release_slots(P, worker_id, {job_id})
end

-- Remove a worker and settle every job placed on it. `handback` is true for a worker that left on
-- purpose (its running jobs go back without using an attempt); false for a worker that was lost
-- (a started job uses an attempt; after max_attempts it is FAILED with WORKER_LOST).
-- Appends {job id, queue, new state} triples to `out`.
local function evict_worker(P, workers_key, acks_key, w, now, handback, out)
  local wk = P .. 'worker:' .. w
  local jobs_key = wk .. ':jobs'
  for _, id in ipairs(redis.call('SMEMBERS', jobs_key)) do
    local jk = P .. 'job:' .. id
    local j = redis.call('HMGET', jk, 'state', 'worker', 'attempt', 'max_attempts', 'cancel', 'queue')
    local state = tonumber(j[1])
    if j[2] == w and (state == DISPATCHED or state == RUNNING) then
      redis.call('ZREM', acks_key, id)
      local new_state = QUEUED
      if state == RUNNING and j[5] == '1' then
        new_state = CANCELLED
        finish_job(jk, CANCELLED, 'CANCELLED', 'cancelled while its worker stopped', now)
      elseif state == RUNNING and not handback and tonumber(j[3]) >= tonumber(j[4]) then
        new_state = FAILED
        finish_job(jk, FAILED, 'WORKER_LOST',
          'worker ' .. w .. ' was lost during attempt ' .. j[3] .. ' of ' .. j[4], now)
      else
        requeue(P, jk, id, now, handback and state == RUNNING)
      end
      out[#out + 1], out[#out + 2], out[#out + 3] = id, j[6], new_state
    end
  end
  local queues = redis.call('HGET', wk, 'queues')
  if queues then
    for q in string.gmatch(queues, '[^,]+') do redis.call('SREM', P .. 'qworkers:' .. q, w) end
  end
  redis.call('DEL', wk, jobs_key)
  redis.call('ZREM', workers_key, w)
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
      redis.call('PUBLISH', channel, table.concat(chunk))
      chunk, size = {}, 0
    end
    chunk[#chunk + 1] = part
    size = size + #part
  end
  if #chunk > 0 then redis.call('PUBLISH', channel, table.concat(chunk)) end
end

-- A worker acknowledges one dispatch (the start and start_many scripts; contract in start.lua).
-- Returns 1 running, 0 stale, -1 missing; and true when it changed the job: its RUNNING event is
-- to be published and the caller takes it off the acks zset.
local function start_job(job_key, lease, worker_id, now)
  local j = redis.call('HMGET', job_key, 'state', 'lease', 'worker', 'attempt')
  if not j[1] then return -1 end
  if j[2] ~= lease or j[3] ~= worker_id then return 0 end
  if tonumber(j[1]) == RUNNING then return 1 end
  if tonumber(j[1]) ~= DISPATCHED then return 0 end
  redis.call('HSET', job_key, 'state', RUNNING, 'attempt', tonumber(j[4]) + 1, 'started', now, 'updated', now)
  return 1, true
end

-- A worker records one outcome (the finish and finish_many scripts; contract in finish.lua).
-- `o` holds lease, state (a number), result, output, code, message.
-- Returns 1 recorded (its event is to be published and the caller releases its slot), 2 already
-- recorded by this placement, 0 stale, -1 missing, -2 not a terminal state (nothing written); and
-- the job's queue; and, with 2, the id of the job finish_many started in its slot (its 'refill'
-- field), if any.
local function record_outcome(job_key, worker_id, now, o)
  local j = redis.call('HMGET', job_key, 'state', 'lease', 'worker', 'queue', 'recorded', 'ttl', 'cancel', 'refill')
  if not j[1] then return -1 end
  if not is_terminal(o.state) then return -2 end
  if j[2] ~= o.lease or j[3] ~= worker_id then return 0 end
  -- 'recorded' names the lease whose outcome this script wrote; reap, leave and cancel never set it
  if tonumber(j[1]) == o.state and j[5] == o.lease then return 2, j[4], j[8] end
  if tonumber(j[1]) ~= RUNNING then return 0 end
  finish_job(job_key, o.state, o.code, o.message, now, {'result', o.result, 'output', o.output, 'recorded', o.lease},
    {j[6], j[7]})
  return 1, j[4]
end

-- Take back a placement whose dispatch reached nobody: the job goes back to its queue and the
-- worker takes no more jobs until its next heartbeat says it is subscribed again.
-- Returns true when put back, false when the placement had already moved on.
local function unassign_job(P, job_id, lease, worker_id, now)
  local jk = P .. 'job:' .. job_id
  local j = redis.call('HMGET', jk, 'state', 'lease', 'worker')
  if tonumber(j[1]) ~= DISPATCHED or j[2] ~= lease or j[3] ~= worker_id then return false end
  release_slot(P, worker_id, job_id)
  redis.call('ZREM', P .. 'acks', job_id)
  requeue(P, jk, job_id, now, false)
  local wk = P .. 'worker:' .. worker_id
  if redis.call('EXISTS', wk) == 1 then redis.call('HSET', wk, 'off', '1') end
  return true
end

-- Protocol buffers encoding of the few relay messages placement publishes itself
-- (proto/jobgate/v1/relay.proto and job.proto; the tests parse them with protobuf).
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
local function pb_timestamp(ms)  -- google.protobuf.Timestamp
  local nanos = (ms % 1000) * 1000000
  return pb_int(1, (ms - ms % 1000) / 1000) .. pb_int(2, nanos)
end
local function pb_dispatch(id, lease, attempt, spec, timeout_ms)  -- DispatchJob
  return pb_bytes(1, id) .. pb_int(2, lease) .. pb_int(3, attempt) .. pb_bytes(4, spec) .. pb_int(5, timeout_ms)
end

-- Place waiting jobs of one queue on live workers with free slots, least loaded first, and
-- publish them: per worker one WorkerMessage (dispatch, or dispatches for several) on its dispatch
-- channel, then one JobEvents with the DISPATCHED events on the results channel. A dispatch that
-- reaches nobody is taken back at once (unassign_job). Waiting jobs are kept per kind, so kinds that
-- no free worker handles cost nothing and never hold up the others; across the kinds that can run,
-- jobs go in priority, then submission, order. A queue with nothing waiting is dropped from the
-- queues set (submit adds it back), so the gateways' periodic pass only visits queues that hold jobs.
-- Each placement must be acknowledged (started) within the job's 'ack' field (ms, stored at
-- submit), or `ack_ms` for a job stored without one.
-- With `only` (a worker id), only that worker is a candidate: a worker refilling the slots it has
-- just freed costs the same however many workers serve the queue.
-- With `taken` as well (a table; `only` is then the calling worker), the placed jobs are started
-- at once, as start would on that worker's behalf: RUNNING, no acknowledgement deadline, nothing
-- on the dispatch channel; {id, d} pairs (d: the job's DispatchJobs entry, field 1) are appended
-- to `taken`, for the caller to return, and their DISPATCHED and RUNNING events are published.
-- Appends 5 entries per placement to `out`: job id, worker id, lease, attempt (of the coming
-- start), 1 dispatched or 0 taken back (its worker had no subscriber). Returns true when jobs are
-- still waiting in the queue afterwards.
local function place_jobs(P, queue, now, ack_ms, most, out, only, taken)
  local kinds_key = P .. 'kinds:' .. queue
  local waiting = {}  -- kinds with jobs waiting
  for _, kind in ipairs(redis.call('SMEMBERS', kinds_key)) do
    if redis.call('EXISTS', P .. 'pending:' .. queue .. ':' .. kind) == 1 then
      waiting[#waiting + 1] = kind
    else
      redis.call('SREM', kinds_key, kind)
    end
  end
  if #waiting == 0 then
    redis.call('SREM', P .. 'queues', queue)
    return false
  end

  local cands = {}
  local free = 0
  local qworkers = P .. 'qworkers:' .. queue
  local workers
  if only then
    workers = redis.call('SISMEMBER', qworkers, only) == 1 and {only} or {}
  else
    workers = redis.call('SMEMBERS', qworkers)
  end
  for _, w in ipairs(workers) do
    local h = redis.call('HMGET', P .. 'worker:' .. w, 'slots', 'used', 'expires', 'kinds', 'off')
    if not h[1] then
      redis.call('SREM', qworkers, w)
    elseif tonumber(h[3]) > now and h[5] ~= '1' then
      local slots, used = tonumber(h[1]), tonumber(h[2])
      if used < slots then
        local kinds = h[4]
        if kinds ~= '' then kinds = ',' .. kinds .. ',' end
        cands[#cands + 1] = {id = w, slots = slots, used = used, kinds = kinds}
        free = free + slots - used
      end
    end
  end
  if free == 0 then return true end

  -- the least loaded candidate with a free slot that handles `kind`
  local function pick(kind)
    local best, best_load = nil, 2
    for _, c in ipairs(cands) do
      if c.used < c.slots and (c.kinds == '' or string.find(c.kinds, ',' .. kind .. ',', 1, true)) then
        local load = c.used / c.slots
        if load < best_load then best, best_load = c, load end
      end
    end
    return best
  end

  -- the first waiting jobs of each kind that some candidate handles, as many as can be placed
  local limit = math.min(most, free)
  local heads = {}
  for _, kind in ipairs(waiting) do
    if pick(kind) then
      local key = P .. 'pending:' .. queue .. ':' .. kind
      local first = redis.call('ZRANGE', key, 0, limit - 1, 'WITHSCORES')
      if first[1] then
        heads[kind] = {key = key, ids = first, pos = 1, score = tonumber(first[2]), taken = {}}
      end
    end
  end

  local placed, order, by_worker, acks = {}, {}, {}, {}
  local lease_key = P .. 'lease'
  local lease = tonumber(redis.call('GET', lease_key) or '0')
  while #placed < most and free > 0 do
    local kind, head = nil, nil
    for k, h in pairs(heads) do
      if h.score and (not head or h.score < head.score) then kind, head = k, h end
    end
    if not head then break end
    local c = pick(kind)
    if not c then
      heads[kind].score = nil  -- its workers are full now
    else
      local id = head.ids[head.pos]
      head.taken[#head.taken + 1] = id
      head.pos = head.pos + 2
      head.score = tonumber(head.ids[head.pos + 1])
      local jk = P .. 'job:' .. id
      local j = redis.call('HMGET', jk, 'state', 'attempt', 'spec', 'timeout_ms', 'ack')
      if j[1] and tonumber(j[1]) == QUEUED then
        lease = lease + 1
        local lease_s = string.format('%.0f', lease)
        local attempt = tonumber(j[2]) + 1
        if taken then
          redis.call('HSET', jk, 'state', RUNNING, 'worker', c.id, 'lease', lease_s, 'attempt', attempt,
            'started', now, 'updated', now)
        else
          redis.call('HSET', jk, 'state', DISPATCHED, 'worker', c.id, 'lease', lease_s, 'updated', now)
          acks[#acks + 1] = now + (tonumber(j[5]) or ack_ms)
          acks[#acks + 1] = id
        end
        c.used = c.used + 1
        free = free - 1
        placed[#placed + 1] = {id = id, worker = c.id, lease = lease, attempt = attempt, kind = kind}
        if not by_worker[c.id] then
          by_worker[c.id] = {}
          order[#order + 1] = c.id
        end
        local d = pb_dispatch(id, lease, attempt, j[3], tonumber(j[4]))
        table.insert(by_worker[c.id], {d = d, p = placed[#placed]})
      end  -- else: expired or already moved on, so it was not waiting any more
    end
  end
  for _, h in pairs(heads) do call_chunked('ZREM', h.key, h.taken, 1000) end
  if #placed > 0 then redis.call('SET', lease_key, string.format('%.0f', lease)) end
  call_chunked('ZADD', P .. 'acks', acks, 1000)
  for _, w in ipairs(order) do
    local ids = {}
    for i, d in ipairs(by_worker[w]) do ids[i] = d.p.id end
    call_chunked('SADD', P .. 'worker:' .. w .. ':jobs', ids, 1000)
    redis.call('HINCRBY', P .. 'worker:' .. w, 'used', #ids)
  end

  if taken then
    for _, w in ipairs(order) do
      for _, d in ipairs(by_worker[w]) do
        taken[#taken + 1] = {id = d.p.id, d = pb_bytes(1, d.d)}
        d.p.reached = true
      end
    end
    order = {}  -- nothing to publish on the dispatch channel
  end
  -- Per worker, WorkerMessages under MESSAGE_BYTES: `dispatch` for a lone job, else `dispatches`.
  for _, w in ipairs(order) do
    local ds, first = by_worker[w], 1
    while first <= #ds do
      local last, size = first, #ds[first].d
      while last < #ds and size + #ds[last + 1].d <= MESSAGE_BYTES do
        last = last + 1
        size = size + #ds[last].d
      end
      local msg
      if last == first then
        msg = pb_bytes(1, ds[first].d)
      else
        local jobs = {}
        for i = first, last do jobs[#jobs + 1] = pb_bytes(1, ds[i].d) end
        msg = pb_bytes(3, table.concat(jobs))
      end
      local ok = redis.call('PUBLISH', P .. 'dispatch:' .. w, msg) > 0
      for i = first, last do ds[i].p.reached = ok end
      first = last + 1
    end
  end
  local events, ts = {}, pb_timestamp(now)
  for _, p in ipairs(placed) do
    if p.reached then
      local about = pb_bytes(1, p.id) .. pb_bytes(2, queue) .. pb_bytes(3, p.kind)
      local rest = pb_int(5, p.attempt) .. pb_bytes(6, p.worker) .. pb_bytes(10, ts)
      events[#events + 1] = pb_bytes(1, about .. pb_int(4, DISPATCHED) .. rest)
      if taken then events[#events + 1] = pb_bytes(1, about .. pb_int(4, RUNNING) .. rest) end
    else
      unassign_job(P, p.id, string.format('%.0f', p.lease), p.worker, now)
    end
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = p.id, p.worker, p.lease, p.attempt
    out[n + 5] = p.reached and 1 or 0
  end
  publish_parts(P .. 'results', events)
  local left = false
  for _, kind in ipairs(waiting) do
    if redis.call('EXISTS', P .. 'pending:' .. queue .. ':' .. kind) == 1 then
      left = true
    else
      redis.call('SREM', kinds_key, kind)  -- nothing waits: forget the kind until a job of it comes
    end
  end
  return left
end
