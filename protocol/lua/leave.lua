-- leave: a worker that is shutting down unregisters and hands back every job still placed on it.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set
-- ARGV[1] key prefix, ARGV[2] worker id, ARGV[3] now ms
-- returns a flat array of {job id, queue, new state} triples, one per job handed back
local out = {}
evict_worker(namespace(ARGV[1]), ARGV[2], ARGV[3], true, out)
return out
