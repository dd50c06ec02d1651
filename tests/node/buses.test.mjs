// The buses beyond one Redis. A Redis Cluster: each org's channel lives at the master that
// owns its slot (sharded pub/sub), and whatever enters through a replica's ingest or a
// worker's direct SPUBLISH reaches every member of the org on every replica exactly once,
// and nobody else. A Redis Sentinel group: the replicas share the master the sentinels
// name and follow it when it is killed, refusing (503) what they cannot deliver meanwhile.

import assert from "node:assert/strict";
import { test } from "node:test";
import { marker, scenario, until } from "./harness.mjs";

const channel = (org) => `fanout:org:${org}`;

test("Redis Cluster: orgs on every master reach each of their members once, through ingest and SPUBLISH, and no one else", scenario(async (bed) => {
  const cluster = await bed.redisCluster({ masters: 3 });
  const a = await bed.replica({ cluster });
  const b = await bed.replica({ cluster });
  for (const replica of [a, b]) {
    assert.deepEqual(await replica.readiness(), { status: 200, body: { status: "ready", bus: "redis-cluster" } }, replica.name);
  }

  // One org per master: each master connection of each replica carries a subscription.
  const masters = await cluster.masters();
  const orgByOwner = new Map();
  for (let i = 0; orgByOwner.size < masters.length; i++) {
    const owner = await cluster.slotOwnerPort(channel(`org-${i}`));
    if (!orgByOwner.has(owner)) orgByOwner.set(owner, `org-${i}`);
  }
  const orgs = [...orgByOwner.values()];

  // A member of every org on each replica, one by WebSocket and the other by polling
  // (which one alternates with the org).
  const members = new Map();
  for (const [i, org] of orgs.entries()) {
    const [onA, onB] = i % 2 ? [["polling"], ["websocket"]] : [["websocket"], ["polling"]];
    members.set(org, [
      await bed.join(a, { organizationId: org, userId: "u-a" }, { transports: onA, name: `${org}@a/${onA[0]}` }),
      await bed.join(b, { organizationId: org, userId: "u-b" }, { transports: onB, name: `${org}@b/${onB[0]}` }),
    ]);
  }

  for (const org of orgs) {
    await a.publish({ organizationId: org, event: "notice", data: { org, via: "ingest" } });
    // Both replicas hold a member, so the owning master has one subscriber from each.
    assert.equal(await cluster.spublish(channel(org), { event: "notice", data: { org, via: "spublish" } }), 2, org);
  }
  // The markers of different orgs travel through different masters, so one org's marker
  // orders nothing of another's. Waiting first for each org's last message at its members
  // (on both replicas) means every message was handled by both replicas before any marker
  // exists: one sent to a wrong socket would be queued there ahead of that socket's marker.
  for (const [org, list] of members) {
    await Promise.all(list.map((m) => m.find("notice", (d) => d?.org === org && d.via === "spublish")));
  }
  for (const [org, list] of members) await marker(a, org, list);

  for (const [org, list] of members) {
    for (const m of list) {
      // Published through one master in this order: each once, in order, nothing foreign.
      assert.deepEqual(m.all("notice"), [{ org, via: "ingest" }, { org, via: "spublish" }], m.name);
      assert.deepEqual(m.serverEvents(), ["auth-success", "notice", "notice", "marker"], m.name);
    }
  }
}));

test("Redis Sentinel: both replicas follow the master the sentinels name through a kill -9, refusing (503) until subscribed again", scenario(async (bed) => {
  const sentinel = await bed.redisSentinel();
  const a = await bed.replica({ sentinel });
  const b = await bed.replica({ sentinel });
  for (const replica of [a, b]) {
    assert.deepEqual(await replica.readiness(), { status: 200, body: { status: "ready", bus: "redis-sentinel" } }, replica.name);
  }
  const onA = await bed.join(a, { organizationId: "acme", userId: "u1" }, { name: "acme@a" });
  const onB = await bed.join(b, { organizationId: "acme", userId: "u2" }, { name: "acme@b", transports: ["polling"] });
  const members = [onA, onB];

  await a.publish({ organizationId: "acme", event: "notice", data: { via: "ingest" } });
  // Both replicas subscribe at the master, which counts them.
  assert.equal(await sentinel.publish(channel("acme"), { event: "notice", data: { via: "publish" } }), 2);
  await marker(b, "acme", members);
  for (const m of members) assert.deepEqual(m.all("notice"), [{ via: "ingest" }, { via: "publish" }], m.name);

  const old = await sentinel.killMaster();
  const tick = (replica, n) => replica.post("/v1/publish", { organizationId: "acme", event: "tick", data: { via: replica.name, n } });
  // Right after the kill (the sentinels need a second to see it down, so no failover can
  // have happened yet), neither replica can have a subscription: both refuse.
  const [fromA, fromB] = await Promise.all([tick(a, 0), tick(b, 0)]);
  for (const [replica, res] of [[a, fromA], [b, fromB]]) {
    assert.equal(res.status, 503, `${replica.name}: ${JSON.stringify(res.body)}`);
    assert.equal(typeof res.body.error, "string");
  }
  const promoted = await sentinel.waitFailover(old);
  assert.notEqual(promoted, old);

  // Each replica answers 503 until it has subscribed at the new master (after its backoff),
  // then 200; nothing else. A 200 promises that its own member gets the tick.
  const accepted = new Map();
  await Promise.all(
    [a, b].map(async (replica) => {
      let n = 0;
      await until(
        async () => {
          const res = await tick(replica, ++n);
          assert.ok([200, 503].includes(res.status), `${replica.name} answered ${res.status} ${JSON.stringify(res.body)}`);
          return res.status === 200;
        },
        { timeout: 20_000, every: 50, what: `${replica.name} to accept publishes again` },
      );
      accepted.set(replica.name, n);
    }),
  );

  // Both are subscribed at the new master now: a publish accepted through either reaches both.
  const after = await a.post("/v1/publish", { organizationId: "acme", event: "notice", data: { via: "after" } });
  assert.deepEqual(after, { status: 200, body: { status: "published" } });
  await marker(b, "acme", members);
  for (const [m, replica] of [[onA, a], [onB, b]]) {
    assert.deepEqual(m.all("notice"), [{ via: "ingest" }, { via: "publish" }, { via: "after" }], m.name);
    // A refused tick may have arrived too (refused because the subscription changed under
    // it); the accepted one must have, once.
    const own = m.all("tick").filter((d) => d.via === replica.name && d.n === accepted.get(replica.name));
    assert.equal(own.length, 1, `${m.name}: tick ${accepted.get(replica.name)} accepted by ${replica.name}`);
    // The sockets never noticed: no disconnection, no second auth-success.
    assert.deepEqual(m.all("disconnect"), [], m.name);
    assert.equal(m.all("auth-success").length, 1, m.name);
  }
}));
