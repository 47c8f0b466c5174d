// A minimal jobgate worker in Node.js, written from docs/PROTOCOL.md alone: the Lua scripts of
// protocol/lua/ and the envelopes of proto/jobgate/v1/, nothing from the Python worker.
//
// Usage: node tests/node/worker.mjs REDIS_URL NAMESPACE WORKER_ID
// Env: JOBGATE_HEARTBEAT_MS (default 200), JOBGATE_HEARTBEAT_TTL_MS (default 1000),
// JOBGATE_QUEUES (comma-separated, default "default"), JOBGATE_REDIS_SHARDS (default 1),
// JOBGATE_LABELS (name=value pairs, comma-separated, default none).
//
// Serves its queues with kinds node.count, node.fail and node.upper. On SIGTERM it drains (PROTOCOL.md,
// "What a worker must do", step 7) and exits 0; a second signal exits 1 at once.

import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import protobuf from 'protobufjs';
import { createClient, ErrorReply, RESP_TYPES } from 'redis';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const [url, namespace, workerId] = process.argv.slice(2);
if (!url || !/^[A-Za-z0-9_.-]{1,32}$/.test(namespace ?? '') || !/^[A-Za-z0-9_.-]{1,128}$/.test(workerId ?? '')) {
  process.stderr.write('usage: node worker.mjs REDIS_URL NAMESPACE WORKER_ID\n');
  process.exit(2);
}
const HEARTBEAT_MS = Number(process.env.JOBGATE_HEARTBEAT_MS ?? 200);
const HEARTBEAT_TTL_MS = Number(process.env.JOBGATE_HEARTBEAT_TTL_MS ?? 1000);
const GRACE_MS = 5000; // how long SIGTERM waits for running jobs
const SLOTS = 4;
const QUEUES = (process.env.JOBGATE_QUEUES ?? 'default').split(',').filter(Boolean);
const SHARDS = Number(process.env.JOBGATE_REDIS_SHARDS ?? 1);
// Labels go to the heartbeat sorted by name, as "name=value" pairs joined by ','.
const LABELS = (process.env.JOBGATE_LABELS ?? '').split(',').filter(Boolean).sort().join(',');
const INSTANCE = randomBytes(16).toString('hex'); // once per process: a restart evicts our old registration
const { RUNNING, SUCCEEDED, FAILED, CANCELLED } = { RUNNING: 3, SUCCEEDED: 4, FAILED: 5, CANCELLED: 6 };

// Handlers: args is the plain JSON of spec.args; a throw is a HANDLER_ERROR. `progress(fraction,
// message)` reports how far the job has come (sent at most every PROGRESS_MS, the latest only).
const PROGRESS_MS = 500;
const HANDLERS = {
  'node.count': async (args, d, progress) => {
    const steps = Number(args?.steps ?? 10);
    for (let i = 1; i <= steps; i++) {
      progress(i / steps, `step ${i} of ${steps}`);
      await sleep((Number(args?.seconds ?? 1) * 1000) / steps);
    }
    return { steps, by: 'node' };
  },
  'node.fail': () => {
    throw new Error('node.fail always fails');
  },
  'node.upper': (args) => {
    if (typeof args?.text !== 'string') throw new TypeError('args.text must be a string');
    return { text: args.text.toUpperCase(), by: 'node' };
  },
};
const KINDS = Object.keys(HANDLERS).sort().join(',');

const log = (msg) => process.stderr.write(`${new Date().toISOString()} node worker ${workerId}: ${msg}\n`);

