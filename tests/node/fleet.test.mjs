// A fleet: replicas sharing one redis-server. Whatever replica a message enters through (or
// a direct Redis PUBLISH), every member of the org on every replica gets it exactly once,
// and nobody outside the org gets it.

import assert from "node:assert/strict";
import { test } from "node:test";
import { freePort, marker, nowSeconds, scenario, token, until } from "./harness.mjs";

const seq = (n, f) => Array.from({ length: n }, (_, i) => f(i + 1));

test("auth-success means subscribed: a publish through another replica right after it arrives", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  // Each org is new to the replica it joins, so each join waits for a new Redis subscription.
  for (let i = 0; i < 15; i++) {
    const client = await joinThenReceiveFromOther(bed, [a, b], `fresh-${i}`, i);
    client.close();
  }
}));

test("auth-success means subscribed, for many orgs joining at once", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  await Promise.all(
    seq(24, (i) => joinThenReceiveFromOther(bed, [a, b], `burst-${i}`, i)),
  );
}));

/**
 * Joins org `organizationId` on one replica (alternating with `i`, and alternating the
 * transport), and checks that an update published through the other replica as soon as
 * `auth-success` arrived is received.
 */
async function joinThenReceiveFromOther(bed, [a, b], organizationId, i) {
  const [home, other] = i % 2 ? [a, b] : [b, a];
  const client = bed.connect(home, {
    token: token({ organizationId, userId: "u" }),
    transports: i % 3 ? ["websocket"] : ["polling"],
  });
  await client.authenticated();
  await other.update({ organizationId, taskId: `t-${i}`, status: "RUNNING" });
  assert.equal((await client.next("execution-updated")).taskId, `t-${i}`);
  return client;
}

test("an org's last socket leaving while the next one joins: the newcomer still receives", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  let previous = await bed.join(a, { organizationId: "churn", userId: "u0" });
  for (let i = 1; i <= 20; i++) {
    // The leave (unsubscribe) and the join (subscribe) of the same org race on replica a.
    const next = bed.connect(a, { token: token({ organizationId: "churn", userId: `u${i}` }) });
    previous.close();
    await next.authenticated();
    await b.update({ organizationId: "churn", taskId: `t-${i}`, status: "RUNNING" });
    assert.equal((await next.next("execution-updated")).taskId, `t-${i}`);
    previous = next;
  }
}));

test("a message published through either replica reaches every member on both, exactly once, in order", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  const member = (replica, userId, transports) =>
    bed.join(replica, { organizationId: "acme", userId }, { transports, name: `${userId}@${replica.name}` });
  const members = [
    await member(a, "u1", ["websocket"]),
    await member(a, "u2", ["polling"]),
    await member(b, "u3", ["websocket"]),
    await member(b, "u1", ["polling"]),
  ];
  const N = 30;
  for (let n = 1; n <= N; n++) {
    const via = n % 2 ? b : a;
    await via.update({ organizationId: "acme", taskId: `t-${n}`, status: "RUNNING", via: via.name });
  }
  await marker(a, "acme", members);
  const expected = seq(N, (n) => `t-${n}`);
  for (const m of members) {
    assert.deepEqual(m.all("execution-updated").map((d) => d.taskId), expected, m.name);
  }
}));

test("orgs publishing concurrently through both replicas: exact counts, nothing foreign", scenario(async (bed) => {
  const { replicas } = await bed.fleet(2);
  const orgs = ["org-a", "org-b", "org-c", "org-d", "org-e"];
  // Two members per org, one on each replica; a third on replica 0 for every other org.
  const members = new Map();
  for (const [i, org] of orgs.entries()) {
    const list = [];
    for (const [r, replica] of replicas.entries()) {
      list.push(await bed.join(replica, { organizationId: org, userId: `user-${r}` }, { name: `${org}/${r}` }));
    }
    if (i % 2 === 0) list.push(await bed.join(replicas[0], { organizationId: org, userId: "extra" }, { name: `${org}/extra`, transports: ["polling"] }));
    members.set(org, list);
  }
  const PER_ORG = 40;
  await Promise.all(
    orgs.map(async (org, i) => {
      for (let n = 1; n <= PER_ORG; n++) {
        const via = replicas[(n + i) % replicas.length];
        if (n % 3 === 0) await via.log({ organizationId: org, taskId: `${org}#${n}`, log: `line ${n}` });
        else await via.update({ organizationId: org, taskId: `${org}#${n}`, status: "RUNNING" });
      }
    }),
  );
  // Every org's messages are in the bus before any marker: a foreign message would arrive first.
  for (const org of orgs) await marker(replicas[1], org, members.get(org));
  for (const [org, list] of members) {
    for (const m of list) {
      const got = m.log
        .filter((e) => e.name === "execution-updated" || e.name === "execution-log")
        .map((e) => e.args[0]);
      const foreign = got.filter((d) => d.organizationId !== org);
      assert.deepEqual(foreign, [], `${m.name} got another org's messages`);
      assert.deepEqual(got.map((d) => d.taskId), seq(PER_ORG, (n) => `${org}#${n}`), m.name);
    }
  }
}));

