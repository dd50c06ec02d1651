// The buses beyond one Redis. A Redis Cluster: each org's channel lives at the master that
// owns its slot (sharded pub/sub), and whatever enters through a replica's ingest or a
// worker's direct SPUBLISH reaches every member of the org on every replica exactly once,
// and nobody else; the replicas follow the slot when it is migrated or its master dies,
// make their subscriptions again when the masters drop them, and let go of a channel when
// its last member on the replica leaves, all without their sockets noticing. A Redis
// Sentinel group: the replicas share the master the sentinels name and follow it when it
// is killed, refusing (503) what they cannot deliver meanwhile.

import assert from "node:assert/strict";
import { test } from "node:test";
import { marker, redisCommand, scenario, until } from "./harness.mjs";

const channel = (org) => `fanout:org:${org}`;

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** One organization per master of `cluster`: for each, the first `org-<i>` whose channel it owns. */
async function orgsOnEveryMaster(cluster) {
  const masters = await cluster.masters();
  const orgByOwner = new Map();
  for (let i = 0; orgByOwner.size < masters.length; i++) {
    const owner = await cluster.slotOwnerPort(channel(`org-${i}`));
    if (!orgByOwner.has(owner)) orgByOwner.set(owner, `org-${i}`);
  }
  return [...orgByOwner.values()];
}

/**
 * A member of every org on each of `a` and `b`, one by WebSocket and the other by polling
 * (which one alternates with the org): a `Map` of org to `[onA, onB]`.
 */
async function membersOnBoth(bed, a, b, orgs) {
  const members = new Map();
  for (const [i, org] of orgs.entries()) {
    const [onA, onB] = i % 2 ? [["polling"], ["websocket"]] : [["websocket"], ["polling"]];
    members.set(org, [
      await bed.join(a, { organizationId: org, userId: "u-a" }, { transports: onA, name: `${org}@a/${onA[0]}` }),
      await bed.join(b, { organizationId: org, userId: "u-b" }, { transports: onB, name: `${org}@b/${onB[0]}` }),
    ]);
  }
  return members;
}

/** The socket never noticed what happened to the bus: no disconnection, no second `auth-success`. */
function assertUndisturbed(member) {
  assert.deepEqual(member.all("disconnect"), [], `${member.name}: disconnected`);
  assert.equal(member.all("auth-success").length, 1, `${member.name}: authenticated again`);
}

/** Each of `list` once, in increasing order (a stream's numbers, none repeated or reordered). */
function assertIncreasing(list, what) {
  assert.ok(list.every((n, i) => i === 0 || n > list[i - 1]), `${what}: ${JSON.stringify(list)}`);
}