// --- keys (PROTOCOL.md, "Keys", "Shards" and "Channels") -------------------------------------
// CRC-32 (IEEE, as zlib computes it) of a queue name's bytes picks its shard.
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(text) {
  let c = 0xffffffff;
  for (const byte of Buffer.from(text, 'utf8')) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
const queueShard = (queue) => crc32(queue) % SHARDS;
const jobShard = (id) => parseInt(id.slice(0, 4), 16) % SHARDS;
const prefix = (shard) => (shard === 0 ? `{${namespace}}:` : `{${namespace}:${shard}}:`);
const shardKeys = (shard) => {
  const P = prefix(shard);
  return {
    P,
    // The shard's own keys, KEYS[1..8] of every script but read_events, in this order.
    namespace: ['queues', 'seq', 'lease', 'acks', 'cancels', 'workers', 'results', 'delayed'].map((n) => `${P}${n}`),
    // This worker's own keys there, KEYS[9..10] of the scripts a worker calls: its hash and its jobs set.
    own: [`${P}worker:${workerId}`, `${P}worker:${workerId}:jobs`],
    dispatch: `${P}dispatch:${workerId}`,
    results: `${P}results`,
  };
};
// The shards this worker's queues fall in, each with its queues and its share of the slots.
const SHARD_QUEUES = new Map();
for (const q of QUEUES) SHARD_QUEUES.set(queueShard(q), [...(SHARD_QUEUES.get(queueShard(q)) ?? []), q]);
const MINE = [...SHARD_QUEUES.keys()];
const share = (i) => Math.floor(SLOTS / MINE.length) + (i < SLOTS % MINE.length ? 1 : 0);
const K = {
  job: (id) => `${prefix(jobShard(id))}job:${id}`,
  ofJob: (id) => shardKeys(jobShard(id)),
  status: `${prefix(0)}worker-status`, // one for the namespace
};

// --- messages: binary protobuf of the jobgate.v1 types, field names as in the .proto files ------
const root = new protobuf.Root();
// Imports resolve under proto/; protobufjs substitutes its bundled google/protobuf/*.proto copies.
root.resolvePath = (_origin, target) => path.join(ROOT, 'proto', target);
root.loadSync(['jobgate/v1/job.proto', 'jobgate/v1/relay.proto'], { keepCase: true });
const T = Object.fromEntries(
  ['JobEvents', 'WorkerMessage', 'WorkerStatus', 'Progress', 'JobSpec'].map((n) => [n, root.lookupType(`jobgate.v1.${n}`)]),
);
const Value = root.lookupType('google.protobuf.Value');
const encode = (type, obj) => Buffer.from(type.encode(type.fromObject(obj)).finish());
const timestamp = (ms) => ({ seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 });

// google.protobuf.Value <-> plain JSON (decoded with oneofs: true, `kind` names the member set).
const mapValues = (obj, f) => Object.fromEntries(Object.entries(obj ?? {}).map(([k, x]) => [k, f(x)]));
function toValue(v) {
  if (v === null) return { nullValue: 0 };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  if (typeof v === 'object') return { structValue: { fields: mapValues(v, toValue) } };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (typeof v === 'number' && Number.isFinite(v)) return { numberValue: v };
  throw new TypeError(`result is not JSON-compatible: ${String(v)}`);
}
function fromValue(v) {
  if (v == null || v.kind === 'nullValue') return null;
  if (v.kind === 'structValue') return mapValues(v.structValue.fields, fromValue);
  if (v.kind === 'listValue') return (v.listValue.values ?? []).map(fromValue);
  return v[v.kind];
}

// --- Redis: one command connection, one for the dispatch subscription --------------------------
const redis = createClient({ url }).on('error', (e) => log(`redis: ${e.message}`));
const sub = redis.duplicate().on('error', (e) => {
  subscribed = false; // the socket died with the subscription; 'ready' follows the resubscribe
  log(`subscription: ${e.message}`);
});
const BINARY = { typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } };

// Every script is the prelude, then the script's text run as a function, then flush_counts (which
// writes the counts the call kept); EVALSHA, loading it on NOSCRIPT.
const prelude = readFileSync(path.join(ROOT, 'protocol/lua/_common.lua'), 'utf8');
const scripts = {};
for (const name of ['heartbeat', 'start', 'finish', 'leave', 'progress']) {
  const body = readFileSync(path.join(ROOT, `protocol/lua/${name}.lua`), 'utf8');
  const text = `${prelude}\nlocal function body()\n${body}\nend\nlocal reply = body()\nflush_counts()\nreturn reply\n`;
  scripts[name] = { text, sha: createHash('sha1').update(text).digest('hex') };
}
async function script(name, keys, args) {
  const { text, sha } = scripts[name];
  const argv = args.map((a) => (Buffer.isBuffer(a) ? a : String(a))); // every ARGV is a string
  const cmd = ['EVALSHA', sha, String(keys.length), ...keys, ...argv];
  try {
    return await redis.sendCommand(cmd);
  } catch (e) {
    if (!(e instanceof ErrorReply) || !e.message.startsWith('NOSCRIPT')) throw e;
    await redis.sendCommand(['SCRIPT', 'LOAD', text]); // first use, or after a restart or SCRIPT FLUSH
    return redis.sendCommand(cmd);
  }
}

// start and finish are retried until Redis answers (step 5): a repeat of either is answered as the first.
const TRANSIENT = /^(OOM|READONLY|BUSY|LOADING|TRYAGAIN|MASTERDOWN|CLUSTERDOWN)/;
async function retrying(what, jobId, call) {
  for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
    try {
      return await call();
    } catch (e) {
      if (e instanceof ErrorReply && !TRANSIENT.test(e.message)) throw e;
      log(`job_id=${jobId} ${what} not recorded yet (${e.message}); retrying`);
      await sleep(delay);
    }
  }
}

