// The durable history, as a dashboard sees it with the stock socket.io-client. With
// DATABASE_URL, every HTTP-ingested event is committed with a per-organization sequence
// number and arrives as `(data, meta)`, `meta.seq` being that number. A client that connects
// with `auth: { token, lastSeq }` first gets every event of its organization after `lastSeq`
// that is meant for it, in order and exactly once, then live events, whichever replica it
// reconnects to; when that cannot be done it gets `resync-required` instead, then live events.

import assert from "node:assert/strict";
import { test } from "node:test";
import { marker, scenario, token, until } from "./harness.mjs";

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** What a client records that the server did not send as data. */
const NOT_DATA = new Set(["connect", "disconnect", "connect_error", "reconnect_attempt", "upgrade", "auth-success"]);

/** Everything the server sent `client` after `auth-success`, in order: `{ event, data, seq }`. */
function received(client) {
  return client.log.filter((e) => !NOT_DATA.has(e.name)).map((e) => ev(e.name, e.args[0], e.args[1]?.seq));
}

const ev = (event, data, seq) => ({ event, data, seq });

/**
 * A dashboard written the way the feature is meant to be used: it keeps the highest
 * `meta.seq` it has seen and hands it back through socket.io-client's `auth` function, which
 * the client calls on every (re)connect. On `resync-required` it would refetch its state
 * over REST; here it carries on from `latestSeq`. `received` holds every durable event it
 * got, over all its sockets, in arrival order; `sent` the `lastSeq` of each (re)connect.
 */
class Dashboard {
  constructor(claims) {
    this.token = token(claims);
    this.lastSeq = null;
    this.received = [];
    this.sent = [];
    this.held = null;
  }

  /** The `auth` option: a function, called by the client on every (re)connect. */
  auth = (cb) => {
    const send = () => {
      this.sent.push(this.lastSeq);
      cb({ token: this.token, lastSeq: this.lastSeq });
    };
    if (this.held) {
      this.held.called = true;
      this.held.promise.then(send);
    } else {
      send();
    }
  };

  /**
   * Until `release()`, a (re)connect waits in the auth function (as if it were reading
   * `lastSeq` from slow storage): the transport is open, the Socket.IO socket is not
   * connected, so nothing can reach it but what is replayed afterwards.
   */
  hold() {
    let release;
    const promise = new Promise((resolve) => (release = resolve));
    this.held = { promise, release, called: false };
  }

  /** Waits until a (re)connect is waiting in the auth function. */
  async waitingInAuth() {
    await until(() => this.held?.called, { what: "the client to (re)connect and call its auth function" });
  }

  release() {
    const held = this.held;
    this.held = null;
    held.release();
  }

  /** A stock client of this dashboard (through `bed.connect`, so the bed records and closes it). */
  connect(bed, replica, options = {}) {
    const client = bed.connect(replica, { auth: this.auth, ...options });
    client.socket.onAny((event, data, meta) => {
      if (typeof meta?.seq !== "number") return;
      this.received.push(ev(event, data, meta.seq));
      this.lastSeq = Math.max(this.lastSeq ?? 0, meta.seq);
    });
    client.socket.on("resync-required", ({ latestSeq }) => {
      this.lastSeq = Math.max(this.lastSeq ?? 0, latestSeq);
    });
    return client;
  }

  seqs() {
    return this.received.map((e) => e.seq);
  }

  /** Waits until it has received `n` durable events in all. */
  async count(n) {
    await until(() => this.received.length >= n, {
      what: `${n} durable events (got seqs ${JSON.stringify(this.seqs())})`,
    });
  }
}

/**
 * One organization's worker: posts execution updates (every third one a log line) through
 * `replicas` in turn, each after the previous one's answer, checks that each is durable and
 * numbered after the previous one, and remembers what each seq carries (`sent`, in order).
 */
class Feed {
  constructor(organizationId, replicas) {
    this.organizationId = organizationId;
    this.replicas = replicas;
    this.n = 0;
    this.sent = [];
  }

  async publish(count) {
    for (let i = 0; i < count; i++) {
      const n = ++this.n;
      const via = this.replicas[n % this.replicas.length];
      const [event, route, data] =
        n % 3 === 0
          ? ["execution-log", "/executions/log", { organizationId: this.organizationId, taskId: `t-${n}`, log: `line ${n}` }]
          : ["execution-updated", "/executions/update", { organizationId: this.organizationId, taskId: `t-${n}`, status: "RUNNING", n }];
      const res = await via.post(route, data);
      assert.equal(res.status, 200, `${via.name} ${route} → ${res.status} ${JSON.stringify(res.body)}`);
      assert.equal(res.body.status, "broadcasted", JSON.stringify(res.body));
      assert.ok(res.body.seq > (this.sent.at(-1)?.seq ?? 0), `seq ${res.body.seq} after ${this.sent.at(-1)?.seq}`);
      this.sent.push(ev(event, data, res.body.seq));
    }
  }

