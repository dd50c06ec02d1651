// The TypeScript client of clients/typescript (built to dist/ by `npm run build` there),
// against real replicas: what it promises a dashboard. Across a dropped connection, a
// killed replica and a reloaded page, every durable event reaches the application once and
// in order; when fanout cannot replay, the client refetches over REST (events waiting
// meanwhile) and carries on; the token is refreshed before exp, so the session outlives it.

import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";
import { marker, nowSeconds, scenario, token, until } from "./harness.mjs";

const { createFanoutClient, FanoutRestError, memoryStorage } = await import("../../clients/typescript/dist/index.js").catch((err) => {
  throw new Error(`the TypeScript client is not built (${err.message}): cd clients/typescript && npm ci && npm run build`);
});

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const ALICE = { organizationId: "acme", userId: "alice" };

/**
 * A dashboard on the client: everything the application is handed (events, refetches,
 * statuses, errors), in order, and the client itself, closed with the bed.
 */
function dashboard(bed, target, { claims = ALICE, storage = memoryStorage(), refetch, getToken, ...options } = {}) {
  const seen = { events: [], refetches: [], statuses: [], errors: [], order: [] };
  const client = createFanoutClient({
    url: target.url,
    getToken: getToken ?? (() => token(claims)),
    storage,
    onUpdate: (data, meta) => record("execution-updated", data, meta),
    onLog: (data, meta) => record("execution-log", data, meta),
    onEvent: (event, data, meta) => record(event, data, meta),
    onStatus: (status) => seen.statuses.push(status),
    onError: (error) => seen.errors.push(error.message),
    refetch: async (context) => {
      seen.order.push(`refetch ${context.reason}`);
      const result = await (refetch ?? ((c) => c.rest.executions()))(context);
      seen.refetches.push({ reason: context.reason, latestSeq: context.latestSeq, result });
      seen.order.push("refetched");
    },
    socketOptions: { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 200 },
    ...options,
  });
  function record(event, data, meta) {
    seen.events.push({ event, data, seq: meta?.seq });
    seen.order.push(`${event} ${meta?.seq}`);
  }
  bed.clients.push(client); // closed with the bed (close() is idempotent)
  return {
    client,
    seen,
    seqs: () => seen.events.map((e) => e.seq),
    lives: () => seen.statuses.filter((s) => s.state === "live").length,
    async live(n = 1) {
      await until(() => this.lives() >= n, { what: `status "live" #${n} (statuses ${JSON.stringify(seen.statuses)})` });
    },
    async count(n) {
      await until(() => seen.events.length >= n, { what: `${n} events (got seqs ${JSON.stringify(this.seqs())})` });
    },
  };
}

/**
 * A worker of `organizationId`: execution updates (every third one a log line) through
 * `replicas` in turn, each after the previous one's answer; `sent` holds what each seq
 * carries, in order.
 */
function feed(organizationId, replicas) {
  const sent = [];
  let n = 0;
  const publish = async (count) => {
    for (let i = 0; i < count; i++) {
      n++;
      const via = work.replicas[n % work.replicas.length];
      const log = n % 3 === 0;
      const data = log ? { organizationId, taskId: `t-${n}`, log: `line ${n}` } : { organizationId, taskId: `t-${n}`, status: "RUNNING", n };
      const { seq } = log ? await via.log(data) : await via.update(data);
      sent.push({ event: log ? "execution-log" : "execution-updated", data, seq });
    }
  };
  const work = {
    sent,
    /** Where the next events go (a scenario may change it). */
    replicas,
    publish,
    /** `publish(count)` in the background; awaiting the result rethrows its failure. */
    meanwhile(count) {
      const done = publish(count);
      done.catch(() => {});
      return done;
    },
  };
  return work;
}

/**
 * A TCP gate in front of `target`, closed with the bed: `down()` cuts every connection
 * through it and refuses new ones (the client keeps retrying), `up()` lets them through
 * again. It holds a reconnection back for as long as a scenario needs, without a sleep.
 */