// The stored state of jobs a script settled (leave, or heartbeat's eviction), as JobEvents on results.
async function publishSettled(flat) {
  for (let i = 0; i + 2 < flat.length; i += 3) {
    const id = String(flat[i]);
    const names = ['state', 'queue', 'kind', 'attempt', 'worker', 'updated', 'created', 'result', 'output', 'err_code',
      'err_msg'];
    const h = await redis.sendCommand(['HMGET', K.job(id), ...names], BINARY);
    const f = Object.fromEntries(names.map((n, j) => [n, h[j]]));
    if (!f.state) continue; // expired meanwhile
    const str = (k) => (f[k] ? f[k].toString() : '');
    const num = (k) => Number(str(k) || 0);
    const event = {
      job_id: id, queue: str('queue'), kind: str('kind'), state: num('state'), attempt: num('attempt'),
      worker_id: str('worker'), output: f.output,
      time: timestamp(num('updated')), created_at: timestamp(num('created')),
    };
    if (f.result?.length) event.result = Value.toObject(Value.decode(f.result));
    if (str('err_code')) event.error = { code: str('err_code'), message: str('err_msg') };
    await redis.publish(K.ofJob(id).results, encode(T.JobEvents, { events: [event] }));
    log(`job_id=${id} settled: state ${event.state}`);
  }
}

const status = (change) => redis.publish(K.status, encode(T.WorkerStatus, { worker_id: workerId, change }));
const [JOINED, LEAVING, LEFT] = [1, 2, 3];

// --- heartbeat (step 1) ------------------------------------------------------------------------
const jobs = new Map(); // job id -> { lease (BigInt), cancelled, abandoned, done (Promise) }
let subscribed = false;
let draining = false;
let registered = false;
let beating = true;
let beatTimer;
let lastBeat = Promise.resolve();

async function beat() {
  const now = Date.now();
  const held = [...jobs.entries()]; // what an eviction found by this beat can have taken away
  const off = subscribed && !draining ? '0' : '1';
  let again = false;
  for (const [i, shard] of MINE.entries()) { // one registration per shard, with its queues and share
    const k = shardKeys(shard);
    const reply = await script('heartbeat', [...k.namespace, ...k.own], [k.P, workerId, now, now + HEARTBEAT_TTL_MS,
      share(i), SHARD_QUEUES.get(shard).join(','), KINDS, os.hostname(), process.pid, off, INSTANCE, LABELS]);
    if (reply[0] === 1 && registered) {
      again = true;
      const lost = held.filter(([id]) => jobShard(id) === shard);
      log(`registered again in shard ${shard} after an eviction; abandoning ${lost.length} jobs`);
      for (const [, job] of lost) job.abandoned = true; // settled by the eviction: never call finish for them
    }
    await publishSettled(reply.slice(1)); // jobs of an earlier process under our id
  }
  registered = true;
  if (again && subscribed && !draining) await status(JOINED);
}
const beatQuietly = () => (lastBeat = beat().catch((e) => log(`heartbeat failed: ${e?.message || e}`)));
function beatLoop() {
  beatQuietly().then(() => {
    if (beating) beatTimer = setTimeout(beatLoop, HEARTBEAT_MS);
  });
}

// --- dispatch channel (steps 3-6) ----------------------------------------------------------------
function onMessage(data) {
  let msg;
  try {
    msg = T.WorkerMessage.toObject(T.WorkerMessage.decode(data), { oneofs: true, longs: String });
  } catch {
    return log('dropped a malformed dispatch message');
  }
  if (msg.body === 'dispatch') onDispatch(msg.dispatch);
  else if (msg.body === 'dispatches') for (const d of msg.dispatches.jobs ?? []) onDispatch(d);
  else if (msg.body === 'cancel') onCancel(msg.cancel);
}

function onDispatch(d) {
  if (!/^[0-9a-f]{32}$/.test(d.job_id ?? '')) return log('dropped a dispatch with a malformed job id');
  d.spec ??= {};
  const lease = BigInt(d.lease ?? 0);
  const held = jobs.get(d.job_id);
  if ((held && held.lease >= lease) || draining) return; // a repeat; or left to leave to hand back
  const job = { lease, cancelled: false, abandoned: false };
  jobs.set(d.job_id, job);
  job.done = execute(d, job)
    .catch((e) => log(`job_id=${d.job_id} could not be run: ${e.stack ?? e}`)) // stays placed: leave or reap settles it
    .finally(() => jobs.get(d.job_id) === job && jobs.delete(d.job_id));
}

