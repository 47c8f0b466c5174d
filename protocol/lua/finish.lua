-- finish: a worker records the outcome of a running job and publishes it.
-- KEYS[1..8] the namespace's keys (see the prelude), KEYS[9] worker hash, KEYS[10] worker jobs set,
--   KEYS[11] job hash
-- ARGV[1] key prefix, ARGV[2] job id, ARGV[3] lease, ARGV[4] worker id, ARGV[5] terminal state,
-- ARGV[6] now ms, ARGV[7] result (google.protobuf.Value bytes, or a NUL byte
-- and flags when values were written apart: see record_outcome in the prelude), ARGV[8] output bytes,
-- ARGV[9] error code, ARGV[10] error message, ARGV[11] JobEvents bytes holding the terminal event
-- A FAILED outcome with code HANDLER_ERROR or TIMEOUT, attempts left and no cancel requested is
-- recorded as a retry instead: the job is SCHEDULED after its backoff, and the script publishes its
-- SCHEDULED event in place of ARGV[11].
-- returns {1, receivers} recorded, {2} this very outcome was already recorded by this script for
--         this placement (a retried call after a lost reply), {0} stale (superseded attempt, or the
--         job was settled by a gateway or an eviction), {-1} missing
local ns = namespace(ARGV[1])
local code, _, _, retry_event = record_outcome(ns, KEYS[OWN_KEYS + 1], ARGV[4], ARGV[6], {
  lease = ARGV[3], state = tonumber(ARGV[5]), result = ARGV[7], output = ARGV[8],
  code = ARGV[9], message = ARGV[10]}, ARGV[2])
if code == -2 then return redis.error_reply('ERR finish needs a terminal state') end
if code == 1 then
  release_slot(ns, ARGV[4], ARGV[2])
  return {1, redis.call(PUBLISH, ns.results, retry_event or ARGV[11])}
end
return {code}