  /** `publish(count)` in the background; awaiting the result rethrows its failure. */
  publishMeanwhile(count) {
    const done = this.publish(count);
    done.catch(() => {}); // awaited later; not an unhandled rejection meanwhile
    return done;
  }
}

/**
 * Checks that `dashboard` received exactly what `feed` sent then one marker: every event
 * once, in sequence order, with its data unchanged, down to the order of its keys (which a
 * history that normalised its JSON would change: `{organizationId, taskId, status, n}` is
 * not in jsonb's order).
 */
function assertEverythingOnce(dashboard, feed) {
  const last = feed.sent.length + 1;
  assert.deepEqual(dashboard.seqs(), range(1, last), "every seq once, in order");
  const events = dashboard.received.slice(0, -1);
  assert.deepEqual(events, feed.sent);
  assert.deepEqual(events.map((e) => JSON.stringify(e.data)), feed.sent.map((e) => JSON.stringify(e.data)), "key order kept");
  assert.equal(dashboard.received.at(-1).event, "marker");
}

/** Connects with a fixed `auth.lastSeq` and waits for (consumes) `auth-success`. */
async function resume(bed, replica, claims, lastSeq, options = {}) {
  const client = bed.connect(replica, { auth: { token: token(claims), lastSeq }, name: `${claims.userId}@${claims.organizationId}`, ...options });
  await client.authenticated();
  return client;
}

test("a durable event arrives as (data, meta): data unchanged, meta.seq 1, 2, 3 per organization, through either replica", scenario(async (bed) => {
  const database = await bed.database();
  const { redis, replicas: [a, b] } = await bed.fleet(2, { database });
  const aliceA = await bed.join(a, { organizationId: "acme", userId: "alice" }, { name: "alice@a" });
  const bobB = await bed.join(b, { organizationId: "acme", userId: "bob" }, { name: "bob@b", transports: ["polling"] });
  const carol = await bed.join(b, { organizationId: "globex", userId: "carol" }, { name: "carol@globex" });

  const update = { organizationId: "acme", taskId: "t-1", status: "RUNNING", runner: { host: "r1", slots: [1, 2] }, note: "héllo ✓" };
  assert.deepEqual(await a.post("/executions/update", update), { status: 200, body: { status: "broadcasted", seq: 1 } });
  const log = { organizationId: "acme", taskId: "t-1", log: "step 1/3\n", stream: "stdout" };
  assert.deepEqual(await b.post("/executions/log", log), { status: 200, body: { status: "broadcasted", seq: 2 } });
  const other = { organizationId: "globex", taskId: "g-1", status: "PENDING" };
  assert.deepEqual(await b.post("/executions/update", other), { status: 200, body: { status: "broadcasted", seq: 1 } });
  const report = { organizationId: "acme", event: "report.ready", data: [1, "two", null] };
  assert.deepEqual(await a.post("/v1/publish", report), { status: 200, body: { status: "published", seq: 3 } });

  // A worker's direct Redis PUBLISH is ephemeral: one argument, and it takes no seq.
  for (const c of [aliceA, bobB]) await c.next("report.ready");
  assert.equal(await redis.publish("fanout:org:acme", { event: "ping", data: { direct: true } }), 2);
  for (const c of [aliceA, bobB]) assert.deepEqual(await c.next("ping"), { direct: true });
  await marker(b, "acme", [aliceA, bobB]);
  await marker(a, "globex", [carol]);

  for (const c of [aliceA, bobB]) {
    assert.deepEqual(received(c).slice(0, -1), [
      ev("execution-updated", update, 1),
      ev("execution-log", log, 2),
      ev("report.ready", [1, "two", null], 3),
      ev("ping", { direct: true }, undefined),
    ], c.name);
    assert.deepEqual(received(c).at(-1).seq, 4, `${c.name}: the marker is durable too`);
    assert.deepEqual(c.log.filter((e) => !NOT_DATA.has(e.name)).map((e) => e.args.length), [2, 2, 2, 1, 2], c.name);
  }
  assert.deepEqual(received(carol).map((e) => [e.event, e.seq]), [["execution-updated", 1], ["marker", 2]]);
  assert.deepEqual(received(carol)[0].data, other);
}));