function onCancel(c) {
  const job = jobs.get(c.job_id);
  if (!job || job.lease !== BigInt(c.lease ?? 0)) return; // not this placement
  job.cancelled = true;
  job.cancel?.();
  log(`job_id=${c.job_id} cancel requested`);
}

const jobEvent = (d, state, extra = {}) => ({
  job_id: d.job_id, queue: d.spec.queue, kind: d.spec.kind, state, attempt: d.attempt, worker_id: workerId,
  time: timestamp(Date.now()), ...extra,
});

async function execute(d, job) {
  const lease = job.lease.toString(); // the plain decimal, compared as a string by the scripts
  if (d.spec_omitted) { // too large to carry in the dispatch: read from the job hash, plainly (step 4)
    const raw = await retrying('spec read', d.job_id, () => redis.sendCommand(['HGET', K.job(d.job_id), 'spec'], BINARY));
    if (!raw) return log(`job_id=${d.job_id} dropped a dispatch of a job that no longer exists`);
    d.spec = T.JobSpec.toObject(T.JobSpec.decode(raw), { oneofs: true, longs: String });
  }
  const running = encode(T.JobEvents, { events: [jobEvent(d, RUNNING)] });
  const k = K.ofJob(d.job_id); // start and finish go to the shard the job id names
  const started = await retrying('start', d.job_id, () =>
    script('start', [...k.namespace, ...k.own, K.job(d.job_id)], [k.P, d.job_id, lease, workerId, INSTANCE, Date.now(), running]));
  if (started !== 1) return log(`job_id=${d.job_id} dispatch refused (${started === -1 ? 'missing' : 'stale'})`);
  log(`job_id=${d.job_id} kind=${d.spec.kind} attempt=${d.attempt} started`);
  const out = await run(d, job);
  if (job.abandoned) return log(`job_id=${d.job_id} abandoned: its placement was settled elsewhere`);
  const value = out.state === SUCCEEDED ? toValue(out.result) : undefined;
  const error = out.code ? { code: out.code, message: out.message } : undefined;
  const event = encode(T.JobEvents, { events: [jobEvent(d, out.state, { result: value, error })] });
  const args = [k.P, d.job_id, lease, workerId, out.state, Date.now(), value ? encode(Value, value) : '', '',
    out.code ?? '', out.message ?? '', event];
  const reply = await retrying('finish', d.job_id, () => script('finish', [...k.namespace, ...k.own, K.job(d.job_id)], args));
  const recorded = reply[0] === 1 || reply[0] === 2; // 2: an earlier try whose reply was lost recorded it
  log(`job_id=${d.job_id} ${recorded ? `finished in state ${out.state}` : 'outcome discarded: superseded'}`);
}

// Progress (PROTOCOL.md, "progress"): the latest report of each running job, sent every PROGRESS_MS
// with one progress call per shard; best effort (a failed call is logged and dropped).
const reports = new Map(); // job id -> { d, lease, fraction, message, at }
async function sendProgress() {
  const byShard = new Map();
  for (const [id, r] of reports) byShard.set(jobShard(id), [...(byShard.get(jobShard(id)) ?? []), r]);
  reports.clear();
  for (const [shard, list] of byShard) {
    const k = shardKeys(shard);
    const args = [k.P, workerId];
    for (const r of list) {
      const progress = { fraction: r.fraction, message: r.message, time: timestamp(r.at) };
      args.push(r.lease, encode(T.Progress, progress),
        encode(T.JobEvents, { events: [jobEvent(r.d, RUNNING, { progress })] }));
    }
    try {
      await script('progress', [...k.namespace, ...k.own, ...list.map((r) => K.job(r.d.job_id))], args);
    } catch (e) {
      log(`progress not recorded (${e.message})`);
    }
  }
}
const progressTimer = setInterval(() => reports.size && sendProgress(), PROGRESS_MS);

