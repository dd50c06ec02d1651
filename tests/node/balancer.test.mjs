// The compose demo's load balancer, for real: HAProxy running examples/compose/haproxy.cfg
// (addresses moved to loopback, nothing else) in front of three replicas and a real Redis,
// with stock socket.io-clients. Long-polling works only if every request of a session
// reaches the same replica (the SERVERID cookie); a replica killed, or draining after
// SIGTERM, must cost its clients one reconnection through HAProxy and nothing else.
// Last, the demo's worker simulator, publishing through HAProxy's ingest frontend and
// serving the dashboard's files behind HAProxy's /dashboard/ (the page itself runs in a
// browser in browser.test.mjs).

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import jwt from "jsonwebtoken";
import { INGEST_KEYS, SECRET, deadline, freePort, marker, scenario, straggler, token, until } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const SIM_DIR = path.resolve(here, "../../examples/compose/worker-sim");
const DASHBOARD_DIR = path.resolve(here, "../../examples/dashboard");
/** `python3` from PATH, unless `PYTHON` names another: the worker simulator's interpreter. */
const PYTHON = process.env.PYTHON ?? "python3";

/**
 * The interpreter's own path: a version manager's shim (pyenv's `python3` is a script that
 * runs Python as its child) would not pass the bed's signals on, leaving an orphan.
 */
function pythonExecutable() {
  return new Promise((resolve, reject) => {
    execFile(PYTHON, ["-c", "import sys; print(sys.executable)"], (err, stdout) => {
      if (err) reject(new Error(`cannot run ${PYTHON} (${err.code}): install Python 3 (scripts/test does) or set PYTHON`));
      else resolve(stdout.trim());
    });
  });
}

/** The stock client's options for each kind of dashboard. */
const KINDS = {
  // Long-polling only. withCredentials: only then does socket.io-client keep cookies in Node
  // (a browser keeps them anyway, for the page's own origin).
  polling: { transports: ["polling"], withCredentials: true },
  websocket: { transports: ["websocket"] },
  // The default: long-polling first, then the upgrade, which must reach the same replica.
  upgrade: { transports: ["polling", "websocket"], withCredentials: true },
};

/** Authenticated connections a replica holds (`fanout_connections`), or null when it is gone. */
async function connections(replica) {
  try {
    const res = await fetch(`${replica.internal}/metrics`, { signal: AbortSignal.timeout(2000) });
    return Number((await res.text()).match(/^fanout_connections (\d+)/m)?.[1] ?? 0);
  } catch {
    return null;
  }
}

/** Three replicas and Redis, HAProxy in front with the compose demo's configuration. */
async function stack(bed, options = {}) {
  const { replicas } = await bed.fleet(3, options);
  const lb = await bed.haproxy(replicas);
  return { replicas, lb };
}

/**
 * Connects a client of `kind` through the balancer, waits for its `auth-success`, and finds
 * the replica holding it (the one whose connection count went up). Clients are placed one
 * at a time, so that this is unambiguous.
 */
async function place(bed, lb, replicas, kind) {
  const before = await Promise.all(replicas.map(connections));
  const userId = `${kind}-${randomUUID().slice(0, 8)}`;
  const client = bed.connect(lb, {
    name: userId,
    token: token({ organizationId: "acme", userId }),
    ...KINDS[kind],
  });
  await client.authenticated();
  client.kind = kind;
  client.home = await until(
    async () => {
      const now = await Promise.all(replicas.map(connections));
      const grew = replicas.filter((_, i) => now[i] === before[i] + 1);
      const total = (counts) => counts.reduce((a, b) => a + b, 0);
      return grew.length === 1 && total(now) === total(before) + 1 && grew[0];
    },
    { what: `the replica holding ${userId}` },
  );
  return client;
}

/**
 * Places polling and WebSocket clients, alternately, until one replica holds both kinds:
 * that one is the victim, every other client a bystander.
 */
async function clientsWithMixedVictim(bed, lb, replicas) {
  const clients = [];
  for (let i = 0; i < 12; i++) {
    clients.push(await place(bed, lb, replicas, i % 2 ? "websocket" : "polling"));
    const victim = replicas.find((r) => {
      const kinds = new Set(clients.filter((c) => c.home === r).map((c) => c.kind));
      return kinds.has("polling") && kinds.has("websocket");
    });
    if (victim) {
      return {
        victim,
        clients,
        ofVictim: clients.filter((c) => c.home === victim),
        bystanders: clients.filter((c) => c.home !== victim),
      };
    }
  }
  throw new Error(`no replica got both kinds: ${clients.map((c) => `${c.kind}@${c.home.name}`)}`);
}