test("without DATABASE_URL: one argument, answers without seq, auth.lastSeq ignored", scenario(async (bed) => {
  const fanout = await bed.replica();
  assert.deepEqual((await fanout.readiness()).body, { status: "ready", bus: "memory" });
  const client = await resume(bed, fanout, { organizationId: "acme", userId: "alice" }, 3);
  const update = { organizationId: "acme", taskId: "t-1", status: "RUNNING" };
  assert.deepEqual(await fanout.post("/executions/update", update), { status: 200, body: { status: "broadcasted" } });
  assert.deepEqual(
    await fanout.post("/v1/publish", { organizationId: "acme", event: "note", data: { x: 1 } }),
    { status: 200, body: { status: "published" } },
  );
  await marker(fanout, "acme", [client]);
  assert.deepEqual(client.serverEvents(), ["auth-success", "execution-updated", "note", "marker"]);
  assert.deepEqual(client.log.filter((e) => !NOT_DATA.has(e.name)).map((e) => e.args.length), [1, 1, 1]);
  assert.deepEqual(client.all("execution-updated"), [update]);
}));

for (const transports of [["websocket"], ["polling"]]) {
  test(`the dashboard pattern over ${transports[0]}: after a network blip, auth's lastSeq brings every missed event once, in order, then live ones`, scenario(async (bed) => {
    const database = await bed.database();
    const fanout = await bed.replica({ database });
    const dashboard = new Dashboard({ organizationId: "acme", userId: "alice" });
    const client = dashboard.connect(bed, fanout, { transports, name: "alice" });
    await client.authenticated();
    const feed = new Feed("acme", [fanout]);
    await feed.publish(5);
    await dashboard.count(5);

    // The network blips: the client reconnects by itself, and gets through only once five
    // more events were committed; more keep coming while it is back.
    dashboard.hold();
    client.socket.io.engine.close();
    await client.next("disconnect");
    await feed.publish(5);
    await dashboard.waitingInAuth();
    dashboard.release();
    const meanwhile = feed.publishMeanwhile(20);
    await client.authenticated();
    await meanwhile;
    await dashboard.count(30);
    await marker(fanout, "acme", [client]);

    assert.deepEqual(dashboard.sent, [null, 5], "lastSeq sent on connect, then on reconnect");
    assertEverythingOnce(dashboard, feed);
    assert.equal(client.all("connect").length, 2);
    assert.equal(client.transport, transports[0]);
    assert.deepEqual(client.all("resync-required"), []);
  }));
}

for (const transports of [["websocket"], ["polling"]]) {
  test(`the dashboard comes back on the other replica (${transports[0]}): same auth function, nothing missed or repeated`, scenario(async (bed) => {
    const database = await bed.database();
    const { replicas: [a, b] } = await bed.fleet(2, { database });
    // A teammate on b the whole time: the dashboard joins a stream that is live there.
    const teammate = await bed.join(b, { organizationId: "acme", userId: "bob" }, { name: "bob@b" });
    const dashboard = new Dashboard({ organizationId: "acme", userId: "alice" });
    const first = dashboard.connect(bed, a, { transports, name: "alice@a" });
    await first.authenticated();
    const feed = new Feed("acme", [a, b]);
    await feed.publish(4);
    await dashboard.count(4);

    // Gone; events go on through both replicas; back on b while they keep coming.
    first.close();
    await feed.publish(6);
    const meanwhile = feed.publishMeanwhile(20);
    const second = dashboard.connect(bed, b, { transports, name: "alice@b" });
    await second.authenticated();
    await meanwhile;
    await dashboard.count(30);
    await marker(b, "acme", [second, teammate]);

    assert.deepEqual(dashboard.sent, [null, 4]);
    assertEverythingOnce(dashboard, feed);
    assert.deepEqual(received(teammate).map((e) => e.seq), range(1, 31), "live delivery on b: in order, once");
    for (const c of [first, second]) assert.deepEqual(c.all("resync-required"), [], c.name);
  }));
}