async function gate(bed, target) {
  const port = Number(new URL(target.url).port);
  const open = new Set();
  let passing = true;
  const server = net.createServer((down) => {
    if (!passing) return down.destroy();
    const up = net.connect(port, "127.0.0.1");
    for (const sock of [down, up]) {
      open.add(sock);
      sock.on("error", () => {});
      sock.on("close", () => {
        open.delete(sock);
        down.destroy();
        up.destroy();
      });
    }
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  bed.servers.push({ server, open });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    down() {
      passing = false;
      for (const sock of open) sock.destroy();
    },
    up() {
      passing = true;
    },
  };
}

/** What the dashboard was handed, but the last one (a marker): exactly what `work` sent, each once, in order. */
function assertEverythingOnce(d, work) {
  assert.deepEqual(d.seqs(), range(1, work.sent.length + 1), "every seq once, in order");
  assert.deepEqual(d.seen.events.slice(0, -1), work.sent);
  assert.equal(d.seen.events.at(-1).event, "marker");
}

test("a replica is killed and the connection cut: the client reconnects with lastSeq to the other one; nothing lost or doubled", scenario(async (bed) => {
  const database = await bed.database();
  const { replicas: [a, b] } = await bed.fleet(2, { database });
  const lb = await bed.balancer([a, b]); // a while it is up, else b
  const wire = await gate(bed, lb);
  const d = dashboard(bed, wire);
  await d.live();
  // It connected with nothing to resume from: it loaded the state once, after auth-success.
  await until(() => d.seen.refetches.length === 1, { what: "the first refetch" });
  assert.deepEqual(d.seen.refetches[0], { reason: "no_last_seq", latestSeq: null, result: { executions: [], nextCursor: null } });

  const work = feed("acme", [a, b]);
  await work.publish(4);
  await d.count(4);

  // The network goes, and a with it; six events are committed through b meanwhile.
  wire.down();
  await a.proc.stop();
  await until(() => d.seen.statuses.at(-1).state === "reconnecting", { what: "the client to notice" });
  work.replicas = [b];
  await work.publish(6);
  const replayedBefore = (await b.metric("fanout_replayed_events_total")) ?? 0;
  wire.up();
  const more = work.meanwhile(20);
  await d.live(2);
  await more;
  await d.count(30);
  await marker(b, "acme", []);
  await d.count(31);

  assertEverythingOnce(d, work);
  assert.equal(d.client.lastSeq, 31);
  assert.ok((await b.metric("fanout_replayed_events_total")) - replayedBefore >= 6, "the missed events came by replay");
  assert.equal(d.seen.refetches.length, 1, "no refetch: the reconnection resumed from lastSeq");
  assert.deepEqual(d.seen.errors, []);
}));

test("a reloaded page (a new client on the same storage) resumes from the stored lastSeq: exactly what it missed, then live", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  const storage = memoryStorage();
  const work = feed("acme", [fanout]);

  const before = dashboard(bed, fanout, { storage });
  await before.live();
  await work.publish(5);
  await before.count(5);
  before.client.close();
  assert.equal(before.client.status.state, "closed");

  // Closed: what is published now is missed, and nothing reaches the closed client.
  await work.publish(5);
  // The page comes back with socket.io-client's default transports (long-polling, then the
  // upgrade to WebSocket).
  const after = dashboard(bed, fanout, { storage, socketOptions: { reconnectionDelay: 100, reconnectionDelayMax: 200 } });
  await after.live();
  const more = work.meanwhile(5);
  await after.count(10);
  await more;
  await marker(fanout, "acme", []);
  await after.count(11);

  assert.deepEqual(after.seqs(), range(6, 16), "from the stored position, each once, in order");
  assert.deepEqual(after.seen.events.slice(0, -1), work.sent.slice(5));
  assert.deepEqual(after.seen.refetches, [], "a replay, not a refetch");
  assert.deepEqual(before.seqs(), range(1, 5), "the closed client was handed nothing more");
  assert.equal(after.client.lastSeq, 16);

  // The position is kept per organization and user: bob, in the same browser, has none.
  const bob = dashboard(bed, fanout, { storage, claims: { organizationId: "acme", userId: "bob" } });
  await bob.live();
  await until(() => bob.seen.refetches.length === 1, { what: "bob's first refetch" });
  assert.equal(bob.seen.refetches[0].reason, "no_last_seq");
  assert.equal(bob.seen.refetches[0].result.executions.length, 10, "bob's state comes from REST");
  await marker(fanout, "acme", []);
  await bob.count(1);
  assert.deepEqual(bob.seqs(), [17], "live only: alice's position was not bob's");
  assert.deepEqual([...after.seen.errors, ...bob.seen.errors], []);
}));

