-- read_events: what a JobEvent is built from, for several jobs in one call (a read; changes nothing).
-- KEYS: the job hashes. ARGV: the field names.
-- returns an array with, per job, the HMGET of those fields (nil for a missing field; all nil for
-- a missing job)
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return out
