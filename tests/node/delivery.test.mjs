// The ingest API and delivery over each transport, on one replica (in-process bus).

import assert from "node:assert/strict";
import { test } from "node:test";
import { INGEST_KEYS, marker, scenario, token } from "./harness.mjs";

test("POST /executions/update: 200 broadcasted, the body is execution-updated's data, for its org only", scenario(async (bed) => {
  const fanout = await bed.replica();
  const [a1, a2] = [await bed.join(fanout, { organizationId: "acme", userId: "a1" }), await bed.join(fanout, { organizationId: "acme", userId: "a2" })];
  const other = await bed.join(fanout, { organizationId: "globex", userId: "a1" });
  const body = {
    organizationId: "acme",
    taskId: "task-7",
    status: "FAILED",
    progress: 0.5,
    error: { code: "E42", lines: ["a", "b"] },
    unicode: "héllo ✓",
  };
  const res = await fanout.post("/executions/update", body);
  assert.deepEqual(res, { status: 200, body: { status: "broadcasted" } });
  assert.deepEqual(await a1.next("execution-updated"), body);
  assert.deepEqual(await a2.next("execution-updated"), body);
  await marker(fanout, "globex", [other]);
  assert.deepEqual(other.serverEvents(), ["auth-success", "marker"]);
}));

test("POST /executions/log: 200 broadcasted, delivered as execution-log", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "a1" });
  const other = await bed.join(fanout, { organizationId: "globex", userId: "g1" });
  const body = { organizationId: "acme", taskId: "task-7", log: "step 1/3: fetching\n", level: "info" };
  const res = await fanout.post("/executions/log", body);
  assert.deepEqual(res, { status: 200, body: { status: "broadcasted" } });
  assert.deepEqual(await client.next("execution-log"), body);
  await marker(fanout, "globex", [other]);
  assert.deepEqual(other.serverEvents(), ["auth-success", "marker"]);
}));

test("POST /v1/publish: 200 published, the named event with data", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "a1" });
  const res = await fanout.post("/v1/publish", {
    organizationId: "acme",
    event: "dashboard:refresh",
    data: { widgets: [1, 2, 3], nested: { ok: true } },
  });
  assert.deepEqual(res, { status: 200, body: { status: "published" } });
  assert.deepEqual(await client.next("dashboard:refresh"), { widgets: [1, 2, 3], nested: { ok: true } });
  for (const data of ["text", 12, null, [1, "two"]]) {
    await fanout.publish({ organizationId: "acme", event: "scalar", data });
    assert.deepEqual(await client.next("scalar"), data);
  }
}));

test("ingest accepts every configured key and refuses others with 401, publishing nothing", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "a1" });
  const body = (n) => ({ organizationId: "acme", taskId: `t-${n}`, status: "RUNNING" });
  for (const [n, key] of INGEST_KEYS.entries()) {
    assert.equal((await fanout.post("/executions/update", body(n), { key })).status, 200);
  }
  for (const [n, key] of [[10, "wrong-key"], [11, null], [12, ""]]) {
    const res = await fanout.post("/executions/update", body(n), { key });
    assert.equal(res.status, 401, `key ${JSON.stringify(key)}`);
    assert.equal(typeof res.body.error, "string");
  }
  const basic = await fanout.post("/executions/update", body(13), { key: null, headers: { authorization: `Basic ${INGEST_KEYS[0]}` } });
  assert.equal(basic.status, 401);
  await marker(fanout, "acme", [client]);
  assert.deepEqual(client.all("execution-updated").map((d) => d.taskId), ["t-0", "t-1"]);
}));

test("a polling-only client receives updates, in order, and stays on polling", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "p1" }, { transports: ["polling"] });
  assert.equal(client.transport, "polling");
  for (let n = 1; n <= 20; n++) {
    await fanout.update({ organizationId: "acme", taskId: `t-${n}`, status: "RUNNING" });
  }
  await fanout.log({ organizationId: "acme", taskId: "t-20", log: "done" });
  assert.deepEqual(await client.next("execution-log"), { organizationId: "acme", taskId: "t-20", log: "done" });
  assert.deepEqual(
    client.all("execution-updated").map((d) => d.taskId),
    Array.from({ length: 20 }, (_, i) => `t-${i + 1}`),
  );
  assert.equal(client.transport, "polling");
  assert.equal(client.all("upgrade").length, 0);
}));

