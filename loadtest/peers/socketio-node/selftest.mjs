// Smoke test of the Node peer: a private redis-server, two server.js replicas sharing it, the
// stock socket.io-client. Checks the auth contract, cross-replica delivery exactly once, and
// that an organization receives nothing of another's. Exits non-zero on failure.
//
// Absence of a message is proven with markers, not sleeps: a marker published after the
// message under test arrives on the same connection after it would have.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import jwt from "jsonwebtoken";
import { createClient } from "redis";
import { io } from "socket.io-client";

const SERVER = fileURLToPath(new URL("./server.js", import.meta.url));
const JWT_SECRET = "selftest-secret";
const INGEST_KEY = "selftest-key";
const STEP_MS = 5_000;
const TOTAL_MS = 30_000;

const children = [];
const sockets = [];
const started = Date.now();

function ok(what) {
  process.stdout.write(`ok - ${what}\n`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

// A child process whose output is kept (shown on failure) and can be waited on line by line.
function start(name, command, args, env = {}) {
  const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const proc = { name, child, output: "", exited: null, waiters: [] };
  proc.exited = new Promise((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
    child.once("error", (err) => {
      proc.output += `spawn failed: ${err.message}\n`;
      resolve({ code: null, signal: null, error: err });
    });
  });
  const onData = (chunk) => {
    proc.output += chunk;
    proc.waiters = proc.waiters.filter(({ pattern, resolve }) => !(pattern.test(proc.output) && (resolve(), true)));
  };
  child.stdout.setEncoding("utf8").on("data", onData);
  child.stderr.setEncoding("utf8").on("data", onData);
  proc.waitFor = (pattern, what) => {
    if (pattern.test(proc.output)) return Promise.resolve();
    const line = new Promise((resolve) => proc.waiters.push({ pattern, resolve }));
    const died = proc.exited.then(({ code, signal }) => {
      throw new Error(`${name} exited (code ${code}, signal ${signal}) before ${what}`);
    });
    return withTimeout(Promise.race([line, died]), STEP_MS, `${name}: ${what}`);
  };
  children.push(proc);
  return proc;
}

function token(claims, options = { expiresIn: 60 }, secret = JWT_SECRET) {
  return jwt.sign(claims, secret, { algorithm: "HS256", ...options });
}

function connect(port, auth) {
  const socket = io(`http://127.0.0.1:${port}`, { auth, reconnection: false, forceNew: true });
  sockets.push(socket);
  return socket;
}

function nextEvent(socket, event, what = event) {
  return withTimeout(new Promise((resolve) => socket.once(event, resolve)), STEP_MS, what);
}

// Records every event a socket receives, in order, from the moment it is created.
function record(socket) {
  const events = [];
  socket.onAny((event, data) => events.push([event, data]));
  socket.on("disconnect", (reason) => events.push(["disconnect", reason]));
  return events;
}

async function post(port, path, body, key = INGEST_KEY) {
  const headers = { "content-type": "application/json" };
  if (key) headers.authorization = `Bearer ${key}`;
  const res = await fetch(`http://127.0.0.1:${port}${path}`, {
    method: "POST",
    headers,
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

async function get(port, path) {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, body: await res.json() };
}

async function rejected(socket, expectedError, what) {
  const events = record(socket);
  await nextEvent(socket, "disconnect", `${what}: disconnect`);
  assert.deepEqual(
    events,
    [
      ["auth-error", { error: expectedError }],
      ["disconnect", "io server disconnect"],
    ],
    what,
  );
  ok(`${what}: auth-error "${expectedError}", then server disconnect`);
}

async function main() {
  const [redisPort, publicA, internalA, publicB, internalB] = await Promise.all(
    Array.from({ length: 5 }, freePort),
  );

  const redis = start("redis-server", "redis-server", [
    "--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
  ]);
  await redis.waitFor(/Ready to accept connections/, "readiness");
  const redisUrl = `redis://127.0.0.1:${redisPort}`;

  const replica = (name, port, internalPort) =>
    start(name, process.execPath, [SERVER], {
      PORT: String(port),
      INTERNAL_PORT: String(internalPort),
      JWT_SECRET,
      INGEST_KEYS: `other-key,${INGEST_KEY}`,
      REDIS_URL: redisUrl,
    });
  const replicas = [replica("replica A", publicA, internalA), replica("replica B", publicB, internalB)];
  await Promise.all(replicas.map((r) => r.waitFor(/socketio-node listening public=\d+ internal=\d+\n/, "listening")));
  for (const internal of [internalA, internalB]) {
    assert.deepEqual(await get(internal, "/readyz"), { status: 200, body: { status: "ready" } });
    assert.deepEqual(await get(internal, "/healthz"), { status: 200, body: { status: "ok" } });
  }
  ok("two replicas listening, /readyz and /healthz 200");

  // Authentication.
  const acmeA = connect(publicA, { token: token({ userId: "u-1", organizationId: "acme", role: "admin" }) });
  const acmeB = connect(publicB, { token: token({ userId: "u-2", organizationId: "acme", role: "viewer" }) });
  const otherA = connect(publicA, { token: token({ userId: 7, organizationId: 42, role: "admin" }) });
  const [successA, successB, successOther] = await Promise.all([
    nextEvent(acmeA, "auth-success", "acme client on A: auth-success"),
    nextEvent(acmeB, "auth-success", "acme client on B: auth-success"),
    nextEvent(otherA, "auth-success", "org 42 client on A: auth-success"),
  ]);
  assert.deepEqual(successA, {
    message: "Connected to organization channel", organizationId: "acme", userId: "u-1", role: "admin",
  });
  assert.deepEqual(successB.organizationId, "acme");
  assert.deepEqual(successOther, {
    message: "Connected to organization channel", organizationId: 42, userId: 7, role: "admin",
  });
  ok("valid tokens get auth-success with the token's ids");

  await Promise.all([
    rejected(connect(publicA), "Authentication required", "no auth"),
    rejected(connect(publicA, { token: "" }), "Authentication required", "empty token"),
    rejected(
      connect(publicA, { token: token({ userId: "u", organizationId: "acme", role: "r" }, {}, "wrong") }),
      "Invalid or expired token",
      "bad signature",
    ),
    rejected(
      connect(publicA, { token: token({ userId: "u", organizationId: "acme", role: "r", exp: 1 }, {}) }),
      "Invalid or expired token",
      "expired token",
    ),
    rejected(
      connect(publicA, { token: token({ userId: "u", organizationId: "acme" }) }),
      "Invalid or expired token",
      "token without role",
    ),
  ]);

  // The sharded adapter sends SSUBSCRIBE without awaiting it, so auth-success does not mean the
  // replica receives the room's messages yet: wait until Redis counts the subscriptions.
  // "dynamic" mode: one channel per room, subscribed only by replicas holding a member.
  const probe = createClient({ url: redisUrl });
  await probe.connect();
  const subscribers = async (room) =>
    Number((await probe.sendCommand(["PUBSUB", "SHARDNUMSUB", `socket.io#/#${room}#`]))[1]);
  const waitSubscribers = (expected, what) =>
    withTimeout(
      (async () => {
        for (;;) {
          const counts = await Promise.all(Object.keys(expected).map(subscribers));
          if (counts.every((count, i) => count === Object.values(expected)[i])) return;
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      })(),
      STEP_MS,
      what,
    );
  await waitSubscribers({ "org:acme": 2, "org:42": 1 }, "room subscriptions");
  ok("one sharded channel per room, subscribed only by replicas holding a member");

  // Ingest API errors.
  const update = { organizationId: "acme", taskId: "t-42", status: "PASSED", steps: [{ n: 1, ok: true }], note: "é✓" };
  assert.equal((await post(internalB, "/executions/update", update, null)).status, 401);
  assert.equal((await post(internalB, "/executions/update", update, "nope")).status, 401);
  assert.equal((await post(internalB, "/executions/update", "{not json")).status, 400);
  assert.equal((await post(internalB, "/executions/update", "[]")).status, 400);
  assert.equal((await post(internalB, "/executions/update", { taskId: "t" })).status, 400);
  assert.equal((await post(internalB, "/executions/update", { organizationId: "a", pad: "x".repeat(70_000) })).status, 413);
  assert.equal((await post(internalB, "/nope", update)).status, 404);
  ok("ingest answers 401, 400, 413, 404 with JSON errors");

  // Delivery: publish on B, receive on A (and on B), exactly once, nothing across organizations.
  const seen = { acmeA: record(acmeA), acmeB: record(acmeB), otherA: record(otherA) };
  const broadcasted = { status: 200, body: { status: "broadcasted" } };
  const acmeMarker = { organizationId: "acme", taskId: "t-42", log: "marker" };
  const otherMarker = { organizationId: 42, taskId: "t-7", status: "marker" };
  const markers = Promise.all([
    nextEvent(acmeA, "execution-log", "acme marker on A"),
    nextEvent(acmeB, "execution-log", "acme marker on B"),
    nextEvent(otherA, "execution-updated", "org 42 marker on A"),
  ]);
  assert.deepEqual(await post(internalB, "/executions/update", update), broadcasted);
  assert.deepEqual(await post(internalB, "/executions/log", acmeMarker), broadcasted);
  assert.deepEqual(await post(internalA, "/executions/update", otherMarker), broadcasted);
  await markers;
  const expectedAcme = [
    ["execution-updated", update],
    ["execution-log", acmeMarker],
  ];
  assert.deepEqual(seen.acmeA, expectedAcme, "acme client on A");
  assert.deepEqual(seen.acmeB, expectedAcme, "acme client on B");
  assert.deepEqual(seen.otherA, [["execution-updated", otherMarker]], "org 42 client on A");
  ok("update published on B reaches acme on A and B exactly once, in order; org 42 gets only its own");

  otherA.disconnect();
  await waitSubscribers({ "org:42": 0, "user:42:7": 0 }, "unsubscribe after the last member left");
  ok("a replica unsubscribes when the room's last member leaves");
  await probe.close();

  for (const socket of sockets) socket.disconnect();
  for (const r of replicas) r.child.kill("SIGTERM");
  const exits = await withTimeout(Promise.all(replicas.map((r) => r.exited)), STEP_MS, "replicas to stop");
  assert.deepEqual(exits, [{ code: 0, signal: null }, { code: 0, signal: null }], "replica exit on SIGTERM");
  ok("SIGTERM: both replicas exit 0");

  redis.child.kill("SIGTERM");
  await withTimeout(redis.exited, STEP_MS, "redis-server to stop");
}

function cleanup() {
  for (const socket of sockets) socket.disconnect();
  for (const { child } of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
}

process.on("exit", cleanup);
const deadline = setTimeout(() => {
  process.stderr.write(`selftest: timed out after ${TOTAL_MS} ms\n`);
  process.exit(1);
}, TOTAL_MS);

try {
  await main();
  process.stdout.write(`selftest passed in ${Date.now() - started} ms\n`);
  cleanup();
  process.exit(0);
} catch (err) {
  process.stderr.write(`selftest FAILED: ${err.stack ?? err}\n`);
  for (const { name, output } of children) {
    process.stderr.write(`--- ${name} output ---\n${output.slice(-4000)}\n`);
  }
  cleanup();
  await withTimeout(Promise.all(children.map((c) => c.exited)), 2_000, "children to exit").catch(() => {});
  process.exit(1);
}
