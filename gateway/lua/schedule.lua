-- schedule: place waiting jobs of one queue on live workers with free slots, least loaded first.
-- KEYS[1] pending zset of the queue, KEYS[2] qworkers set of the queue, KEYS[3] acks zset,
-- KEYS[4] lease counter
-- ARGV[1] key prefix, ARGV[2] now ms, ARGV[3] ack deadline ms, ARGV[4] how many waiting jobs to
-- look at, ARGV[5] most placements to make
-- returns a flat array, 6 entries per placement:
--   job id, worker id, lease, attempt (of the coming start), spec bytes, timeout ms
local P, now = ARGV[1], tonumber(ARGV[2])
local scan, most = tonumber(ARGV[4]), tonumber(ARGV[5])

local cands = {}
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
    end
  end
end
if #cands == 0 then return {} end

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

local out, placed, free = {}, 0, 0
for _, c in ipairs(cands) do free = free + c.slots - c.used end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, scan - 1)) do
  if placed >= most or free == 0 then break end
  local jk = P .. 'job:' .. id
  local j = redis.call('HMGET', jk, 'kind', 'state', 'attempt', 'spec', 'timeout_ms')
  if not j[1] or tonumber(j[2]) ~= QUEUED then
    redis.call('ZREM', KEYS[1], id)  -- expired or already moved on: not waiting any more
  else
    local c = pick(j[1])
    if c then
      local lease = redis.call('INCR', KEYS[4])
      redis.call('ZREM', KEYS[1], id)
      redis.call('HSET', jk, 'state', DISPATCHED, 'worker', c.id, 'lease', lease, 'updated', now)
      redis.call('SADD', P .. 'worker:' .. c.id .. ':jobs', id)
      redis.call('HINCRBY', P .. 'worker:' .. c.id, 'used', 1)
      redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), id)
      c.used = c.used + 1
      free = free - 1
      placed = placed + 1
      local n = #out
      out[n + 1], out[n + 2], out[n + 3] = id, c.id, lease
      out[n + 4], out[n + 5], out[n + 6] = tonumber(j[3]) + 1, j[4], j[5]
    end
  end
end
return out