test("the default transports (polling, then websocket upgrade): no message lost or repeated across the upgrade", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = bed.connect(fanout, {
    transports: ["polling", "websocket"],
    token: token({ organizationId: "acme", userId: "d1" }),
  });
  await client.authenticated();
  // Publish back to back from auth-success until a few messages after the upgrade.
  let n = 0;
  let afterUpgrade = 0;
  while (afterUpgrade < 5) {
    await fanout.update({ organizationId: "acme", taskId: `t-${++n}`, status: "RUNNING" });
    if (client.all("upgrade").length > 0) afterUpgrade++;
    if (n > 5000) assert.fail("the client never upgraded to websocket");
  }
  await marker(fanout, "acme", [client]);
  assert.deepEqual(client.all("upgrade"), ["websocket"]);
  assert.equal(client.transport, "websocket");
  assert.deepEqual(
    client.all("execution-updated").map((d) => d.taskId),
    Array.from({ length: n }, (_, i) => `t-${i + 1}`),
  );
}));

test("ingest refuses bodies it cannot route with 400 and a reason, and publishes nothing", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "a1" });
  const refusals = [
    ["/executions/update", { taskId: "t", status: "RUNNING" }],
    ["/executions/update", { organizationId: "acme", status: "RUNNING" }],
    ["/executions/update", { organizationId: "acme", taskId: "t" }],
    ["/executions/update", { organizationId: "acme:x", taskId: "t", status: "RUNNING" }],
    ["/executions/update", "not json"],
    ["/executions/update", "[1,2]"],
    ["/executions/log", { organizationId: "acme", taskId: "t" }],
    ["/v1/publish", { organizationId: "acme", data: {} }],
    ["/v1/publish", { organizationId: "acme", event: "x" }],
    ["/v1/publish", { organizationId: "acme", event: "auth-success", data: { forged: true } }],
    ["/v1/publish", { organizationId: "acme", event: "disconnect", data: {} }],
    ["/v1/publish", { organizationId: "acme", event: "x", data: {}, userId: "" }],
  ];
  for (const [route, body] of refusals) {
    const res = await fanout.post(route, body);
    assert.equal(res.status, 400, `${route} ${JSON.stringify(body)} → ${res.status} ${JSON.stringify(res.body)}`);
    assert.equal(typeof res.body.error, "string");
  }
  await marker(fanout, "acme", [client]);
  assert.deepEqual(client.serverEvents(), ["auth-success", "marker"]);
}));

test("the public port serves Socket.IO only: no ingest, no metrics, no health", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "a1" });
  for (const route of ["/v1/publish", "/executions/update", "/executions/log"]) {
    const res = await fetch(`${fanout.url}${route}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${INGEST_KEYS[0]}` },
      body: JSON.stringify({ organizationId: "acme", taskId: "t", status: "x", log: "x", event: "leak", data: {} }),
    });
    await res.arrayBuffer();
    assert.equal(res.status, 404, `POST ${route} on the public port`);
  }
  for (const route of ["/metrics", "/readyz", "/healthz"]) {
    const res = await fetch(`${fanout.url}${route}`);
    await res.arrayBuffer();
    assert.equal(res.status, 404, `GET ${route} on the public port`);
  }
  await marker(fanout, "acme", [client]);
  assert.deepEqual(client.serverEvents(), ["auth-success", "marker"]);
}));

test("the payload limits let legitimate large messages through: a 64 KiB execution-log over WebSocket and polling, a 16 KiB token", scenario(async (bed) => {
  const fanout = await bed.replica();
  // A token with a large claim, as a backend with many roles might mint: well under maxPayload.
  const claims = { organizationId: "acme", userId: "big", roles: "r".repeat(16 * 1024) };
  const ws = await bed.join(fanout, claims, { transports: ["websocket"] });
  const polling = await bed.join(fanout, { ...claims, userId: "big-polling" }, { transports: ["polling"] });
  // The largest body FANOUT_MAX_PAYLOAD_BYTES (64 KiB) allows, most of it one log chunk.
  const envelope = JSON.stringify({ organizationId: "acme", taskId: "t-big", log: "" });
  const body = { organizationId: "acme", taskId: "t-big", log: "x".repeat(65536 - envelope.length) };
  assert.equal(JSON.stringify(body).length, 65536);
  assert.equal((await fanout.post("/executions/log", body)).status, 200);
  assert.deepEqual(await ws.next("execution-log"), body);
  assert.deepEqual(await polling.next("execution-log"), body);
  // One byte more is refused, saying why.
  const over = await fanout.post("/executions/log", { ...body, log: `${body.log}x` });
  assert.equal(over.status, 413);
  assert.match(over.body.error, /FANOUT_MAX_PAYLOAD_BYTES/);
}));