/**
 * Publishes one update through each of `via` (replicas, or HAProxy's ingest frontend) and
 * waits until every client has each of them.
 */
async function everyoneReceives(clients, via, label) {
  const ids = [];
  for (const [i, publisher] of via.entries()) {
    const taskId = `${label}-${i + 1}-via-${publisher.name}`;
    ids.push(taskId);
    if (publisher.update) {
      await publisher.update({ organizationId: "acme", taskId, status: "RUNNING" });
    } else {
      const res = await publisher.post("/executions/update", { organizationId: "acme", taskId, status: "RUNNING" });
      assert.equal(res.status, 200, `ingest through haproxy: ${JSON.stringify(res.body)}`);
    }
  }
  for (const c of clients) {
    for (const id of ids) await c.find("execution-updated", (d) => d.taskId === id);
  }
  return ids;
}

/** A client of the victim: disconnected, reconnected through HAProxy, authenticated again. */
async function reconnected(client) {
  const reason = await client.next("disconnect");
  assert.ok(["transport close", "transport error"].includes(reason), `${client.name}: disconnect reason ${reason}`);
  assert.equal(client.socket.active, true, `${client.name} must plan a reconnection`);
  await client.until((c) => c.all("connect").length === 2, "a second connect", 15_000);
  await client.authenticated(15_000);
  assert.deepEqual(client.all("auth-error"), [], `${client.name}: no auth-error`);
}

function assertUndisturbed(clients) {
  for (const c of clients) {
    assert.equal(c.all("connect").length, 1, `${c.name} (${c.kind}) must not have reconnected`);
    assert.deepEqual(c.all("disconnect"), [], `${c.name} (${c.kind}) must not have been disconnected`);
  }
}

/** Waits until HAProxy's health checks say `name` is DOWN, and returns its last check status. */
async function markedDown(lb, name, timeout = 15_000) {
  const server = await until(async () => {
    const s = (await lb.servers())[name];
    return s?.status.startsWith("DOWN") && s;
  }, { timeout, what: `haproxy marking ${name} DOWN` });
  return server.check;
}

test("through HAProxy: long-polling (sticky), WebSocket and upgrading clients receive what every replica publishes", scenario(async (bed) => {
  const { replicas, lb } = await stack(bed);
  const clients = [];
  for (const kind of ["polling", "websocket", "upgrade"]) clients.push(await place(bed, lb, replicas, kind));
  const [polling, , upgrading] = clients;
  await upgrading.until((c) => c.transport === "websocket", "the upgrade to WebSocket, on the replica holding the session");
  assert.equal(polling.transport, "polling");

  // Rounds of updates, each published through every replica in turn: each long-polling
  // request of the session went through HAProxy, which must have sent it to the same replica.
  const sent = [];
  for (let round = 1; round <= 4; round++) sent.push(...(await everyoneReceives(clients, replicas, `round${round}`)));
  sent.push(...(await everyoneReceives(clients, [lb], "ingest")));
  for (const c of clients) {
    assert.deepEqual(c.all("execution-updated").map((d) => d.taskId), sent, `${c.name}: all, in order, once`);
    assert.deepEqual(c.all("connect_error"), [], `${c.name}: no connect_error`);
  }
  assertUndisturbed(clients);
  assert.deepEqual(await Promise.all(replicas.map(connections)), replicas.map((r) => clients.filter((c) => c.home === r).length));
}), { timeout: 90_000 });

test("kill -9 a replica: its polling and WebSocket clients reconnect through HAProxy to the others and receive again", scenario(async (bed) => {
  const { replicas, lb } = await stack(bed);
  const { victim, clients, ofVictim, bystanders } = await clientsWithMixedVictim(bed, lb, replicas);
  const survivors = replicas.filter((r) => r !== victim);
  const before = await everyoneReceives(clients, replicas, "before");

  victim.proc.signal("SIGKILL");
  await victim.proc.exited;
  // A browser keeps the affinity cookie across reconnections (socket.io-client in Node
  // starts a new cookie jar): a request still naming the dead replica must be sent to a
  // live one (option redispatch; ignored cookie once the replica is DOWN), with a new cookie.
  const handshake = await fetch(`${lb.url}/socket.io/?EIO=4&transport=polling`, {
    headers: { cookie: `SERVERID=${victim.name}` },
    signal: AbortSignal.timeout(10_000),
  });
  assert.equal(handshake.status, 200, "a handshake with a dead replica's cookie is served by another");
  assert.match(handshake.headers.get("set-cookie") ?? "", new RegExp(`SERVERID=(${survivors.map((r) => r.name).join("|")})`));
  await handshake.text();

  for (const c of ofVictim) await reconnected(c);
  assert.equal(await markedDown(lb, victim.name), "L4CON", "the check finds nothing listening");
  assertUndisturbed(bystanders);

  // Everyone, reconnected or not, receives again, whichever survivor publishes, and through
  // HAProxy's ingest frontend, which no longer sends anything to the dead replica.
  const after = await everyoneReceives(clients, [...survivors, lb, lb, lb], "after");
  for (const c of clients) {
    assert.deepEqual(c.all("execution-updated").map((d) => d.taskId), [...before, ...after], c.name);
  }
  const held = await Promise.all(survivors.map(connections));
  assert.equal(held[0] + held[1], clients.length, `the survivors hold every client (${held})`);
  await marker(survivors[0], "acme", clients);
}), { timeout: 90_000 });