test("the replica dies: the dashboard reconnects by itself through the load balancer to the other one and misses nothing", scenario(async (bed) => {
  const database = await bed.database();
  const { replicas: [a, b] } = await bed.fleet(2, { database });
  const lb = await bed.balancer([a, b]); // a while it is up, else b
  const dashboard = new Dashboard({ organizationId: "acme", userId: "alice" });
  const client = dashboard.connect(bed, lb, { name: "alice" });
  await client.authenticated();
  const feed = new Feed("acme", [a, b]);
  await feed.publish(4);
  await dashboard.count(4);

  dashboard.hold();
  await a.proc.stop(); // SIGKILL: a crash, no goodbye
  await client.next("disconnect");
  feed.replicas = [b];
  await feed.publish(6);
  await dashboard.waitingInAuth(); // reconnected to b, the only one left
  dashboard.release();
  const meanwhile = feed.publishMeanwhile(20);
  await client.authenticated();
  await meanwhile;
  await dashboard.count(30);
  await marker(b, "acme", [client]);

  assert.deepEqual(dashboard.sent, [null, 4]);
  assertEverythingOnce(dashboard, feed);
  assert.deepEqual(client.all("resync-required"), []);
}));

test("too far behind (FANOUT_REPLAY_MAX=3), ahead of the history, or an invalid lastSeq: resync-required, then live events", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database, env: { FANOUT_REPLAY_MAX: "3" } });
  const feed = new Feed("acme", [fanout]);
  await feed.publish(8);
  const acme = (userId) => ({ organizationId: "acme", userId });

  const far = await resume(bed, fanout, acme("far"), 4);
  assert.deepEqual(await far.next("resync-required"), { reason: "too_far_behind", lastSeq: 4, latestSeq: 8 });
  // The replica now knows where acme's history ends (see the next test for when it does not).
  const edge = await resume(bed, fanout, acme("edge"), 5);
  const ahead = await resume(bed, fanout, acme("ahead"), 50);
  const text = await resume(bed, fanout, acme("text"), "soon");
  const negative = await resume(bed, fanout, acme("negative"), -1);
  assert.deepEqual(await ahead.next("resync-required"), { reason: "unknown_seq", lastSeq: 50, latestSeq: 8 });
  for (const c of [text, negative]) {
    assert.deepEqual(await c.next("resync-required"), { reason: "invalid_last_seq", lastSeq: 0, latestSeq: 0 }, c.name);
  }
  // The dashboard's stored lastSeq is stale: it is told to resync, refetches, carries on.
  const dashboard = new Dashboard(acme("alice"));
  dashboard.lastSeq = 1;
  const client = dashboard.connect(bed, fanout, { name: "dashboard" });
  await client.authenticated();
  assert.deepEqual(await client.next("resync-required"), { reason: "too_far_behind", lastSeq: 1, latestSeq: 8 });

  // Live events reach every one of them.
  await feed.publish(1);
  const everyone = [far, edge, ahead, text, negative, client];
  await marker(fanout, "acme", everyone);
  const tail = [["execution-log", 9], ["marker", 10]];
  const shape = (c) => received(c).map((e) => (e.event === "resync-required" ? [e.event, e.data.reason] : [e.event, e.seq]));
  assert.deepEqual(shape(far), [["resync-required", "too_far_behind"], ...tail]);
  assert.deepEqual(shape(edge), [["execution-log", 6], ["execution-updated", 7], ["execution-updated", 8], ...tail]);
  assert.deepEqual(received(edge).slice(0, 3), feed.sent.slice(5, 8), "replayed at the limit, data unchanged");
  assert.deepEqual(shape(ahead), [["resync-required", "unknown_seq"], ...tail]);
  for (const c of [text, negative]) assert.deepEqual(shape(c), [["resync-required", "invalid_last_seq"], ...tail], c.name);
  assert.deepEqual(shape(client), [["resync-required", "too_far_behind"], ...tail]);

  // From then on the dashboard's lastSeq is good: a blip costs it nothing.
  dashboard.hold();
  client.socket.io.engine.close();
  await client.next("disconnect");
  await feed.publish(2);
  await dashboard.waitingInAuth();
  dashboard.release();
  await client.authenticated();
  await dashboard.count(4);
  await marker(fanout, "acme", [client]);
  assert.deepEqual(dashboard.sent, [1, 10]);
  assert.deepEqual(dashboard.seqs(), [9, 10, 11, 12, 13]);
  assert.deepEqual(dashboard.received.slice(2, 4), feed.sent.slice(9, 11));
  assert.equal(client.all("resync-required").length, 1);
}));

