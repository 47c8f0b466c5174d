-- schedule: place waiting jobs of one queue on live workers with free slots, least loaded first.
-- Waiting jobs are kept per kind, so kinds that no free worker handles cost nothing and never hold
-- up the others; across the kinds that can run, jobs go in priority, then submission, order.
-- A queue with nothing waiting is dropped from the queues set (submit adds it back), so the
-- gateways' periodic pass only visits queues that hold jobs.
-- KEYS[1] kinds set of the queue, KEYS[2] qworkers set of the queue, KEYS[3] acks zset,
-- KEYS[4] lease counter, KEYS[5] queues set
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] ack deadline ms, ARGV[4] queue name,
-- ARGV[5] most placements to make
-- returns a flat array, 6 entries per placement:
--   job id, worker id, lease, attempt (of the coming start), spec bytes, timeout ms
local P, now, queue = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local most = tonumber(ARGV[5])

local waiting = {}  -- kinds with jobs waiting
for _, kind in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', P .. 'pending:' .. queue .. ':' .. kind) == 1 then
    waiting[#waiting + 1] = kind
  else
    redis.call('SREM', KEYS[1], kind)
  end
end
if #waiting == 0 then
  redis.call('SREM', KEYS[5], queue)
  return {}
end

local cands = {}
local free = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local h = redis.call('HMGET', P .. 'worker:' .. w, 'slots', 'used', 'expires', 'kinds', 'off')
  if not h[1] then
    redis.call('SREM', KEYS[2], w)
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
if free == 0 then return {} end

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

-- the first waiting job of each kind that some candidate handles
local heads = {}
local function peek(kind)
  local key = P .. 'pending:' .. queue .. ':' .. kind
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[1] then
    heads[kind] = {id = first[1], score = tonumber(first[2]), key = key}
  else
    heads[kind] = nil
    redis.call('SREM', KEYS[1], kind)  -- nothing waits: forget the kind until a job of it comes
  end
end
for _, kind in ipairs(waiting) do
  if pick(kind) then peek(kind) end
end

local out, placed = {}, 0
while placed < most and free > 0 do
  local kind, head = nil, nil
  for k, h in pairs(heads) do
    if not head or h.score < head.score then kind, head = k, h end
  end
  if not head then break end
  local c = pick(kind)
  if not c then
    heads[kind] = nil  -- its workers are full now
  else
    redis.call('ZREM', head.key, head.id)
    local jk = P .. 'job:' .. head.id
    local j = redis.call('HMGET', jk, 'state', 'attempt', 'spec', 'timeout_ms')
    if j[1] and tonumber(j[1]) == QUEUED then
      local lease = redis.call('INCR', KEYS[4])
      redis.call('HSET', jk, 'state', DISPATCHED, 'worker', c.id, 'lease', lease, 'updated', now)
      redis.call('SADD', P .. 'worker:' .. c.id .. ':jobs', head.id)
      redis.call('HINCRBY', P .. 'worker:' .. c.id, 'used', 1)
      redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), head.id)
      c.used = c.used + 1
      free = free - 1
      placed = placed + 1
      local n = #out
      out[n + 1], out[n + 2], out[n + 3] = head.id, c.id, lease
      out[n + 4], out[n + 5], out[n + 6] = tonumber(j[2]) + 1, j[3], j[4]
    end  -- else: expired or already moved on, so it was not waiting any more
    peek(kind)
  end
end
return out