test("Redis Cluster: orgs on every master reach each of their members once, through ingest and SPUBLISH, and no one else", scenario(async (bed) => {
  const cluster = await bed.redisCluster({ masters: 3 });
  const a = await bed.replica({ cluster });
  const b = await bed.replica({ cluster });
  for (const replica of [a, b]) {
    assert.deepEqual(await replica.readiness(), { status: 200, body: { status: "ready", bus: "redis-cluster" } }, replica.name);
  }

  // One org per master: each master connection of each replica carries a subscription.
  const orgs = await orgsOnEveryMaster(cluster);

  const members = await membersOnBoth(bed, a, b, orgs);

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

test("Redis Cluster: a slot migrated under connected members: what was published before, during and after arrives once, in order, and the sockets never notice", scenario(async (bed, t) => {
  const cluster = await bed.redisCluster({ masters: 3 });
  const a = await bed.replica({ cluster });
  const b = await bed.replica({ cluster });
  const alice = await bed.join(a, { organizationId: "acme", userId: "alice" }, { name: "alice@a/websocket" });
  const bob = await bed.join(b, { organizationId: "acme", userId: "bob" }, { name: "bob@b/polling", transports: ["polling"] });
  const members = [alice, bob];
  const slot = await cluster.keyslot(channel("acme"));
  const from = await cluster.slotOwnerPort(channel("acme"));
  const to = (await cluster.masters()).find((port) => port !== from);
  assert.equal(await cluster.shardSubscribers(channel("acme")), 2);

  const notice = (replica, when) => replica.publish({ organizationId: "acme", event: "notice", data: { when, via: replica.name } });
  await notice(a, "before");
  await notice(b, "before");

  // A publish loop through a's ingest across the migration and the replicas' moves to the
  // new owner: the migration starts once five ticks were taken; the loop ends once five
  // more were taken after both replicas subscribed at the new owner. A tick is answered 200
  // or 503, nothing else.
  const accepted = [];
  const refused = [];
  let migrated = false;
  let acceptedAfter = 0;
  const migration = (async () => {
    await until(() => accepted.length >= 5, { what: "five ticks taken before the migration" });
    assert.equal(await cluster.migrateSlot(slot, to), from);
    assert.equal(await cluster.slotOwnerPort(channel("acme")), to);
    await until(async () => (await cluster.shardSubscribers(channel("acme"))) === 2, {
      what: "both replicas subscribed at the new owner",
    });
    migrated = true;
  })();
  let n = 0;
  const publishing = until(
    async () => {
      const res = await a.post("/v1/publish", { organizationId: "acme", event: "tick", data: n });
      assert.ok([200, 503].includes(res.status), `tick ${n}: ${res.status} ${JSON.stringify(res.body)}`);
      if (res.status === 200) {
        accepted.push(n);
        if (migrated) acceptedAfter++;
      } else refused.push(n);
      n++;
      return migrated && acceptedAfter >= 5;
    },
    { timeout: 20_000, every: 10, what: "five ticks taken through a after the migration" },
  );
  await Promise.all([migration, publishing]);

  // Both replicas followed the slot: subscribed at the new owner, not at the old one.
  assert.equal(await cluster.shardSubscribers(channel("acme")), 2);
  assert.deepEqual(await redisCommand(from, "PUBSUB", "SHARDNUMSUB", channel("acme")), [channel("acme"), 0]);
  for (const replica of [a, b]) {
    await until(async () => (await replica.readyz()) === 200, { what: `${replica.name} /readyz 200` });
  }
  await notice(a, "after");
  await notice(b, "after");
  await marker(b, "acme", members);

  const notices = ["before", "after"].flatMap((when) => [a, b].map((r) => ({ when, via: r.name })));
  for (const m of members) {
    assert.deepEqual(m.all("notice"), notices, m.name);
    // Published through one master at a time, in this order: the ticks come between.
    assert.match(m.serverEvents().join(" "), /^auth-success notice notice( tick)* notice notice marker$/, m.name);
    assertIncreasing(m.all("tick"), `${m.name}: ticks once each, in order`);
    assertUndisturbed(m);
  }
  // a's own member has every tick a took (a refused one may have arrived too: refused
  // because a's subscription changed under it, the publish itself may have gone through).
  assert.deepEqual(accepted.filter((tick) => !alice.all("tick").includes(tick)), [], "alice: ticks a took, lost");
  // b's member may have missed what a took while b's own subscription was moving: that is
  // what fanout_bus_missed_total counts; reported, not a failure.
  const missedByBob = accepted.filter((tick) => !bob.all("tick").includes(tick));
  const refusedYetSent = refused.filter((tick) => alice.all("tick").includes(tick));
  t.diagnostic(
    `${accepted.length} ticks taken, ${refused.length} refused ${JSON.stringify(refused)} ` +
      `(of which alice got ${JSON.stringify(refusedYetSent)}); bob missed ${JSON.stringify(missedByBob)}, ` +
      `b counted ${await b.metric("fanout_bus_missed_total")} missed`,
  );
}));

test("Redis Cluster with a history: acme's master killed (-9) during a publish loop: every event answered 200 reaches each member once, in seq order", scenario(async (bed, t) => {
  const cluster = await bed.redisCluster({ masters: 3, replicas: 1 });
  const database = await bed.database();
  const a = await bed.replica({ cluster, database });
  const b = await bed.replica({ cluster, database });
  const alice = await bed.join(a, { organizationId: "acme", userId: "alice" }, { name: "alice@a/websocket" });
  const bob = await bed.join(b, { organizationId: "acme", userId: "bob" }, { name: "bob@b/polling", transports: ["polling"] });
  const members = [alice, bob];
  const slot = await cluster.keyslot(channel("acme"));
  const master = await cluster.slotOwnerPort(channel("acme"));

  // 30 events through a's ingest, each after the previous one's answer, a 503 retried (with
  // the same data); the master dies once the fifth is taken. A tick's data is its index.
  const seqs = [];
  const answers = new Map();
  let refused = 0;
  let killedAt = null;
  let slowest = 0;
  await until(
    async () => {
      if (seqs.length === 5 && killedAt === null) {
        await cluster.killMaster(master);
        killedAt = Date.now();
      }
      const sentAt = Date.now();
      const res = await a.post("/v1/publish", { organizationId: "acme", event: "tick", data: seqs.length });
      slowest = Math.max(slowest, Date.now() - sentAt);
      assert.ok([200, 503].includes(res.status), `tick ${seqs.length}: ${res.status} ${JSON.stringify(res.body)}`);
      if (res.status === 200) {
        assert.equal(typeof res.body.seq, "number", `a durable answer has its seq: ${JSON.stringify(res.body)}`);
        seqs.push(res.body.seq);
        const kind = JSON.stringify({ ...res.body, seq: undefined });
        answers.set(kind, (answers.get(kind) ?? 0) + 1);
      } else refused++;
      return seqs.length === 30;
    },
    { timeout: 30_000, every: 50, what: "30 events taken through a" },
  );
  assert.deepEqual(seqs, range(1, 30));
  assert.notEqual(await cluster.waitFailover(slot, master), master);

  // Live, or read back from the history once the replica's bus is back.
  for (const m of members) await m.until((c) => c.all("tick").length >= 30, "30 ticks", 20_000);
  const deliveredIn = Math.max(...members.map((m) => m.log.findLast((e) => e.name === "tick").at)) - killedAt;
  await marker(a, "acme", members);
  for (const m of members) {
    const ticks = m.log.filter((e) => e.name === "tick");
    assert.deepEqual(ticks.map((e) => e.args[1]?.seq), range(1, 30), `${m.name}: every event once, in seq order`);
    assert.deepEqual(ticks.map((e) => e.args[0]), range(0, 29), `${m.name}: each with its data`);
    assert.deepEqual(m.serverEvents(), ["auth-success", ...ticks.map(() => "tick"), "marker"], m.name);
    assertUndisturbed(m);
  }
  t.diagnostic(
    `30 events taken, ${refused} refused (503), answers ${JSON.stringify(Object.fromEntries(answers))}, ` +
      `the slowest in ${slowest} ms; the last at both members ${deliveredIn} ms after the kill`,
  );
}));

test("Redis Cluster: subscription connections killed by the masters (CLIENT KILL TYPE pubsub) are made again by both replicas, whose members never notice", scenario(async (bed) => {
  const cluster = await bed.redisCluster({ masters: 3 });
  const a = await bed.replica({ cluster });
  const b = await bed.replica({ cluster });
  const orgs = await orgsOnEveryMaster(cluster);
  const members = await membersOnBoth(bed, a, b, orgs);
  const reconnects = new Map();
  for (const replica of [a, b]) reconnects.set(replica, (await replica.metric("fanout_redis_reconnects_total")) ?? 0);

  // Each replica has one subscriber connection per master (its probe channel there keeps it
  // in pub/sub mode): two per master.
  for (const port of await cluster.masters()) {
    assert.equal(await redisCommand(port, "CLIENT", "KILL", "TYPE", "pubsub"), 2, `subscriber connections killed on ${port}`);
  }
  // The counter goes up once all of a replica's subscriptions are in place again.
  for (const replica of [a, b]) {
    await until(async () => (await replica.metric("fanout_redis_reconnects_total")) > reconnects.get(replica), {
      what: `${replica.name} to make its subscriptions again`,
    });
    await until(async () => (await replica.readyz()) === 200, { what: `${replica.name} /readyz 200` });
  }
  for (const org of orgs) assert.equal(await cluster.shardSubscribers(channel(org)), 2, org);

  for (const [i, org] of orgs.entries()) {
    await (i % 2 ? b : a).publish({ organizationId: org, event: "notice", data: { org } });
  }
  // As in the first test: each org's notice at both of its members before any marker.
  for (const [org, list] of members) await Promise.all(list.map((m) => m.find("notice", (d) => d?.org === org)));
  for (const [org, list] of members) await marker(a, org, list);
  for (const [org, list] of members) {
    for (const m of list) {
      assert.deepEqual(m.all("notice"), [{ org }], m.name);
      assert.deepEqual(m.serverEvents(), ["auth-success", "notice", "marker"], m.name);
      assertUndisturbed(m);
    }
  }
}));

test("Redis Cluster: the last member of an org leaving a replica ends that replica's shard subscription, and only that", scenario(async (bed) => {
  const cluster = await bed.redisCluster({ masters: 3 });
  const a = await bed.replica({ cluster });
  const b = await bed.replica({ cluster });
  const first = await bed.join(a, { organizationId: "acme", userId: "u1" }, { name: "u1@a/websocket" });
  const second = await bed.join(a, { organizationId: "acme", userId: "u2" }, { name: "u2@a/polling", transports: ["polling"] });
  const third = await bed.join(b, { organizationId: "acme", userId: "u3" }, { name: "u3@b/websocket" });
  const subscribers = () => cluster.shardSubscribers(channel("acme"));
  assert.equal(await subscribers(), 2);

  // One of a's two members leaves: a still has acme, so it stays subscribed, and delivers.
  first.close();
  await until(async () => (await a.metric("fanout_connections")) === 1, { what: "a to let u1 go" });
  assert.equal(await subscribers(), 2);
  await marker(b, "acme", [second, third]);

  // The last one on a leaves: a's subscription goes, b's stays. What a's ingest takes for
  // acme still reaches acme's member on b.
  second.close();
  await until(async () => (await subscribers()) === 1, { what: "a to unsubscribe acme" });
  await until(async () => (await a.metric("fanout_redis_subscriptions")) === 0, { what: "a to count no subscription" });
  assert.equal(await b.metric("fanout_redis_subscriptions"), 1);
  await marker(a, "acme", [third]);

  // And the last one on b.
  third.close();
  await until(async () => (await subscribers()) === 0, { what: "b to unsubscribe acme" });
  await until(async () => (await b.metric("fanout_redis_subscriptions")) === 0, { what: "b to count no subscription" });
  for (const m of [first, second, third]) assert.equal(m.all("auth-success").length, 1, m.name);
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
