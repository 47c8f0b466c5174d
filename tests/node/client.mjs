// A Node.js client of jobgate's public API that uses nothing but proto/: no generated code.
//
// Usage: node tests/node/client.mjs HOST:PORT
//
// Submits an echo job and watches it complete, follows a failing job with RunJob, and checks that
// a malformed request is refused. Prints one JSON line summarising what it saw and exits 0; on any
// error, or after TIMEOUT_MS overall, prints the error to stderr and exits 1. Judging the summary is
// left to tests/test_node_client.py.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const TIMEOUT_MS = 30_000;
const PROTO_DIR = fileURLToPath(new URL('../../proto/', import.meta.url));

function fail(err) {
  process.stderr.write(`node client: ${err?.stack ?? err}\n`);
  process.exit(1);
}

function loadService() {
  const definition = protoLoader.loadSync(path.join(PROTO_DIR, 'jobgate/v1/scheduler.proto'), {
    // The google/protobuf/*.proto imports (struct, duration, timestamp) need no include dir:
    // protobufjs, under proto-loader, resolves the well-known types from copies it bundles.
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).jobgate.v1.SchedulerService;
}

// google.protobuf.Value <-> plain JS. proto-loader has no JSON mapping for Value: it is a message
// with a `kind` oneof, and with oneofs:true the decoded object names the member that is set.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case 'number':
      return { numberValue: v };
    case 'string':
      return { stringValue: v };
    case 'boolean':
      return { boolValue: v };
    case 'object':
      return { structValue: { fields: Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toValue(x)])) } };
    default:
      throw new TypeError(`no google.protobuf.Value for ${typeof v}`);
  }
}

function fromValue(v) {
  if (v == null) return undefined; // an unset Value field
  switch (v.kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
    case 'stringValue':
    case 'boolValue':
      return v[v.kind];
    case 'structValue':
      return Object.fromEntries(Object.entries(v.structValue.fields).map(([k, x]) => [k, fromValue(x)]));
    case 'listValue':
      return v.listValue.values.map(fromValue);
    default:
      throw new TypeError(`unexpected google.protobuf.Value: ${JSON.stringify(v)}`);
  }
}

function unary(client, method, request, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Collects every message of a server stream; resolves once the server ends it with OK.
function collect(call) {
  return new Promise((resolve, reject) => {
    const messages = [];
    call.on('data', (m) => messages.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

async function main(address) {
  const SchedulerService = loadService();
  const client = new SchedulerService(address, grpc.credentials.createInsecure());
  const deadline = Date.now() + TIMEOUT_MS;
  try {
    const args = { from: 'node', n: 7 };
    const { job } = await unary(client, 'SubmitJob', { kind: 'echo', args: toValue(args) }, deadline);

    // WatchResults with job_ids ends by itself once every named job is terminal, so "the
    // completion event" is everything the stream carries; a count other than 1 is a finding.
    const watched = await collect(client.WatchResults({ job_ids: [job.id] }, { deadline }));
    const completion = watched.find((r) => r.event.job_id === job.id)?.event;

    const run = await collect(client.RunJob({ job: { kind: 'fail' } }, { deadline }));
    const events = run.map((r) => r.event);

    let invalid = { code: 'OK', details: '' };
    try {
      await unary(client, 'SubmitJob', { kind: '' }, deadline);
    } catch (err) {
      if (err.code === undefined) throw err; // not a gRPC status
      invalid = { code: grpc.status[err.code], details: err.details };
    }

    return {
      submitted: job.id,
      watched_count: watched.length,
      watched_state: completion?.state ?? null,
      watched_result: fromValue(completion?.result) ?? null,
      runjob_states: events.map((e) => e.state),
      runjob_error_code: events.at(-1)?.error?.code ?? null,
      invalid_code: invalid.code,
      invalid_details: invalid.details,
    };
  } finally {
    client.close();
  }
}

const address = process.argv[2];
if (!address) fail(new Error('usage: node client.mjs HOST:PORT'));
// The call deadlines bound each RPC; this bounds everything else (loading, a hung close).
// Not unref()'d: should main() stall with nothing left pending, Node would otherwise exit 0 silently.
setTimeout(() => fail(new Error(`timed out after ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
main(address).then((summary) => {
  process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(0));
}, fail);