// The outcome of one attempt: { state, result } or { state, code, message } (PROTOCOL.md's table).
async function run(d, job) {
  const cancelled = { state: CANCELLED, code: 'CANCELLED', message: 'cancelled by request' };
  if (job.cancelled) return cancelled; // the cancel arrived before the handler started
  const handler = HANDLERS[d.spec.kind];
  if (!handler) {
    return { state: FAILED, code: 'UNKNOWN_KIND', message: `no handler for kind '${d.spec.kind}' on worker ${workerId}` };
  }
  const timedOut = { state: FAILED, code: 'TIMEOUT', message: `attempt ${d.attempt} ran longer than ${d.timeout_ms} ms` };
  let timer;
  const stop = new Promise((resolve) => {
    job.cancel = () => resolve(cancelled);
    if (Number(d.timeout_ms) > 0) timer = setTimeout(() => resolve(timedOut), Number(d.timeout_ms));
  });
  const work = (async () => {
    const progress = (fraction, message = '') => {
      if (!(fraction >= 0 && fraction <= 1)) throw new RangeError('progress fraction must be from 0 to 1');
      const lease = job.lease.toString();
      if (!job.ended) reports.set(d.job_id, { d, lease, fraction, message: String(message).slice(0, 256), at: Date.now() });
    };
    const value = await handler(d.spec.args ? fromValue(d.spec.args) : null, d, progress);
    toValue(value); // throws (HANDLER_ERROR) when the value is not JSON
    return { state: SUCCEEDED, result: value };
  })().catch((e) => ({ state: FAILED, code: 'HANDLER_ERROR', message: `${e?.name}: ${e?.message}`.slice(0, 4096) }));
  try {
    return await Promise.race([work, stop]); // a JS handler cannot be stopped: its late result is ignored
  } finally {
    clearTimeout(timer);
    job.ended = true; // the outcome says more than a report not sent yet
    reports.delete(d.job_id);
  }
}

// --- lifecycle: start (steps 1-2) and drain (step 7) -----------------------------------------
// Each Redis step of the shutdown is bounded (commands wait in node-redis's offline queue while Redis is
// away); one that fails or times out is logged, and the gateways' reaping covers for it.
const STEP_MS = 2000;
const TIMED_OUT = Symbol('timed out');
async function quietly(what, promise) {
  try {
    if ((await Promise.race([promise, sleep(STEP_MS, TIMED_OUT)])) === TIMED_OUT) throw new Error('timed out');
  } catch (e) {
    log(`${what} failed (${e.message}); heartbeat expiry and reaping cover for it`);
  }
}

async function shutdown() {
  draining = true;
  log(`draining: waiting up to ${GRACE_MS} ms for ${jobs.size} running jobs`);
  await quietly('heartbeat', lastBeat.then(beatQuietly)); // off=1: nothing new is placed here
  await quietly('LEAVING', status(LEAVING));
  const done = Promise.allSettled([...jobs.values()].map((j) => j.done)); // cancels still arrive meanwhile
  if ((await Promise.race([done, sleep(GRACE_MS, TIMED_OUT)])) === TIMED_OUT) {
    for (const job of jobs.values()) job.abandoned = true; // leave hands them back: no finish
  }
  beating = false; // no heartbeat may register us again after leave
  clearInterval(progressTimer);
  clearTimeout(beatTimer);
  await quietly('last heartbeat', lastBeat);
  await quietly('unsubscribe', sub.unsubscribe(MINE.map((shard) => shardKeys(shard).dispatch)));
  const leave = async () => {
    for (const shard of MINE) {
      const k = shardKeys(shard);
      await publishSettled(await script('leave', [...k.namespace, ...k.own], [k.P, workerId, Date.now()]));
    }
    await status(LEFT);
  };
  await quietly('leave', leave());
  sub.destroy();
  redis.destroy();
  log('stopped');
  process.exit(0);
}

let signals = 0;
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    if (++signals > 1) process.exit(1); // a second signal exits at once
    shutdown().catch((e) => {
      log(`shutdown failed: ${e.stack ?? e}`);
      process.exit(1);
    });
  });
}

await redis.connect();
await sub.connect();
beatLoop(); // registered with off=1 until subscribed
await lastBeat; // the first heartbeat comes before SUBSCRIBE (PROTOCOL.md, step 1)
await sub.subscribe(MINE.map((shard) => shardKeys(shard).dispatch), onMessage, true); // true: messages as Buffers
subscribed = true;
// node-redis resubscribes by itself after a dropped connection, then emits 'ready': say so again.
sub.on('ready', () => {
  subscribed = true;
  if (!draining) beatQuietly().then(() => status(JOINED)).catch((e) => log(`JOINED not published: ${e.message}`));
});
await lastBeat;
if (!draining) {
  await beatQuietly(); // off=0 now
  await status(JOINED);
  log(`joined: queues ${QUEUES}, kinds ${KINDS}, ${SLOTS} slots over ${MINE.length} shard(s)`);
}