test("resync-required (too far behind): the client refetches over REST while later events wait, then carries on after latestSeq", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database, env: { FANOUT_REPLAY_MAX: "3" } });
  const storage = memoryStorage();
  const work = feed("acme", [fanout]);

  const first = dashboard(bed, fanout, { storage });
  await first.live();
  await work.publish(2);
  await first.count(2);
  first.client.close();
  await work.publish(8); // 8 missed: more than FANOUT_REPLAY_MAX

  // While the refetch runs, two more events reach the socket: they must wait for it. Then
  // the connection is cut: the reconnection asks from latestSeq, and the two come again
  // by replay: they must be applied once.
  let arrived = 0;
  let authenticated = 0;
  const d = dashboard(bed, fanout, {
    storage,
    refetch: async ({ rest }) => {
      await work.publish(2);
      await until(() => arrived === 2, { what: "two live events to reach the socket during the refetch" });
      d.client.socket.io.engine.close();
      await until(() => authenticated === 2 && arrived === 4, { what: "the reconnection and the two events again, replayed" });
      return rest.executions({ limit: 500 });
    },
  });
  d.client.socket.on("auth-success", () => authenticated++);
  d.client.socket.on("execution-updated", () => arrived++);
  d.client.socket.on("execution-log", () => arrived++);
  await d.live();
  await d.count(2);
  await marker(fanout, "acme", []);
  await d.count(3);

  assert.equal(d.seen.refetches.length, 1);
  const [{ reason, latestSeq, result }] = d.seen.refetches;
  assert.deepEqual({ reason, latestSeq }, { reason: "too_far_behind", latestSeq: 10 });
  // What REST gave is the state up to latestSeq at least: every task updated so far.
  const updated = work.sent.filter((e) => e.event === "execution-updated" && e.seq <= 10);
  assert.deepEqual(result.executions.map((e) => e.taskId).filter((id) => updated.some((u) => u.data.taskId === id)).sort(), updated.map((u) => u.data.taskId).sort());
  assert.deepEqual(d.seen.order, ["refetch too_far_behind", "refetched", "execution-updated 11", "execution-log 12", "marker 13"], "the waiting events after the refetch, in order");
  assert.deepEqual(d.seen.events.slice(0, 2), work.sent.slice(10));
  assert.equal(d.client.lastSeq, 13);
  assert.equal(storage.getItem(`fanout:lastSeq:${encodeURIComponent(new URL(fanout.url).origin)}:acme:alice`), "13");

  // From then on its position is good: a cut connection costs nothing.
  d.client.socket.io.engine.close();
  await d.live(3);
  await work.publish(1);
  await marker(fanout, "acme", []);
  await d.count(5);
  assert.deepEqual(d.seqs(), [11, 12, 13, 14, 15]);
  assert.equal(d.seen.refetches.length, 1);
  assert.deepEqual(d.seen.errors, []);
}));