test("SIGTERM: HAProxy takes the draining replica out (/readyz 503) while its clients reconnect to the others", scenario(async (bed) => {
  const DRAIN_MS = 15_000;
  const { replicas, lb } = await stack(bed, { env: { FANOUT_SHUTDOWN_TIMEOUT: `${DRAIN_MS}ms` } });
  const { victim, clients, ofVictim, bystanders } = await clientsWithMixedVictim(bed, lb, replicas);
  const survivors = replicas.filter((r) => r !== victim);
  const before = await everyoneReceives(clients, replicas, "before");
  // A request in progress keeps the victim draining (its internal port up) until released.
  const held = await straggler(victim);

  victim.proc.signal("SIGTERM");
  for (const c of ofVictim) await reconnected(c);
  assertUndisturbed(bystanders);
  // Still running, still answering its checks: 503, so HAProxy takes it out (L7STS: a
  // wrong HTTP status), rather than waiting for it to stop listening.
  assert.equal(await markedDown(lb, victim.name), "L7STS");
  assert.equal(victim.proc.running, true, "the victim is still draining");
  assert.equal(await victim.readyz(), 503);

  const after = await everyoneReceives(clients, [...survivors, lb], "after");
  for (const c of clients) {
    assert.deepEqual(c.all("execution-updated").map((d) => d.taskId), [...before, ...after], c.name);
  }
  held.end();
  assert.deepEqual(await deadline(victim.proc.exited, DRAIN_MS, "the victim to exit"), { code: 0, signal: null });
}), { timeout: 90_000 });

/** Status and body of a GET of `pathname` sent as is (no URL normalization, unlike fetch). */
function rawGet(base, pathname) {
  return new Promise((resolve, reject) => {
    const { hostname, port } = new URL(base);
    http.get({ hostname, port, path: pathname }, (res) => {
      let body = "";
      res.on("data", (chunk) => (body += chunk));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    }).on("error", reject);
  });
}

