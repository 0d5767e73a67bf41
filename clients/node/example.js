#!/usr/bin/env node
/**
 * Log in to authgrpc, call the protected example greeter, refresh the tokens,
 * log out, and check that the greeter then rejects the token.
 *
 * Start the auth service and the greeter first (see README.md in this
 * folder), then run:
 *
 *     AUTHGRPC_PASSWORD=PASSWORD node example.js
 *
 * Prints one line per step. Exits with 0 when every step behaved as
 * expected, 1 when one did not, and 2 on a usage error.
 */

'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPOSITORY_PROTOS = path.join(__dirname, '..', '..', 'protos');
const VENDORED_PROTOS = path.join(__dirname, 'protos');
const CALL_TIMEOUT_MS = 5000;
const STREAM_COUNT = 3;

const USAGE = `usage: node example.js [--auth HOST:PORT] [--greeter HOST:PORT]
                       [--username NAME] [--password PASSWORD]

  --auth      auth service address (env AUTHGRPC_TARGET, default 127.0.0.1:50051)
  --greeter   example greeter address (env GREETER_TARGET, default 127.0.0.1:50061)
  --username  user to log in as (env AUTHGRPC_USERNAME, default demo)
  --password  that user's password (env AUTHGRPC_PASSWORD, required)

Prefer AUTHGRPC_PASSWORD to --password, which shows in the process list.`;

/** A step whose result differs from what the auth service documents. */
class UnexpectedResult extends Error {}

/** A command line that cannot be run. */
class UsageError extends Error {}

function parseConfig(argv, env) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        auth: { type: 'string' },
        greeter: { type: 'string' },
        username: { type: 'string' },
        password: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (error) {
    throw new UsageError(error.message);
  }
  const config = {
    help: values.help === true,
    auth: values.auth || env.AUTHGRPC_TARGET || '127.0.0.1:50051',
    greeter: values.greeter || env.GREETER_TARGET || '127.0.0.1:50061',
    username: values.username || env.AUTHGRPC_USERNAME || 'demo',
    password: values.password || env.AUTHGRPC_PASSWORD || '',
  };
  if (!config.help && config.password === '') {
    throw new UsageError('missing password: set AUTHGRPC_PASSWORD or pass --password');
  }
  return config;
}

/**
 * Load the service definitions from the repository's protos.
 *
 * google/protobuf/timestamp.proto is not in that folder: protobufjs, which
 * proto-loader parses with, ships the well-known types and resolves any
 * import of google/protobuf/*.proto to its bundled copy.
 */
function loadServices() {
  const definition = protoLoader.loadSync(
    ['authgrpc/v1/auth.proto', 'authgrpc/example/v1/greeter.proto'],
    {
      includeDirs: [REPOSITORY_PROTOS],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  return {
    AuthService: loaded.authgrpc.v1.AuthService,
    GreeterService: loaded.authgrpc.example.v1.GreeterService,
  };
}

/**
 * Load google.rpc.Status and its detail messages, to decode error details.
 *
 * proto-loader returns descriptors without decoders for messages that no
 * service uses, so these go through protobufjs directly.
 */
function loadStatusTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => path.join(VENDORED_PROTOS, target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], {
    keepCase: true,
  });
  return root;
}

const statusTypes = loadStatusTypes();

/**
 * Return the google.rpc.ErrorInfo of a failed call, or null when it has none.
 *
 * The server sends a serialized google.rpc.Status in the trailing metadata
 * key grpc-status-details-bin. Its details are Any messages, each named by a
 * type URL that ends in the full message name.
 */
function errorInfo(error) {
  const values = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (values.length === 0) {
    return null;
  }
  const status = statusTypes.lookupType('google.rpc.Status').decode(values[0]);
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.ErrorInfo') {
      return statusTypes.lookupType(typeName).decode(detail.value);
    }
  }
  return null;
}

function describe(error) {
  if (error.code === undefined) {
    return String(error);
  }
  const info = errorInfo(error);
  const reason = info === null ? 'no ErrorInfo' : info.reason;
  return `${grpc.status[error.code]} (${reason}): ${error.details}`;
}

function callOptions() {
  return { deadline: Date.now() + CALL_TIMEOUT_MS };
}

