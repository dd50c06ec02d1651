// Graceful shutdown on SIGTERM: not ready, transports closed (so clients reconnect, unlike
// after "io server disconnect"), exit 0 within FANOUT_SHUTDOWN_TIMEOUT.

import assert from "node:assert/strict";
import { test } from "node:test";
import { deadline, scenario, straggler, token, until } from "./harness.mjs";

test("SIGTERM: /readyz 503, websocket and polling clients see 'transport close' and retry, exit 0 in time", scenario(async (bed) => {
  const TIMEOUT_MS = 5000;
  const fanout = await bed.replica({ env: { FANOUT_SHUTDOWN_TIMEOUT: `${TIMEOUT_MS}ms` } });
  const ws = await bed.join(fanout, { organizationId: "acme", userId: "u1" }, { name: "ws" });
  const polling = await bed.join(fanout, { organizationId: "acme", userId: "u2" }, {
    name: "polling",
    transports: ["polling"],
    watchPolls: true,
  });
  const held = await straggler(fanout);
  // A polling client can only be told "close" on a long-poll the server holds.
  await polling.until((c) => c.pollsInFlight > 0, "a long-poll on the wire");

  const t0 = Date.now();
  fanout.proc.signal("SIGTERM");
  await until(async () => (await fanout.readyz()) === 503, { what: "/readyz 503" });
  assert.equal(await ws.next("disconnect"), "transport close");
  assert.equal(await polling.next("disconnect"), "transport close");
  // "transport close" means the stock client reconnects by itself.
  for (const c of [ws, polling]) {
    assert.equal(c.socket.active, true, `${c.name} must plan a reconnection`);
    await c.next("reconnect_attempt");
    assert.deepEqual(c.serverEvents(), ["auth-success"], `${c.name} got no auth-error`);
  }
  assert.equal(await fanout.readyz(), 503, "still not ready while draining");

  held.end();
  const exit = await deadline(fanout.proc.exited, TIMEOUT_MS, "the replica to exit");
  const took = Date.now() - t0;
  assert.deepEqual(exit, { code: 0, signal: null });
  assert.ok(took < TIMEOUT_MS, `exited ${took}ms after SIGTERM`);
}));

test("a polling client caught between two long-polls at SIGTERM still reconnects", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, { organizationId: "acme", userId: "u1" }, { transports: ["polling"], watchPolls: true });
  const held = await straggler(fanout);
  await client.until((c) => c.pollsInFlight > 0, "a long-poll on the wire");
  // SIGTERM from inside a delivery, before the client sends its next long-poll: no "close"
  // packet can reach it then, and its next poll finds the public port closed. The reason it
  // reports may therefore be "transport error"; what the contract needs is the reconnection.
  client.socket.once("execution-updated", () => fanout.proc.signal("SIGTERM"));
  await fanout.update({ organizationId: "acme", taskId: "t-1", status: "RUNNING" });
  const reason = await client.next("disconnect");
  assert.ok(["transport close", "transport error"].includes(reason), `disconnect reason ${reason}`);
  assert.equal(client.socket.active, true, "the client must plan a reconnection");
  await client.next("reconnect_attempt");
  assert.deepEqual(client.serverEvents(), ["auth-success", "execution-updated"]);
  held.end();
  assert.deepEqual(await deadline(fanout.proc.exited, 5000, "the replica to exit"), { code: 0, signal: null });
}));

test("a connection that never finishes does not hold the exit past FANOUT_SHUTDOWN_TIMEOUT", scenario(async (bed) => {
  const TIMEOUT_MS = 1500;
  const fanout = await bed.replica({ env: { FANOUT_SHUTDOWN_TIMEOUT: `${TIMEOUT_MS}ms` } });
  const client = await bed.join(fanout, { organizationId: "acme", userId: "u1" });
  await straggler(fanout);
  const t0 = Date.now();
  fanout.proc.signal("SIGTERM");
  assert.equal(await client.next("disconnect"), "transport close");
  const exit = await deadline(fanout.proc.exited, TIMEOUT_MS + 5000, "the replica to exit");
  const took = Date.now() - t0;
  assert.deepEqual(exit, { code: 0, signal: null });
  // The drain gives up at the timeout; the process then only closes its internal port.
  assert.ok(took >= TIMEOUT_MS - 50 && took < TIMEOUT_MS + 1000, `exited ${took}ms after SIGTERM`);
}));

test("behind a load balancer, clients of a stopping replica reconnect to another and keep receiving", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  const lb = await bed.balancer([a, b]);
  const clients = [
    bed.connect(lb, { name: "ws", token: token({ organizationId: "acme", userId: "u1" }) }),
    bed.connect(lb, { name: "polling", token: token({ organizationId: "acme", userId: "u2" }), transports: ["polling"], watchPolls: true }),
  ];
  for (const c of clients) await c.authenticated();
  await a.update({ organizationId: "acme", taskId: "before", status: "RUNNING" });
  for (const c of clients) assert.equal((await c.next("execution-updated")).taskId, "before");
  await until(() => clients[1].pollsInFlight > 0 && lb.awaitingReply() > 0, { what: "a long-poll held by replica a" });

  a.proc.signal("SIGTERM");
  for (const c of clients) {
    // The long-poll seen held above may have been answered (a ping) just before SIGTERM
    // landed: a polling client between two polls sees "transport error" (docs/protocol.md;
    // that case has its own test below). Either way it must reconnect by itself.
    const expected = c.name === "polling" ? ["transport close", "transport error"] : ["transport close"];
    const reason = await c.next("disconnect");
    assert.ok(expected.includes(reason), `${c.name}: ${reason}`);
    // Reconnected (through the balancer, to b) and authenticated again with the same token.
    await c.until((x) => x.all("connect").length === 2, "a second connect");
    await c.authenticated();
  }
  assert.deepEqual(await deadline(a.proc.exited, 5000, "replica a to exit"), { code: 0, signal: null });
  await b.update({ organizationId: "acme", taskId: "after", status: "RUNNING" });
  for (const c of clients) {
    assert.equal((await c.next("execution-updated")).taskId, "after");
    assert.deepEqual(c.all("execution-updated").map((d) => d.taskId), ["before", "after"]);
    assert.deepEqual(c.all("auth-error"), []);
  }
}));
