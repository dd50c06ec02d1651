// One replica of the Node.js socket.io service that fanout replaces, in the configuration its
// users would deploy for scale: the Redis sharded adapter with one channel per room
// (subscriptionMode "dynamic"), native ws addons, no debug logging, no per-message work beyond
// what the original service does. It is the peer fanout is benchmarked against, so it keeps
// the original's behaviour (auth inside the connection handler, ingest answers 200 as soon as
// the broadcast is handed to the adapter) rather than fanout's stronger guarantees.

import { createServer } from "node:http";
import { Server } from "socket.io";
import { createClient } from "redis";
import { createShardedAdapter } from "@socket.io/redis-adapter";
import jwt from "jsonwebtoken";

const MAX_BODY_BYTES = 64 * 1024;
const SHUTDOWN_TIMEOUT_MS = 10_000;

function fail(message) {
  process.stderr.write(`socketio-node: ${message}\n`);
  process.exit(2);
}

function port(name, fallback) {
  const raw = process.env[name] ?? String(fallback);
  const value = Number(raw);
  if (!/^\d+$/.test(raw) || value > 65535) {
    fail(`invalid ${name}: ${JSON.stringify(raw)} is not a port number (0-65535)`);
  }
  return value;
}

function required(name, example) {
  const value = process.env[name];
  if (!value) fail(`missing ${name}; expected e.g. ${name}=${example}`);
  return value;
}

const config = {
  port: port("PORT", 3000),
  internalPort: port("INTERNAL_PORT", 3001),
  jwtSecret: required("JWT_SECRET", "change-me"),
  ingestKeys: new Set(
    required("INGEST_KEYS", "key1,key2")
      .split(",")
      .map((key) => key.trim())
      .filter(Boolean),
  ),
  redisUrl: required("REDIS_URL", "redis://127.0.0.1:6379"),
};
if (config.ingestKeys.size === 0) fail("invalid INGEST_KEYS: no non-empty key in it");

// --- Redis adapter -------------------------------------------------------------------------

function logRedisErrors(client, role) {
  let last = "";
  client.on("error", (err) => {
    // A dead Redis makes the client retry (and fail) in a loop: log each distinct error once.
    if (err.message !== last) {
      last = err.message;
      process.stderr.write(`socketio-node: redis ${role}: ${err.message}\n`);
    }
  });
  client.on("ready", () => {
    last = "";
  });
}

const pubClient = createClient({ url: config.redisUrl });
const subClient = pubClient.duplicate();
logRedisErrors(pubClient, "pub");
logRedisErrors(subClient, "sub");
await Promise.all([pubClient.connect(), subClient.connect()]);

// The adapter fires SSUBSCRIBE/SUNSUBSCRIBE without awaiting them; one failing while Redis is
// away must not kill the replica (node-redis re-subscribes on reconnect).
process.on("unhandledRejection", (err) => {
  process.stderr.write(`socketio-node: unhandled rejection: ${err?.message ?? err}\n`);
});

// --- Public server: Socket.IO --------------------------------------------------------------

const publicServer = createServer((req, res) => {
  res.writeHead(404, { "content-type": "application/json" });
  res.end('{"error":"not found"}');
});

const io = new Server(publicServer, {
  path: "/socket.io/",
  transports: ["polling", "websocket"],
  pingInterval: 25_000,
  pingTimeout: 20_000,
  perMessageDeflate: false,
  serveClient: false,
  cors: { origin: "*" },
  adapter: createShardedAdapter(pubClient, subClient, { subscriptionMode: "dynamic" }),
});

function verify(token) {
  try {
    const claims = jwt.verify(token, config.jwtSecret, { algorithms: ["HS256"] });
    const { userId, organizationId, role, exp } = claims;
    if (userId == null || organizationId == null || !role || exp == null) return null;
    return claims;
  } catch {
    return null;
  }
}

