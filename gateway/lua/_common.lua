-- Shared prelude, prepended to every script by gateway/scripts.py.
-- States (jobgate.v1.JobState): 1 QUEUED, 2 DISPATCHED, 3 RUNNING, 4 SUCCEEDED, 5 FAILED, 6 CANCELLED.
-- Key rules for names built from a prefix P (ARGV, e.g. "{jobgate}:"): P.."job:"..id (hash),
-- P.."pending:"..queue..":"..kind (zset), P.."kinds:"..queue (set), P.."worker:"..id (hash),
-- P.."worker:"..id..":jobs" (set), P.."qworkers:"..queue (set). All share P's hash tag.
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
local function finish_job(job_key, state, code, message, now)
  redis.call('HSET', job_key, 'state', state, 'err_code', code, 'err_msg', message,
    'finished', now, 'updated', now)
  redis.call('HDEL', job_key, 'cancel')
  local ttl = tonumber(redis.call('HGET', job_key, 'ttl') or '0')
  if ttl and ttl > 0 then redis.call('EXPIRE', job_key, ttl) end
end

-- Take a job off a worker's books: its job set and busy-slot count.
local function release_slot(P, worker_id, job_id)
  if worker_id == nil or worker_id == '' then return end
  if redis.call('SREM', P .. 'worker:' .. worker_id .. ':jobs', job_id) == 1 then
    local wk = P .. 'worker:' .. worker_id
    if redis.call('EXISTS', wk) == 1 then redis.call('HINCRBY', wk, 'used', -1) end
  end
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

-- A worker acknowledges one dispatch (the start and start_many scripts; contract in start.lua).
-- Returns 1 running, 0 stale, -1 missing; and true when it changed the job (its RUNNING event is
-- to be published).
local function start_job(job_key, acks_key, job_id, lease, worker_id, now)
  local j = redis.call('HMGET', job_key, 'state', 'lease', 'worker', 'attempt')
  if not j[1] then return -1 end
  if j[2] ~= lease or j[3] ~= worker_id then return 0 end
  if tonumber(j[1]) == RUNNING then return 1 end
  if tonumber(j[1]) ~= DISPATCHED then return 0 end
  redis.call('HSET', job_key, 'state', RUNNING, 'attempt', tonumber(j[4]) + 1, 'started', now, 'updated', now)
  redis.call('ZREM', acks_key, job_id)
  return 1, true
end

-- A worker records one outcome (the finish and finish_many scripts; contract in finish.lua).
-- `o` holds job_id, lease, state (a number), result, output, code, message.
-- Returns 1 recorded (its event is to be published), 2 already recorded by this placement,
-- 0 stale, -1 missing, -2 not a terminal state (nothing written).
local function record_outcome(P, job_key, worker_id, now, o)
  local j = redis.call('HMGET', job_key, 'state', 'lease', 'worker')
  if not j[1] then return -1 end
  if not is_terminal(o.state) then return -2 end
  if j[2] ~= o.lease or j[3] ~= worker_id then return 0 end
  -- 'recorded' names the lease whose outcome this script wrote; reap, leave and cancel never set it
  if tonumber(j[1]) == o.state and redis.call('HGET', job_key, 'recorded') == o.lease then return 2 end
  if tonumber(j[1]) ~= RUNNING then return 0 end
  redis.call('HSET', job_key, 'result', o.result, 'output', o.output, 'recorded', o.lease)
  finish_job(job_key, o.state, o.code, o.message, now)
  release_slot(P, worker_id, o.job_id)
  return 1
end