function bearer(accessToken) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${accessToken}`);
  return metadata;
}

/** Call a unary method and return a promise of its response. */
function unary(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, callOptions(), (error, response) => {
      if (error) {
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

/** Call a server-streaming method and return a promise of every message. */
async function collect(client, method, request, metadata) {
  const messages = [];
  for await (const message of client[method](request, metadata, callOptions())) {
    messages.push(message);
  }
  return messages;
}

/** Run a step that must succeed, and turn a gRPC error into an UnexpectedResult. */
async function expectOk(step, promise) {
  try {
    return await promise;
  } catch (error) {
    throw new UnexpectedResult(`${step} failed: ${describe(error)}`);
  }
}

/** Run a step that must fail with the given gRPC code and ErrorInfo reason. */
async function expectRejected(step, promise, code, reason) {
  let response;
  try {
    response = await promise;
  } catch (error) {
    const info = errorInfo(error);
    if (error.code !== code || info === null || info.reason !== reason) {
      throw new UnexpectedResult(
        `${step} failed with ${describe(error)}, expected ${grpc.status[code]} (${reason})`,
      );
    }
    console.log(`${step} rejected as expected: ${describe(error)}`);
    return;
  }
  throw new UnexpectedResult(
    `${step} succeeded with ${JSON.stringify(response)}, but it should have been rejected`,
  );
}

function check(condition, message) {
  if (!condition) {
    throw new UnexpectedResult(message);
  }
}

function formatTime(timestamp) {
  if (!timestamp) {
    return 'unknown';
  }
  const milliseconds = Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6);
  return new Date(milliseconds).toISOString();
}

async function checkGreeter(greeter, accessToken, username, label) {
  const reply = await expectOk(
    `SayHello ${label}`,
    unary(greeter, 'SayHello', {}, bearer(accessToken)),
  );
  console.log(`SayHello ${label}: ${reply.greeting}`);
  check(
    reply.greeting.includes(username),
    `SayHello greeting ${JSON.stringify(reply.greeting)} does not name ${username}`,
  );
}

async function run(config) {
  const { AuthService, GreeterService } = loadServices();
  // Insecure credentials send the tokens in plaintext, so use them only on
  // loopback. Elsewhere pass grpc.credentials.createSsl() instead.
  const auth = new AuthService(config.auth, grpc.credentials.createInsecure());
  const greeter = new GreeterService(config.greeter, grpc.credentials.createInsecure());
  try {
    const login = await expectOk(
      'login',
      unary(auth, 'Login', { username: config.username, password: config.password }),
    );
    // The server normalizes the username (NFKC, case folding, trimming), so
    // later checks compare with its spelling, not with the one typed in.
    const { username, session_id: sessionId } = login.session;
    console.log(
      `login ok: user ${username}, session ${sessionId}, ` +
        `access token expires ${formatTime(login.access_token_expire_time)}`,
    );
    check(login.token_type === 'Bearer', `token_type is ${login.token_type}, expected Bearer`);

    const validation = await expectOk(
      'ValidateSession',
      unary(auth, 'ValidateSession', { access_token: login.access_token }),
    );
    const { principal } = validation;
    console.log(
      `ValidateSession ok: user ${principal.username}, roles [${principal.roles.join(', ')}], ` +
        `session ${validation.session.session_id}`,
    );
    check(principal.username === username, `ValidateSession returned user ${principal.username}`);
    check(
      validation.session.session_id === sessionId,
      `ValidateSession returned session ${validation.session.session_id}`,
    );

    await checkGreeter(greeter, login.access_token, username, 'with the login token');

    const items = await expectOk(
      'StreamGreetings',
      collect(greeter, 'StreamGreetings', { count: STREAM_COUNT }, bearer(login.access_token)),
    );
    for (const item of items) {
      console.log(`StreamGreetings #${item.index}: ${item.greeting}`);
      check(item.greeting.includes(username), `streamed greeting does not name ${username}`);
    }
    check(
      items.length === STREAM_COUNT,
      `StreamGreetings sent ${items.length} messages, expected ${STREAM_COUNT}`,
    );

    const refreshed = await expectOk(
      'Refresh',
      unary(auth, 'Refresh', { refresh_token: login.refresh_token }),
    );
    console.log(
      `Refresh ok: session ${refreshed.session.session_id}, ` +
        `new access token expires ${formatTime(refreshed.access_token_expire_time)}`,
    );
    check(refreshed.session.session_id === sessionId, 'Refresh moved the tokens to another session');
    check(
      refreshed.refresh_token !== '' && refreshed.refresh_token !== login.refresh_token,
      'Refresh did not rotate the refresh token',
    );
    await checkGreeter(greeter, refreshed.access_token, username, 'with the refreshed token');

    await expectOk('Logout', unary(auth, 'Logout', {}, bearer(refreshed.access_token)));
    console.log(`Logout ok: session ${sessionId} ended`);

    // Both access tokens are still unexpired JWTs with valid signatures, but
    // they name a session that has ended.
    await expectRejected(
      'SayHello after logout',
      unary(greeter, 'SayHello', {}, bearer(refreshed.access_token)),
      grpc.status.UNAUTHENTICATED,
      'SESSION_ENDED',
    );
    await expectRejected(
      'StreamGreetings with the login token after logout',
      collect(greeter, 'StreamGreetings', { count: STREAM_COUNT }, bearer(login.access_token)),
      grpc.status.UNAUTHENTICATED,
      'SESSION_ENDED',
    );
    await expectRejected(
      'ValidateSession after logout',
      unary(auth, 'ValidateSession', { access_token: refreshed.access_token }),
      grpc.status.UNAUTHENTICATED,
      'SESSION_ENDED',
    );
    await expectRejected(
      'Refresh after logout',
      unary(auth, 'Refresh', { refresh_token: refreshed.refresh_token }),
      grpc.status.UNAUTHENTICATED,
      'SESSION_ENDED',
    );
  } finally {
    auth.close();
    greeter.close();
  }
}

async function main() {
  let config;
  try {
    config = parseConfig(process.argv.slice(2), process.env);
  } catch (error) {
    if (!(error instanceof UsageError)) {
      throw error;
    }
    console.error(`${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (config.help) {
    console.log(USAGE);
    return 0;
  }
  try {
    await run(config);
  } catch (error) {
    if (!(error instanceof UnexpectedResult)) {
      throw error;
    }
    console.error(`unexpected result: ${error.message}`);
    return 1;
  }
  console.log('every step behaved as expected');
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(error);
    process.exitCode = 1;
  },
);