test("a stored lastSeq ahead of the history (restored from a backup): unknown_seq, refetch, and the position moves back to latestSeq", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  const work = feed("acme", [fanout]);
  await work.publish(8);
  const storage = memoryStorage();
  storage.setItem(`fanout:lastSeq:${encodeURIComponent(new URL(fanout.url).origin)}:acme:alice`, "50");

  const d = dashboard(bed, fanout, { storage });
  await d.live();
  await until(() => d.seen.refetches.length === 1, { what: "the refetch" });
  assert.deepEqual(d.seen.refetches.map(({ reason, latestSeq }) => ({ reason, latestSeq })), [{ reason: "unknown_seq", latestSeq: 8 }]);
  await work.publish(2);
  await marker(fanout, "acme", []);
  await d.count(3);
  assert.deepEqual(d.seen.events.slice(0, 2), work.sent.slice(8), "the events after latestSeq, though below the stored 50");
  assert.deepEqual(d.seqs(), [9, 10, 11]);
  assert.equal(d.client.lastSeq, 11);
  assert.deepEqual(d.seen.errors, []);
}));

test("the token is refreshed before exp (auth-refresh, acked): the session and its reconnections outlive the first token", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  // Tokens of three seconds (exp has a one-second resolution): each refresh comes at half
  // the remaining life. The seconds waited here are the scenario, not a synchronisation.
  const issued = [];
  const getToken = () => {
    const exp = nowSeconds() + 3;
    issued.push(exp);
    return token({ ...ALICE, exp });
  };
  const d = dashboard(bed, fanout, { getToken });
  const refreshes = [];
  d.client.socket.onAnyOutgoing((event, payload) => event === "auth-refresh" && refreshes.push(payload.token));
  await d.live();
  const firstExp = issued[0];

  await until(() => Date.now() >= firstExp * 1000 + 1500, { timeout: 10_000, what: "the first token's exp to pass" });
  assert.ok(refreshes.length >= 1, "auth-refresh was sent");
  const update = { organizationId: "acme", taskId: "after-exp", status: "RUNNING" };
  await fanout.update(update);
  await d.count(1);
  assert.deepEqual(d.seen.events[0].data, update);
  assert.equal(d.lives(), 1, "one session throughout: never refused, never reconnected");

  // A reconnection now carries the refreshed token (the first one would be refused).
  d.client.socket.io.engine.close();
  await d.live(2);
  await fanout.update({ ...update, status: "PASSED" });
  await d.count(2);
  assert.deepEqual(d.seen.statuses.filter((s) => s.state === "unauthorized"), []);
  assert.deepEqual(d.seen.errors, []);
}), { timeout: 60_000 });

// Until fanout ends the session, the token source has nothing fanout takes: the same token
// (a cache that renews late), or a newer one fanout refuses (here, signed with another key).
// Either way the refreshes fail, are reported, and the session ends at the first token's
// exp; from then on the source has a good token, and the client reopens the session with it.
for (const [source, refreshWith, reported] of [
  ["the token source had nothing newer", (first) => first, /getToken\(\) returned a token that expires no later than the current one/],
  ["fanout refused the refreshed token", () => token({ ...ALICE, exp: nowSeconds() + 600 }, { secret: "not-the-replicas-secret-0123456789" }), /fanout refused the refreshed token \(Invalid or expired token\); the session ends at the old exp/],
]) {
  test(`a session fanout ended at exp (${source}) is reopened with the next token, from lastSeq`, scenario(async (bed) => {
    const database = await bed.database();
    const fanout = await bed.replica({ database });
    const firstExp = nowSeconds() + 2;
    const first = token({ ...ALICE, exp: firstExp });
    const ended = () => d.seen.statuses.some((s) => s.state === "reconnecting" && s.reason === "Token expired");
    let calls = 0;
    const getToken = () => (calls++ === 0 ? first : ended() ? token(ALICE) : refreshWith(first));
    const d = dashboard(bed, fanout, { getToken });
    await d.live();
    const work = feed("acme", [fanout]);
    await work.publish(2);
    await d.count(2);

    await until(ended, { timeout: 10_000, what: "the session to end at exp" });
    assert.ok(Date.now() >= firstExp * 1000, "not before exp");
    await work.publish(2);
    await d.live(2);
    await marker(fanout, "acme", []);
    await d.count(5);
    assertEverythingOnce(d, work);
    assert.deepEqual(d.seen.refetches.map((r) => r.reason), ["no_last_seq"], "resumed from lastSeq, no refetch");
    assert.ok(d.seen.errors.length >= 1 && d.seen.errors.every((e) => reported.test(e)), JSON.stringify(d.seen.errors));
  }));
}