test("a user-targeted publish reaches that user's sockets in that org only, on every replica", scenario(async (bed) => {
  const { replicas: [a, b] } = await bed.fleet(2);
  const aliceA = await bed.join(a, { organizationId: "acme", userId: "alice" }, { name: "alice@acme/a" });
  const aliceB = await bed.join(b, { organizationId: "acme", userId: "alice" }, { name: "alice@acme/b", transports: ["polling"] });
  const bob = await bed.join(a, { organizationId: "acme", userId: "bob" }, { name: "bob@acme" });
  const aliceElsewhere = await bed.join(b, { organizationId: "globex", userId: "alice" }, { name: "alice@globex" });
  const numeric = await bed.join(a, { organizationId: "acme", userId: 1001 }, { name: "1001@acme" });

  const res = await b.post("/v1/publish", { organizationId: "acme", userId: "alice", event: "notice", data: { text: "for alice" } });
  assert.deepEqual(res, { status: 200, body: { status: "published" } });
  await a.publish({ organizationId: "acme", userId: 1001, event: "notice", data: { text: "for 1001" } });

  await marker(a, "acme", [aliceA, aliceB, bob, numeric]);
  await marker(b, "globex", [aliceElsewhere]);
  assert.deepEqual(aliceA.all("notice"), [{ text: "for alice" }]);
  assert.deepEqual(aliceB.all("notice"), [{ text: "for alice" }]);
  assert.deepEqual(numeric.all("notice"), [{ text: "for 1001" }]);
  assert.deepEqual(bob.all("notice"), []);
  assert.deepEqual(aliceElsewhere.all("notice"), []);
  assert.deepEqual(aliceElsewhere.serverEvents(), ["auth-success", "marker"]);
}));

test("a direct Redis PUBLISH on fanout:org:<id> reaches the org's sockets on every replica", scenario(async (bed) => {
  const { redis, replicas: [a, b] } = await bed.fleet(2);
  const onA = await bed.join(a, { organizationId: "acme", userId: "u1" });
  const onB = await bed.join(b, { organizationId: "acme", userId: "u2" }, { transports: ["polling"] });
  const outsider = await bed.join(a, { organizationId: "globex", userId: "u1" });

  const data = { organizationId: "acme", taskId: "t-9", log: "from a worker" };
  // Both replicas hold an acme socket, so both are subscribed.
  assert.equal(await redis.publish("fanout:org:acme", { event: "execution-log", data }), 2);
  assert.deepEqual(await onA.next("execution-log"), data);
  assert.deepEqual(await onB.next("execution-log"), data);

  // The envelope may carry ts and userId.
  const envelope = { event: "execution-log", data: { taskId: "t-10", log: "for u2" }, ts: Date.now(), userId: "u2" };
  assert.equal(await redis.publish("fanout:org:acme", envelope), 2);
  assert.deepEqual(await onB.next("execution-log"), envelope.data);

  // Malformed envelopes are dropped; the channel keeps working.
  for (const bad of ["not json", "{}", JSON.stringify({ event: "auth-success", data: {} }), JSON.stringify({ data: 1 })]) {
    await redis.publish("fanout:org:acme", bad);
  }
  await redis.publish("fanout:org:acme", { event: "execution-log", data: { taskId: "t-11", log: "still flowing" } });
  assert.equal((await onA.next("execution-log")).taskId, "t-11");

  await marker(a, "acme", [onA, onB]);
  await marker(a, "globex", [outsider]);
  assert.deepEqual(onA.all("execution-log").map((d) => d.taskId), ["t-9", "t-11"]);
  assert.deepEqual(onB.all("execution-log").map((d) => d.taskId), ["t-9", "t-10", "t-11"]);
  assert.deepEqual(onA.serverEvents().filter((e) => e.startsWith("auth-")), ["auth-success"]);
  assert.deepEqual(outsider.serverEvents(), ["auth-success", "marker"]);
}));

