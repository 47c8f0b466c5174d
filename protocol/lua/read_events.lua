-- read_events: what a JobEvent is built from, for several jobs in one call (a read; changes nothing).
-- Sent alone, without the prelude (protocol/scripts.py ALONE): it must use none of its helpers.
-- KEYS: the job hashes. ARGV[1] the most bytes of a large field returned here, ARGV[2] how many of
--   the field names that follow are read as they are (n), then those n names, then the names of
--   fields that may be large (a result, an output).
-- returns an array with, per job, an array of its fields in the order named: the value (nil for a
--   missing or empty field; all nil for a missing job), except that a large field longer than
--   ARGV[1] is answered by its length (an integer) and left for the caller to read with HGET: a
--   value copied into a script costs about 1.4 µs per KB, a plain HGET a tenth of that.
local most, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local plain, large = {}, {}
for i = 3, n + 2 do plain[#plain + 1] = ARGV[i] end
for i = n + 3, #ARGV do large[#large + 1] = ARGV[i] end
local out = {}
for i, key in ipairs(KEYS) do
  local row = redis.call('HMGET', key, unpack(plain))
  for _, field in ipairs(large) do
    local size = redis.call('HSTRLEN', key, field)
    if size == 0 then
      row[#row + 1] = false
    elseif size <= most then
      row[#row + 1] = redis.call('HGET', key, field)
    else
      row[#row + 1] = size
    end
  end
  out[i] = row
end
return out