test("the REST calls answer as the types say; a deployment without history: live events only, no refetch loop", scenario(async (bed) => {
  const database = await bed.database();
  const fanout = await bed.replica({ database });
  const d = dashboard(bed, fanout);
  await d.live();
  await until(() => d.seen.refetches.length === 1, { what: "the first refetch" });
  await fanout.update({ organizationId: "acme", taskId: "t/1", status: "RUNNING", runner: "r1" });
  await fanout.log({ organizationId: "acme", taskId: "t/1", log: "step 1" });
  await fanout.update({ organizationId: "acme", taskId: "t/1", status: "PASSED" });
  await d.count(3);

  const { rest } = d.client;
  const page = await rest.executions({ status: "PASSED", limit: 10 });
  assert.deepEqual(Object.keys(page), ["executions", "nextCursor"]);
  assert.equal(page.nextCursor, null);
  const [execution] = page.executions;
  assert.deepEqual(Object.keys(execution), ["taskId", "status", "startedAt", "finishedAt", "updatedAt", "lastSeq", "data"]);
  assert.deepEqual({ taskId: execution.taskId, status: execution.status, lastSeq: execution.lastSeq }, { taskId: "t/1", status: "PASSED", lastSeq: 3 });
  assert.deepEqual(execution.data, { organizationId: "acme", taskId: "t/1", status: "PASSED", runner: "r1" });
  for (const time of [execution.startedAt, execution.finishedAt, execution.updatedAt]) assert.match(time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.deepEqual(await rest.execution("t/1"), execution);
  assert.equal(await rest.execution("nope"), null);
  const logs = await rest.logs("t/1", { afterSeq: 0, limit: 10 });
  assert.deepEqual(Object.keys(logs), ["logs", "nextAfterSeq"]);
  assert.equal(logs.nextAfterSeq, 2);
  assert.deepEqual(Object.keys(logs.logs[0]), ["seq", "data", "createdAt"]);
  assert.deepEqual(logs.logs[0].data, { organizationId: "acme", taskId: "t/1", log: "step 1" });
  await assert.rejects(rest.executions({ limit: 0 }), (err) => err instanceof FanoutRestError && err.status === 400 && /"limit" must be an integer from 1 to 500/.test(err.error) && !err.retryable);

  // Without DATABASE_URL: the first refetch is told there is no history and never retried,
  // not even after a reconnection; live events still arrive, without seq.
  const plain = await bed.replica();
  const live = dashboard(bed, plain);
  await live.live();
  await until(() => live.seen.errors.length === 1, { what: "the refetch's failure to be reported" });
  assert.match(live.seen.errors[0], /history is not enabled on this deployment/);
  live.client.socket.io.engine.close();
  await live.live(2);
  await plain.update({ organizationId: "acme", taskId: "t-1", status: "RUNNING" });
  await live.count(1);
  assert.deepEqual(live.seen.events, [{ event: "execution-updated", data: { organizationId: "acme", taskId: "t-1", status: "RUNNING" }, seq: undefined }]);
  assert.equal(live.client.lastSeq, null);
  assert.deepEqual(live.seen.order.filter((o) => o.startsWith("refetch")), ["refetch no_last_seq"], "one attempt, none after the reconnection");
  assert.equal(live.seen.errors.length, 1);
}));