test("a replica is subscribed to an org's channel exactly while it holds a socket of it", scenario(async (bed) => {
  const { redis, replicas: [a, b] } = await bed.fleet(2);
  const channel = "fanout:org:acme";
  assert.equal(await redis.subscribers(channel), 0);
  const first = await bed.join(a, { organizationId: "acme", userId: "u1" });
  assert.equal(await redis.subscribers(channel), 1);
  const second = await bed.join(a, { organizationId: "acme", userId: "u2" });
  const third = await bed.join(b, { organizationId: "acme", userId: "u3" });
  assert.equal(await redis.subscribers(channel), 2);
  first.close();
  third.close();
  await until(async () => (await redis.subscribers(channel)) === 1, { what: "replica b to unsubscribe" });
  // Replica a still holds `second`, so it still delivers.
  await b.update({ organizationId: "acme", taskId: "t-1", status: "DONE" });
  assert.equal((await second.next("execution-updated")).taskId, "t-1");
  second.close();
  await until(async () => (await redis.subscribers(channel)) === 0, { what: "replica a to unsubscribe" });
}));

test("a refused socket never makes its replica subscribe to the org its token claims", scenario(async (bed) => {
  const { redis, replicas: [a] } = await bed.fleet(1);
  const claims = { organizationId: "ghost", userId: "mallory" };
  const forged = [
    token(claims, { secret: "not-the-replicas-secret-0123456789" }),
    token({ ...claims, exp: nowSeconds() - 60 }),
    token(claims, { algorithm: "HS512" }),
  ];
  for (const tok of forged) {
    const refused = bed.connect(a, { token: tok });
    assert.equal(await refused.next("disconnect"), "io server disconnect");
  }
  // The replica's subscriber handles requests in order: once a later join is subscribed,
  // a subscription a refused socket had asked for would be in place too.
  await bed.join(a, { organizationId: "real", userId: "u1" });
  assert.equal(await redis.subscribers("fanout:org:real"), 1);
  assert.equal(await redis.subscribers("fanout:org:ghost"), 0);
}));

test("Redis outage: /readyz 503 and ingest 503 while down, subscriptions restored when it is back", scenario(async (bed) => {
  const port = await freePort();
  // Started before its Redis exists: up, not ready.
  const a = await bed.replica({ redis: { url: `redis://127.0.0.1:${port}` }, ready: false });
  assert.equal(await a.readyz(), 503);
  let redis = await bed.redis({ port });
  await until(async () => (await a.readyz()) === 200, { what: "/readyz 200 once Redis is up" });
  const b = await bed.replica({ redis });
  const onA = await bed.join(a, { organizationId: "acme", userId: "u1" });
  const onB = await bed.join(b, { organizationId: "acme", userId: "u2" });

  await redis.stop();
  await until(async () => (await a.readyz()) === 503 && (await b.readyz()) === 503, { what: "/readyz 503 on both" });
  const refused = await a.post("/executions/update", { organizationId: "acme", taskId: "lost", status: "RUNNING" });
  assert.equal(refused.status, 503, JSON.stringify(refused.body));
  assert.equal(typeof refused.body.error, "string");
  // Joining still works meanwhile; the new org is subscribed when Redis is back.
  const joinedDuring = await bed.join(a, { organizationId: "newco", userId: "u3" });

  redis = await bed.redis({ port });
  await until(async () => (await a.readyz()) === 200 && (await b.readyz()) === 200, { what: "/readyz 200 on both" });
  // The sockets stayed connected; their org's channel was subscribed again on reconnect.
  await b.update({ organizationId: "acme", taskId: "after", status: "RUNNING" });
  for (const c of [onA, onB]) {
    assert.equal((await c.next("execution-updated")).taskId, "after");
    assert.deepEqual(c.all("disconnect"), []);
  }
  await b.update({ organizationId: "newco", taskId: "welcome", status: "RUNNING" });
  assert.equal((await joinedDuring.next("execution-updated")).taskId, "welcome");
  assert.equal(await redis.subscribers("fanout:org:acme"), 2);
  assert.deepEqual(onA.all("execution-updated").map((d) => d.taskId), ["after"]);
}));
