// Calling idmap.v1.IdentityService from Node.js with @grpc/grpc-js, the definitions loaded at run
// time from proto/ by @grpc/proto-loader, and deciding what to do with each error.
//
//   node idmap-client.mjs 127.0.0.1:50051 ory_st_...     (IDMAP_API_KEY: the caller's key)

import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { service as healthService } from 'grpc-health-check';
import protobuf from 'protobufjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

/** The repository's proto/ directory: the one source of the API. */
export const PROTO_ROOT = path.resolve(here, '../../proto');

// keepCase: fields keep the .proto's names (session_token), as in every other language's client
// and in grpcurl's JSON.
const definitions = protoLoader.loadSync('idmap/v1/identity.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const IdentityService = grpc.loadPackageDefinition(definitions).idmap.v1.IdentityService;
const HealthClient = grpc.makeGenericClientConstructor(healthService, 'Health');

// google.rpc.Status and its details, from Google's own .proto files (google-proto-files), to
// decode the `grpc-status-details-bin` trailer. Exported for building such statuses in tests.
const googleProtos = path.dirname(require.resolve('google-proto-files/package.json'));
export const rpcTypes = new protobuf.Root().loadSync(
  ['status.proto', 'error_details.proto'].map((f) => path.join(googleProtos, 'google/rpc', f)),
  { keepCase: true },
);
const Status = rpcTypes.lookupType('google.rpc.Status');

/** Every ErrorInfo idmap sends has this domain; without it, the error is not idmap's. */
export const IDMAP_DOMAIN = 'idmap';
const CALLER_REASONS = new Set(['CALLER_UNAUTHENTICATED', 'CALLER_NOT_ALLOWED']);
const OPERATOR_REASONS = new Set(['ORY_ADMIN_UNAUTHORIZED', 'ORY_REDIRECTED']);

/** What the calling service does next. */
export const Action = Object.freeze({
  /** The person's session is gone: send them to the login page. */
  LOG_IN_AGAIN: 'log in again',
  /** The session is fine but its assurance level is too low: ask for a second factor. */
  STEP_UP: 'step up',
  /** idmap or a dependency is briefly unable to answer: try again after a pause. */
  RETRY: 'retry',
  /** Our own service's caller credentials or grants are wrong: page our team, not the person. */
  FIX_CALLER: "fix this service's caller credentials",
  /** idmap's Ory settings are wrong: retrying helps only once its operator has fixed them. */
  ALERT_OPERATOR: "alert idmap's operator",
  /** The request itself is malformed: a bug in the caller, retrying cannot help. */
  FIX_REQUEST: 'fix the request',
  NOT_FOUND: 'not found',
  /** A LinkIdentity that clashes with what is stored; metadata names the other side. */
  CONFLICT: 'conflict',
  /** A bug in idmap or Ory; the server logged the detail. */
  REPORT: 'report a bug',
});

/**
 * @typedef {object} Explanation
 * @property {string} action one of {@link Action}
 * @property {number} code the gRPC status code
 * @property {string} codeName e.g. `UNAUTHENTICATED`
 * @property {string} message
 * @property {string} reason ErrorInfo's reason; empty when the error did not come from idmap
 * @property {Record<string, string>} metadata ErrorInfo's metadata
 * @property {{field: string, description: string}[]} fieldViolations BadRequest's violations
 * @property {number | null} retryAfterMs RetryInfo's delay, when Ory said how long to wait
 * @property {string | undefined} redirectBrowserTo where Ory wants the browser for a step-up
 */

/**
 * Decodes `grpc-status-details-bin` and says what the caller should do about `err`.
 * @param {grpc.ServiceError} err
 * @returns {Explanation}
 */
export function explainError(err) {
  const explanation = {
    action: Action.REPORT,
    code: err.code,
    codeName: grpc.status[err.code] ?? String(err.code),
    message: err.details ?? err.message,
    reason: '',
    metadata: {},
    fieldViolations: [],
    retryAfterMs: null,
    redirectBrowserTo: undefined,
  };
  const raw = err.metadata?.get('grpc-status-details-bin')?.[0];
  const details = raw ? Status.decode(raw).details : [];
  for (const any of details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type;
    try {
      type = rpcTypes.lookupType(typeName);
    } catch {
      continue; // a detail type this client does not know: skip it, as the others would
    }
    const detail = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    switch (typeName) {
      case 'google.rpc.ErrorInfo':
        if (detail.domain === IDMAP_DOMAIN) {
          explanation.reason = detail.reason;
          explanation.metadata = detail.metadata ?? {};
        }
        break;
      case 'google.rpc.BadRequest':
        explanation.fieldViolations = detail.field_violations.map(({ field, description }) => ({
          field,
          description,
        }));
        break;
      case 'google.rpc.RetryInfo':
        explanation.retryAfterMs =
          detail.retry_delay.seconds * 1000 + Math.round(detail.retry_delay.nanos / 1e6);
        break;
      default:
    }
  }
  explanation.redirectBrowserTo = explanation.metadata.redirect_browser_to;
  explanation.action = actionFor(err.code, explanation.reason);
  return explanation;
}

function actionFor(code, reason) {
  // The reason decides before the code: UNAUTHENTICATED and PERMISSION_DENIED each cover both a
  // person's session and our own service's credentials.
  if (CALLER_REASONS.has(reason)) return Action.FIX_CALLER;
  switch (code) {
    case grpc.status.UNAUTHENTICATED:
      // Only idmap's SESSION_INVALID is about the person; anything else refusing us (a mesh, a
      // gateway) is about the calling service.
      return reason === 'SESSION_INVALID' ? Action.LOG_IN_AGAIN : Action.FIX_CALLER;
    case grpc.status.PERMISSION_DENIED:
      // idmap passes Ory's error id through (session_aal2_required, or forbidden): the session is
      // valid but not strong enough. Without idmap's ErrorInfo it is not about the session.
      return reason ? Action.STEP_UP : Action.FIX_CALLER;
    case grpc.status.UNAVAILABLE:
      return OPERATOR_REASONS.has(reason) ? Action.ALERT_OPERATOR : Action.RETRY;
    case grpc.status.RESOURCE_EXHAUSTED:
    case grpc.status.DEADLINE_EXCEEDED:
      return Action.RETRY;
    case grpc.status.INVALID_ARGUMENT:
    case grpc.status.OUT_OF_RANGE:
      return Action.FIX_REQUEST;
    case grpc.status.NOT_FOUND:
      return Action.NOT_FOUND;
    case grpc.status.ALREADY_EXISTS:
      return Action.CONFLICT;
    default:
      return Action.REPORT;
  }
}

const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Runs `call`, retrying errors whose action is RETRY: after RetryInfo's delay when the server gave
 * one, else after a jittered exponential backoff. Other errors are thrown at once.
 * @template T
 * @param {() => Promise<T>} call
 * @param {{attempts?: number, baseDelayMs?: number, sleep?: (ms: number) => Promise<void>}}
 *   [options]
 * @returns {Promise<T>}
 */
export async function withRetry(call, { attempts = 4, baseDelayMs = 200, sleep = sleepMs } = {}) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (err?.code === undefined) throw err;
      const explanation = explainError(err);
      if (explanation.action !== Action.RETRY || attempt === attempts - 1) throw err;
      await sleep(
        explanation.retryAfterMs ?? baseDelayMs * 2 ** attempt * (0.8 + Math.random() * 0.4),
      );
    }
  }
}