test("the compose demo's worker simulator: complete executions through HAProxy's ingest frontend; the dashboard's files behind HAProxy, and tokens for it", scenario(async (bed) => {
  const database = await bed.database();
  const { replicas } = await bed.fleet(3, { database });
  const demoPort = await freePort();
  const demo = `http://127.0.0.1:${demoPort}`;
  // HAProxy's backend dashboard is the simulator's web server, as in compose.
  const lb = await bed.haproxy(replicas, { dashboard: demo });
  // The simulator's executions take about a second at SPEED 20, and then it exits, taking
  // the dashboard's files with it; HAProxy marks that backend UP only after two passed
  // checks, 2 s apart. So ingest answers 503 (nothing accepted: the simulator retries, as it
  // does while fanout starts) until the check has passed, then passes requests on to
  // HAProxy's ingest frontend.
  let ingestOpen = false;
  const ingest = await bed.serve(async (req, res) => {
    if (!ingestOpen) {
      res.writeHead(503, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: "held by the test until HAProxy's check of the simulator passed" }));
      return;
    }
    const body = [];
    for await (const chunk of req) body.push(chunk);
    const up = await fetch(`${lb.ingest}${req.url}`, {
      method: req.method,
      headers: { "content-type": req.headers["content-type"] ?? "application/json", authorization: req.headers.authorization ?? "" },
      body: Buffer.concat(body),
    });
    res.writeHead(up.status, { "content-type": up.headers.get("content-type") ?? "application/json" });
    res.end(Buffer.from(await up.arrayBuffer()));
  });
  const sim = bed.run("worker-sim", await pythonExecutable(), ["-u", path.join(SIM_DIR, "sim.py")], {
    PATH: process.env.PATH,
    INGEST_URL: ingest,
    INGEST_KEY: INGEST_KEYS[1],
    JWT_SECRET: SECRET,
    ORGS: "acme,globex",
    CONCURRENCY: "1",
    EXECUTIONS: "2",
    SPEED: "20",
    PUBLIC_URL: lb.url,
    DEMO_URL: demo,
    DEMO_LISTEN: `127.0.0.1:${demoPort}`,
  });

  // The page's token, as the page gets it; with lastSeq 0 the dashboard is replayed what
  // was published before it connected, so nothing depends on who starts first.
  const { token: acme } = await until(
    async () => {
      if (!sim.running) throw new Error(`the simulator exited: ${JSON.stringify(sim.exit)}`);
      const res = await fetch(`${demo}/token?org=acme`).catch(() => null);
      return res?.ok && (await res.json());
    },
    { what: "the simulator's /token" },
  );
  // Its / sends a browser to the dashboard through the balancer, with a fresh token.
  for (const [query, org] of [["", "acme"], ["?org=globex", "globex"]]) {
    const res = await fetch(`${demo}/${query}`, { redirect: "manual" });
    assert.equal(res.status, 302);
    const location = new URL(res.headers.get("location"));
    assert.equal(`${location.origin}${location.pathname}`, `${lb.url}/dashboard/`);
    const claims = jwt.verify(new URLSearchParams(location.hash.slice(1)).get("token"), SECRET);
    assert.equal(claims.organizationId, org);
  }
  // The dashboard's files through HAProxy's public frontend (fanout's origin), as they are
  // in the repository; nothing else of the simulator's.
  await until(async () => (await lb.servers("dashboard")).dashboard?.check === "L7OK", {
    timeout: 15_000,
    what: "haproxy: backend dashboard (the simulator) UP after a passed check",
  });
  ingestOpen = true;
  for (const [file, type] of [["index.html", "text/html"], ["app.js", "text/javascript"], ["style.css", "text/css"], ["vendor/socket.io.min.js", "text/javascript"]]) {
    const res = await fetch(`${lb.url}/dashboard/${file === "index.html" ? "" : file}`);
    assert.equal(res.status, 200, file);
    assert.match(res.headers.get("content-type"), new RegExp(`^${type}`), file);
    assert.equal(await res.text(), await readFile(path.join(DASHBOARD_DIR, file), "utf8"), file);
  }
  for (const where of ["/", "/dashboard"]) {
    const res = await fetch(`${lb.url}${where}`, { redirect: "manual" });
    assert.equal(res.status, 302, where);
    assert.equal(res.headers.get("location"), "/dashboard/", where);
  }
  for (const escape of ["/dashboard/../compose/README.md", "/dashboard/%2e%2e/%2e%2e/README.md", "/dashboard/vendor/../../compose/worker-sim/sim.py", "/config"]) {
    assert.equal((await rawGet(demo, escape)).status, 404, escape);
  }

  const dashboard = bed.connect(lb, { name: "dashboard", auth: { token: acme, lastSeq: 0 }, ...KINDS.upgrade });
  await dashboard.authenticated();
  assert.deepEqual(await deadline(sim.exited, 30_000, "the simulator to finish its executions"), { code: 0, signal: null });
  await marker(replicas[0], "acme", [dashboard]);

  // Two executions for acme, each PENDING, RUNNING (with progress), then final, with logs;
  // nothing of globex's.
  const updates = dashboard.all("execution-updated");
  assert.ok(updates.every((u) => u.organizationId === "acme"), "only acme's executions");
  const tasks = [...new Set(updates.map((u) => u.taskId))];
  assert.equal(tasks.length, 2, `two executions: ${tasks}`);
  for (const task of tasks) {
    const statuses = updates.filter((u) => u.taskId === task).map((u) => u.status);
    assert.equal(statuses[0], "PENDING", `${task}: ${statuses}`);
    assert.equal(statuses[1], "RUNNING", `${task}: ${statuses}`);
    assert.ok(["PASSED", "FAILED", "ERROR"].includes(statuses.at(-1)), `${task}: ${statuses}`);
    assert.ok(statuses.slice(1, -1).every((s) => s === "RUNNING"), `${task}: ${statuses}`);
    assert.ok(dashboard.all("execution-log").some((l) => l.taskId === task), `${task}: logs`);
  }

  // The REST history through HAProxy, with the page's token: the same two, finished.
  const res = await fetch(`${lb.url}/v1/executions`, { headers: { authorization: `Bearer ${acme}` } });
  assert.equal(res.status, 200);
  const { executions } = await res.json();
  assert.deepEqual(executions.map((e) => e.taskId).sort(), tasks.sort());
  assert.ok(executions.every((e) => ["PASSED", "FAILED", "ERROR"].includes(e.status) && e.finishedAt));
}), { timeout: 90_000 });