test("a lastSeq ahead of the history, from the first socket of its org on the replica: unknown_seq", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  await new Feed("acme", [fanout]).publish(8);
  // Say the database was restored from a backup: the dashboard has seen further than it.
  const ahead = await resume(bed, fanout, { organizationId: "acme", userId: "ahead" }, 50);
  // (Not history_unavailable, which a replica that waited for its cursor would send.)
  assert.deepEqual(await ahead.next("resync-required"), { reason: "unknown_seq", lastSeq: 50, latestSeq: 8 });
}));

test("past retention: a client whose next event is gone gets resync-required (expired), then live events", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  const feed = new Feed("acme", [fanout]);
  await feed.publish(8);
  // What retention does once they are old enough (FANOUT_EVENT_RETENTION is at least 1m):
  // the oldest events are deleted, the sequence goes on.
  await database.query("DELETE FROM events WHERE organization_id = 'acme' AND seq <= 5");
  const acme = (userId) => ({ organizationId: "acme", userId });

  const gone = await resume(bed, fanout, acme("gone"), 2);
  assert.deepEqual(await gone.next("resync-required"), { reason: "expired", lastSeq: 2, latestSeq: 8 });
  const fromStart = await resume(bed, fanout, acme("from-start"), 0);
  assert.deepEqual(await fromStart.next("resync-required"), { reason: "expired", lastSeq: 0, latestSeq: 8 });
  const kept = await resume(bed, fanout, acme("kept"), 5);

  await feed.publish(1);
  await marker(fanout, "acme", [gone, fromStart, kept]);
  const tail = [["execution-log", 9], ["marker", 10]];
  const shape = (c) => received(c).map((e) => (e.event === "resync-required" ? [e.event, e.data.reason] : [e.event, e.seq]));
  for (const c of [gone, fromStart]) assert.deepEqual(shape(c), [["resync-required", "expired"], ...tail], c.name);
  assert.deepEqual(received(kept).slice(0, 4), feed.sent.slice(5, 9), "the retained ones are replayed");
  assert.deepEqual(shape(kept).slice(3), tail);
}));

test("replay is per organization and per user: nothing of another org, a user's events to that user only", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  const published = async (message, seq) => assert.deepEqual(await fanout.publish(message), { status: "published", seq });
  const t1 = { organizationId: "acme", taskId: "t-1", status: "RUNNING" };
  assert.equal((await fanout.update(t1)).seq, 1);
  await published({ organizationId: "acme", userId: "bob", event: "note", data: { for: "bob@acme" } }, 2);
  const log = { organizationId: "acme", taskId: "t-1", log: "done" };
  assert.equal((await fanout.log(log)).seq, 3);
  await published({ organizationId: "acme", userId: 1001, event: "note", data: { for: "1001@acme" } }, 4);
  const g1 = { organizationId: "globex", taskId: "g-1", status: "PENDING" };
  assert.equal((await fanout.update(g1)).seq, 1);
  await published({ organizationId: "globex", userId: "bob", event: "note", data: { for: "bob@globex" } }, 2);

  const alice = await resume(bed, fanout, { organizationId: "acme", userId: "alice" }, 0);
  const bob = await resume(bed, fanout, { organizationId: "acme", userId: "bob" }, 0, { transports: ["polling"] });
  const numeric = await resume(bed, fanout, { organizationId: "acme", userId: 1001 }, 0);
  const carol = await resume(bed, fanout, { organizationId: "globex", userId: "carol" }, 0);
  const globexBob = await resume(bed, fanout, { organizationId: "globex", userId: "bob" }, 0);
  await marker(fanout, "acme", [alice, bob, numeric]);
  await marker(fanout, "globex", [carol, globexBob]);

  const withoutMarker = (c) => received(c).slice(0, -1);
  assert.deepEqual(withoutMarker(alice), [ev("execution-updated", t1, 1), ev("execution-log", log, 3)]);
  assert.deepEqual(withoutMarker(bob), [ev("execution-updated", t1, 1), ev("note", { for: "bob@acme" }, 2), ev("execution-log", log, 3)]);
  assert.deepEqual(withoutMarker(numeric), [ev("execution-updated", t1, 1), ev("execution-log", log, 3), ev("note", { for: "1001@acme" }, 4)]);
  assert.deepEqual(withoutMarker(carol), [ev("execution-updated", g1, 1)]);
  assert.deepEqual(withoutMarker(globexBob), [ev("execution-updated", g1, 1), ev("note", { for: "bob@globex" }, 2)]);
  for (const c of [alice, bob, numeric]) assert.deepEqual(received(c).at(-1).seq, 5, c.name);
  for (const c of [carol, globexBob]) assert.deepEqual(received(c).at(-1).seq, 3, c.name);
}));
