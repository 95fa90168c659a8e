// A trigger, a read and a mutation against a Mollifier sidecar, from Node.
//
//   MOLLIFIER_TARGET=127.0.0.1:50051 node index.js
//
// The .proto files are loaded at run time straight from the repository's
// proto/ folder (MOLLIFIER_PROTO_DIR overrides it), so nothing is generated.
// MOLLIFIER_AUTH_TOKEN, when set, is sent as a bearer token on every call.
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.MOLLIFIER_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const TARGET = process.env.MOLLIFIER_TARGET || '127.0.0.1:50051';
const TOKEN = process.env.MOLLIFIER_AUTH_TOKEN || '';
const ENV_ID = process.env.MOLLIFIER_ENV_ID || 'env_node_example';
const ORG_ID = process.env.MOLLIFIER_ORG_ID || 'org_node_example';

const definition = protoLoader.loadSync(
  ['gate.proto', 'buffer.proto', 'mutate.proto'].map((f) => path.join('mollifier', 'v1', f)),
  {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the proto: env_id, not envId
    longs: String, // int64 counts arrive as strings, never rounded
    enums: String, // 'DECISION_MOLLIFY' rather than 3
    defaults: true,
    oneofs: true,
  },
);
const v1 = grpc.loadPackageDefinition(definition).mollifier.v1;
const credentials = grpc.credentials.createInsecure(); // createSsl(ca) for TLS

const gate = new v1.GateService(TARGET, credentials);
const buffer = new v1.BufferService(TARGET, credentials);
const mutate = new v1.MutateService(TARGET, credentials);

function call(client, method, request) {
  const metadata = new grpc.Metadata();
  if (TOKEN) metadata.set('authorization', `Bearer ${TOKEN}`);
  // Every call gets a deadline: a webapp must never hang on its sidecar.
  const deadline = new Date(Date.now() + 5000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

function describeError(err) {
  return `${grpc.status[err.code] || err.code}: ${err.details || err.message}`;
}

async function main() {
  const runId = `run_node_${crypto.randomBytes(8).toString('hex')}`;

  // 1. Trigger: the gate decides; when it says MOLLIFY the run is buffered in
  //    the same call. write_through asks the sidecar to write pass-through runs
  //    to Postgres itself, so the read below finds the run either way.
  const triggered = await call(gate, 'Trigger', {
    env_id: ENV_ID,
    org_id: ORG_ID,
    task_identifier: 'email/send',
    org_feature_flags: { mollifierEnabled: true },
    write_through: process.env.MOLLIFIER_WRITE_THROUGH !== 'false',
    snapshot: {
      run_id: runId,
      payload: Buffer.from(JSON.stringify({ to: 'a@b.c' })),
      payload_type: 'application/json',
      tags: ['node-example'],
    },
  });
  console.log(`trigger: ${triggered.decision} (${triggered.reason}) run_id=${triggered.run_id}`);

  // 2. Read it back, wherever it is (Postgres or the buffer).
  try {
    const got = await call(buffer, 'GetRun', { env_id: ENV_ID, run_id: triggered.run_id });
    console.log(`get_run: ${got.run.status} from ${got.run.source}`);
  } catch (err) {
    // A pass-through run the webapp writes itself is not the sidecar's to read.
    console.log(`get_run: ${describeError(err)}`);
  }

  // 3. A mutation: cancel it. request_id makes a retried cancel apply once.
  try {
    const cancelled = await call(mutate, 'CancelRun', {
      env_id: ENV_ID,
      run_id: triggered.run_id,
      request_id: crypto.randomUUID(),
      reason: 'node example',
    });
    console.log(`cancel_run: ${cancelled.run.status} applied to ${cancelled.applied_to}`);
  } catch (err) {
    if (err.code === grpc.status.UNIMPLEMENTED) {
      console.log('cancel_run: UNIMPLEMENTED (this sidecar has no mutations yet)');
    } else {
      console.log(`cancel_run: ${describeError(err)}`);
    }
  }
}

main()
  .then(() => {
    gate.close();
    buffer.close();
    mutate.close();
  })
  .catch((err) => {
    console.error(`mollifier example failed: ${describeError(err)}`);
    process.exit(1);
  });