/** Turns a google.protobuf.Struct as proto-loader decodes it into a plain object. */
export function structToObject(struct) {
  const value = (v) => {
    switch (v.kind) {
      case 'nullValue':
        return null;
      case 'structValue':
        return structToObject(v.structValue);
      case 'listValue':
        return (v.listValue.values ?? []).map(value);
      default:
        return v[v.kind];
    }
  };
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([k, v]) => [k, value(v)]));
}

/** IdentityService with a deadline on every call and, when given, the caller's API key. */
export class IdmapClient {
  /**
   * @param {string} target host:port
   * @param {{apiKey?: string, timeoutMs?: number}} [options]
   */
  constructor(target, { apiKey, timeoutMs = 5000 } = {}) {
    this.stub = new IdentityService(target, grpc.credentials.createInsecure());
    this.healthStub = new HealthClient(target, grpc.credentials.createInsecure(), {
      channelOverride: this.stub.getChannel(),
    });
    this.apiKey = apiKey;
    this.timeoutMs = timeoutMs;
  }

  close() {
    this.stub.close();
  }

  /** Resolves once the channel is connected, or rejects after `timeoutMs`. */
  waitForReady(timeoutMs = 30_000) {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(new Date(Date.now() + timeoutMs), (err) =>
        err ? reject(err) : resolve(),
      );
    });
  }

  #call(stub, method, request, withKey = true) {
    const metadata = new grpc.Metadata();
    if (withKey && this.apiKey) metadata.set('authorization', `Bearer ${this.apiKey}`);
    const deadline = new Date(Date.now() + this.timeoutMs);
    return new Promise((resolve, reject) => {
      stub[method](request, metadata, { deadline }, (err, answer) =>
        err ? reject(err) : resolve(answer),
      );
    });
  }

  /** The serving status: SERVING, NOT_SERVING, ... (health checks need no caller key). */
  async health(service = '') {
    return (await this.#call(this.healthStub, 'Check', { service }, false)).status;
  }

  /** @param {{session_token: string} | {cookie: string}} credential */
  resolveSession(credential) {
    return this.#call(this.stub, 'ResolveSession', credential);
  }

  async getUserByOryId(oryIdentityId) {
    return (await this.#call(this.stub, 'GetUserByOryId', { ory_identity_id: oryIdentityId })).user;
  }

  async getByExternalId(externalId) {
    return (await this.#call(this.stub, 'GetByExternalId', { external_id: externalId })).user;
  }

  /** @param {{ory_identity_id: string, user_id?: string, external_id?: string}} request */
  linkIdentity(request) {
    return this.#call(this.stub, 'LinkIdentity', request);
  }

  async batchGetUsers(oryIdentityIds) {
    return (await this.#call(this.stub, 'BatchGetUsers', { ory_identity_ids: oryIdentityIds }))
      .users;
  }

  /** @param {{session_token: string} | {session_id: string} | {ory_identity_id: string}} target */
  async invalidateSession(target) {
    await this.#call(this.stub, 'InvalidateSession', target);
  }
}

const STEP_UP_FALLBACK = 'the login flow with aal=aal2';

/**
 * `idmap-client.mjs TARGET SESSION_TOKEN`: who the token belongs to, or what to do instead.
 * Exit codes (shared with the Python and Rust examples): 0 resolved, 2 log in again, 3 step up,
 * 4 still unavailable after retrying, 1 anything else.
 */
export async function main(argv, out = console.log) {
  if (argv.length !== 2) {
    out("usage: idmap-client.mjs HOST:PORT SESSION_TOKEN  (IDMAP_API_KEY: the caller's key)");
    return 64;
  }
  const client = new IdmapClient(argv[0], { apiKey: process.env.IDMAP_API_KEY });
  try {
    const answer = await withRetry(() => client.resolveSession({ session_token: argv[1] }));
    const { email } = structToObject(answer.identity.traits);
    const aal = answer.session.authenticator_assurance_level;
    if (!answer.user) {
      // Only when the server runs with IDMAP_AUTO_LINK=false.
      out(`identity ${answer.identity.id} (${email}) has no user yet, session at ${aal}`);
    } else {
      out(`user ${answer.user.id} (${email}), session ${answer.session.id} at ${aal}`);
    }
    return 0;
  } catch (err) {
    if (err?.code === undefined) throw err;
    const why = explainError(err);
    switch (why.action) {
      case Action.LOG_IN_AGAIN:
        out('session invalid: send the person to log in again');
        return 2;
      case Action.STEP_UP:
        out(
          `step up (${why.reason}): send the browser to ${why.redirectBrowserTo ?? STEP_UP_FALLBACK}`,
        );
        return 3;
      case Action.RETRY:
        out(`idmap still unavailable (${why.reason}): try again later`);
        return 4;
      default:
        out(`${why.action}: ${why.codeName} ${why.reason}: ${why.message}`);
        return 1;
    }
  } finally {
    client.close();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}