io.on("connection", (socket) => {
  let token = socket.handshake.auth?.token;
  if (typeof token === "string" && token.startsWith("Bearer ")) token = token.slice(7);
  if (!token) {
    socket.emit("auth-error", { error: "Authentication required" });
    socket.disconnect(true);
    return;
  }
  const claims = typeof token === "string" ? verify(token) : null;
  if (!claims) {
    socket.emit("auth-error", { error: "Invalid or expired token" });
    socket.disconnect(true);
    return;
  }
  const { organizationId, userId, role } = claims;
  socket.join(`org:${organizationId}`);
  socket.join(`user:${organizationId}:${userId}`);
  socket.emit("auth-success", {
    message: "Connected to organization channel",
    organizationId,
    userId,
    role,
  });
});

// --- Internal server: ingest and health ----------------------------------------------------

let shuttingDown = false;

function sendJson(res, status, body, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

function authorized(req) {
  const header = req.headers.authorization ?? "";
  return header.startsWith("Bearer ") && config.ingestKeys.has(header.slice(7).trim());
}

function ingest(req, res, event) {
  if (!authorized(req)) {
    sendJson(res, 401, { error: "missing or unknown ingest key" }, { "www-authenticate": "Bearer" });
    req.resume();
    return;
  }
  const tooLarge = () => {
    sendJson(res, 413, { error: `body larger than ${MAX_BODY_BYTES} bytes` }, { connection: "close" });
    req.resume();
  };
  if (Number(req.headers["content-length"]) > MAX_BODY_BYTES) return tooLarge();

  const chunks = [];
  let size = 0;
  let rejected = false;
  req.on("data", (chunk) => {
    if (rejected) return;
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      rejected = true;
      tooLarge();
      return;
    }
    chunks.push(chunk);
  });
  req.on("end", () => {
    if (rejected) return;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks, size).toString("utf8"));
    } catch {
      return sendJson(res, 400, { error: "body is not valid JSON" });
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      return sendJson(res, 400, { error: "body must be a JSON object" });
    }
    const { organizationId } = body;
    if (!(typeof organizationId === "string" && organizationId) && typeof organizationId !== "number") {
      return sendJson(res, 400, { error: "organizationId is required" });
    }
    io.to(`org:${organizationId}`).emit(event, body);
    sendJson(res, 200, { status: "broadcasted" });
  });
}

const internalServer = createServer((req, res) => {
  const path = req.url.split("?", 1)[0];
  if (req.method === "POST" && path === "/executions/update") return ingest(req, res, "execution-updated");
  if (req.method === "POST" && path === "/executions/log") return ingest(req, res, "execution-log");
  if (req.method === "GET" && path === "/healthz") return sendJson(res, 200, { status: "ok" });
  if (req.method === "GET" && path === "/readyz") {
    if (shuttingDown) return sendJson(res, 503, { status: "not ready", reason: "shutting down" });
    if (!pubClient.isReady || !subClient.isReady) {
      return sendJson(res, 503, { status: "not ready", reason: "redis disconnected" });
    }
    return sendJson(res, 200, { status: "ready" });
  }
  sendJson(res, 404, { error: "not found" });
  req.resume();
});

// --- Start and stop ------------------------------------------------------------------------

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, () => {
      server.off("error", reject);
      resolve(server.address().port);
    });
  });
}

try {
  const publicPort = await listen(publicServer, config.port);
  const internalPort = await listen(internalServer, config.internalPort);
  process.stdout.write(`socketio-node listening public=${publicPort} internal=${internalPort}\n`);
} catch (err) {
  fail(`cannot listen: ${err.message}`);
}

async function shutdown(signal) {
  if (shuttingDown) return;
  shuttingDown = true;
  setTimeout(() => {
    process.stderr.write(`socketio-node: shutdown took over ${SHUTDOWN_TIMEOUT_MS} ms, exiting\n`);
    process.exit(1);
  }, SHUTDOWN_TIMEOUT_MS).unref();
  // io.close() disconnects every socket, unsubscribes the adapter and closes the public server.
  await io.close();
  await new Promise((resolve) => {
    internalServer.close(resolve);
    internalServer.closeAllConnections();
  });
  await Promise.allSettled([pubClient.close(), subClient.close()]);
  process.stdout.write(`socketio-node stopped (${signal})\n`);
  process.exit(0);
}

process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
