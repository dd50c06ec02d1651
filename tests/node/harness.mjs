// Shared harness of the contract tests: real fanout replicas, a real redis-server and the
// stock socket.io-client, so that every test reads as the scenario it checks.
//
// A test wraps its body in `scenario(async (bed) => ...)`. The bed starts what the test asks
// for (`bed.redis()`, `bed.redisCluster()`, `bed.redisSentinel()`, `bed.database()`,
// `bed.replica()`, `bed.fleet(n)`, `bed.connect()`, `bed.haproxy()`, `bed.serve()`), prints
// the logs of its processes if the test fails, and stops everything (and removes its
// directories, drops its databases) when the test ends, pass or fail.
// Waiting is on a condition with a deadline (an event, a status), not on a sleep; proving
// that something did not arrive uses `marker()`. The few timed waits left are part of their
// scenario (token expiry) or documented where no marker can exist.

import { spawn } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import jwt from "jsonwebtoken";
import pg from "pg";
import { io } from "socket.io-client";

const here = path.dirname(fileURLToPath(import.meta.url));

/** The fanout binary under test: `FANOUT_BIN`, or the debug build of this repository. */
export const FANOUT_BIN = process.env.FANOUT_BIN ?? path.resolve(here, "../../target/debug/fanout");
/** `redis-server` from PATH, unless `REDIS_SERVER` names another. */
export const REDIS_SERVER = process.env.REDIS_SERVER ?? "redis-server";
/**
 * `redis-cli` (to create a Redis Cluster): `REDIS_CLI`, else the one next to `REDIS_SERVER`
 * when that names a file, else from PATH.
 */
export const REDIS_CLI =
  process.env.REDIS_CLI ??
  (REDIS_SERVER.includes(path.sep) && existsSync(path.join(path.dirname(REDIS_SERVER), "redis-cli"))
    ? path.join(path.dirname(REDIS_SERVER), "redis-cli")
    : "redis-cli");
/** `haproxy` from PATH, unless `HAPROXY` names another. */
export const HAPROXY = process.env.HAPROXY ?? "haproxy";
/** The load balancer configuration of the compose demo, which `bed.haproxy()` runs. */
export const HAPROXY_CONFIG = path.resolve(here, "../../examples/compose/haproxy.cfg");

export const SECRET = "fanout-contract-tests-secret-0123456789";
export const INGEST_KEYS = ["ingest-key-current", "ingest-key-next"];

/**
 * The PostgreSQL server on which each scenario that asks for one creates its own database:
 * `FANOUT_TEST_DATABASE_URL` (its maintenance database), as for the Rust tests.
 */
export const DATABASE_SERVER =
  process.env.FANOUT_TEST_DATABASE_URL?.trim() || "postgres://postgres@127.0.0.1:5432/postgres";

/** Default deadline of every await on the server, generous for a loaded 2-core machine. */
export const WAIT_MS = 8000;

// ---------------------------------------------------------------------------------------
// Small utilities

export const nowSeconds = () => Math.floor(Date.now() / 1000);

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves `promise`, or rejects after `ms` with `what` in the message. */
export function deadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `check` (sync or async) until it returns a truthy value, which is returned. */
export async function until(check, { timeout = WAIT_MS, every = 20, what = "a condition" } = {}) {
  const end = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${timeout}ms waiting for ${what}`);
    await delay(every);
  }
}

const handedOut = new Set();

/** A TCP port that was free a moment ago (bound to port 0, then released). */
export async function freePort() {
  for (;;) {
    const port = await new Promise((resolve, reject) => {
      const srv = net.createServer();
      srv.unref();
      srv.on("error", reject);
      srv.listen(0, "127.0.0.1", () => {
        const { port } = srv.address();
        srv.close(() => resolve(port));
      });
    });
    // Never hand the same port to two processes of this run.
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tokens

/**
 * An HS256 token signed with the replicas' secret. `role` and `exp` (10 minutes) are filled
 * in unless given; a claim set to `undefined` is left out of the token.
 */
export function token(claims, { secret = SECRET, algorithm = "HS256" } = {}) {
  const body = { role: "viewer", exp: nowSeconds() + 600, ...claims };
  for (const [k, v] of Object.entries(body)) if (v === undefined) delete body[k];
  return jwt.sign(body, secret, { algorithm, noTimestamp: true });
}

/** An unsigned `alg: none` token. */
export function unsignedToken(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = { role: "viewer", exp: nowSeconds() + 600, ...claims };
  return `${b64({ alg: "none", typ: "JWT" })}.${b64(body)}.`;
}

// ---------------------------------------------------------------------------------------
// Child processes

const live = new Set();
// Last resort if the test process dies without running its cleanup: no orphans.
process.on("exit", () => {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch {}
  }
});

/** A child process whose output is kept for the failure report. */
class Proc {
  constructor(name, command, args, env) {
    this.name = name;
    this.output = [];
    this.child = spawn(command, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    live.add(this.child);
    const keep = (stream) => {
      let partial = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk) => {
        const lines = (partial + chunk).split("\n");
        partial = lines.pop();
        this.output.push(...lines);
      });
      stream.on("end", () => partial && this.output.push(partial));
    };
    keep(this.child.stdout);
    keep(this.child.stderr);
    this.exit = null;
    this.exited = new Promise((resolve) => {
      this.child.on("error", (err) => {
        this.output.push(`(could not start ${command}: ${err.message})`);
        this.exit = { code: null, signal: null, error: err };
        live.delete(this.child);
        resolve(this.exit);
      });
      this.child.on("exit", (code, signal) => {
        this.exit = { code, signal };
        live.delete(this.child);
        resolve(this.exit);
      });
    });
  }

  get running() {
    return this.exit === null;
  }

  signal(sig) {
    if (this.running) this.child.kill(sig);
  }

  async stop() {
    if (this.running) {
      this.child.kill("SIGKILL");
      await this.exited;
    }
  }

  log() {
    return this.output.map((l) => `  [${this.name}] ${l}`).join("\n");
  }
}

// ---------------------------------------------------------------------------------------
// redis-server

/** Parses one RESP reply at `at`: `[value, next offset]`, or `null` until it is complete. */
function parseReply(buf, at = 0) {
  const end = buf.indexOf("\r\n", at);
  if (end < 0) return null;
  const line = buf.subarray(at + 1, end).toString();
  const after = end + 2;
  switch (buf[at]) {
    case 0x2b: // +
      return [line, after];
    case 0x2d: // -
      return [new Error(`redis: ${line}`), after];
    case 0x3a: // :
      return [Number(line), after];
    case 0x24: { // $
      const len = Number(line);
      if (len < 0) return [null, after];
      if (buf.length < after + len + 2) return null;
      return [buf.subarray(after, after + len).toString(), after + len + 2];
    }
    case 0x2a: { // *
      const items = [];
      let next = after;
      for (let i = 0; i < Number(line); i++) {
        const item = parseReply(buf, next);
        if (!item) return null;
        items.push(item[0]);
        next = item[1];
      }
      return [items, next];
    }
    default:
      return [new Error(`redis: unexpected reply ${JSON.stringify(buf.toString())}`), buf.length];
  }
}

/**
 * Sends one command over a fresh connection and resolves to its reply; rejects if the
 * connection fails, closes before the reply or stays silent for 3 s (a server killed or
 * frozen mid-command must not hang the test until the scenario's deadline).
 */
export function redisCommand(port, ...args) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, "127.0.0.1");
    let buf = Buffer.alloc(0);
    sock.setTimeout(3000, () => sock.destroy(new Error(`redis ${port}: no reply to ${args[0]} within 3 s`)));
    sock.on("error", reject);
    // After a reply this is a no-op: a settled promise stays settled.
    sock.on("close", () => reject(new Error(`redis ${port}: connection closed before the reply to ${args[0]}`)));
    sock.on("connect", () => {
      const parts = [Buffer.from(`*${args.length}\r\n`)];
      for (const a of args) {
        const b = Buffer.from(String(a));
        parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from("\r\n"));
      }
      sock.write(Buffer.concat(parts));
    });
    sock.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      const reply = parseReply(buf);
      if (!reply) return;
      sock.end();
      if (reply[0] instanceof Error) reject(reply[0]);
      else resolve(reply[0]);
    });
  });
}

export class Redis {
  constructor(port, proc) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}`;
    this.proc = proc;
  }

  /** Kills the server (SIGKILL): an outage, as the replicas see it. */
  stop() {
    return this.proc.stop();
  }

  /** `PUBLISH channel message`; resolves to the number of subscribers that got it. */
  publish(channel, message) {
    return redisCommand(this.port, "PUBLISH", channel, typeof message === "string" ? message : JSON.stringify(message));
  }

  /** Number of subscribers of `channel` (`PUBSUB NUMSUB`). */
  async subscribers(channel) {
    const [, count] = await redisCommand(this.port, "PUBSUB", "NUMSUB", channel);
    return count;
  }
}

// ---------------------------------------------------------------------------------------
// Redis Cluster and Redis Sentinel

/** The `field:value` lines of an answer such as INFO's, as an object. */
function fieldsOf(text) {
  const fields = {};
  for (const line of text.split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon > 0 && !line.startsWith("#")) fields[line.slice(0, colon)] = line.slice(colon + 1);
  }
  return fields;
}

/** `INFO section` of the server on `port`, as an object of its fields. */
export async function redisInfo(port, section) {
  return fieldsOf(await redisCommand(port, "INFO", section));
}

/** A payload as Redis takes it: strings as they are, anything else as JSON. */
const wire = (payload) => (typeof payload === "string" ? payload : JSON.stringify(payload));

/**
 * Polls `check` like `until`, for a multi-step condition: `check` returns `{ value }` when it
 * holds, or a sentence saying what is missing, which the timeout's error quotes (a failing
 * settle then says what never settled). A rejection counts as "missing", with its message.
 */
async function settle(check, { timeout = WAIT_MS, what }) {
  let missing = "nothing checked yet";
  try {
    const { value } = await until(
      async () => {
        const got = await check().catch((err) => err.message);
        if (typeof got !== "string") return got;
        missing = got;
        return null;
      },
      { timeout, every: 50, what },
    );
    return value;
  } catch (err) {
    throw new Error(`${err.message}; last seen: ${missing}`);
  }
}

/** The one value `of(view)` that every view gives, or a sentence saying who disagrees. */
function agreed(views, of, what) {
  const values = views.map((v) => [v.port, of(v)]);
  const first = JSON.stringify(values[0]?.[1]);
  const other = values.find(([, v]) => JSON.stringify(v) !== first);
  if (other) return `nodes ${values[0][0]} and ${other[0]} disagree on ${what}: ${first} / ${JSON.stringify(other[1])}`;
  return { value: values[0]?.[1] };
}

/** The master owning `slot` in a node's view (see `RedisCluster#views`), or null. */
const ownerIn = (view, slot) => view.ranges.find((r) => r.from <= slot && slot <= r.to)?.master ?? null;

/** The number of hash slots of a Redis Cluster. */
export const CLUSTER_SLOTS = 16384;

/**
 * A private Redis Cluster of one scenario (`Testbed.redisCluster`): `masters` masters with
 * `replicas` replicas each, on free loopback ports, without persistence. `seedUrls` is a
 * `REDIS_CLUSTER_URLS` (every node); `bed.replica({ cluster })` sets it.
 */
export class RedisCluster {
  constructor(nodes, { masters, replicas }) {
    /** `{ port, busPort, proc }` of every node, in the order they were started. */
    this.nodes = nodes;
    this.shape = { masters, replicas };
    this.ports = nodes.map((n) => n.port);
    this.urls = this.ports.map((p) => `redis://127.0.0.1:${p}`);
    this.seedUrls = this.urls.join(",");
  }

  /** The client ports of the nodes still running. */
  running() {
    return this.nodes.filter((n) => n.proc.running).map((n) => n.port);
  }

  /**
   * What each running node says: `cluster_state`, its role and replication link, the nodes
   * it suspects, and its slot map as `{ from, to, master, replicas }` (ports). The map comes
   * from `CLUSTER NODES`, not `CLUSTER SLOTS`: Redis 7.0 leaves out of the latter a replica
   * whose replication offset is still 0, which lasts until the master's first replication
   * PING, 10 s after it starts.
   */
  async #views() {
    return Promise.all(
      this.running().map(async (port) => {
        const [cluster, replication, table] = await Promise.all([
          redisCommand(port, "CLUSTER", "INFO").then(fieldsOf),
          redisInfo(port, "replication"),
          redisCommand(port, "CLUSTER", "NODES"),
        ]);
        // <id> <ip:port@bus> <flags> <master id|-> <ping> <pong> <epoch> <link> <slot>...
        const nodes = table.trim().split("\n").map((line) => {
          const [id, address, flags, master, , , , , ...slots] = line.trim().split(" ");
          return { id, port: Number(address.split("@")[0].split(":").pop()), flags: flags.split(","), master, slots };
        });
        const up = (n) => !n.flags.includes("fail") && !n.flags.includes("fail?");
        const ranges = [];
        for (const m of nodes.filter((n) => n.flags.includes("master"))) {
          const replicas = nodes.filter((n) => n.master === m.id && up(n)).map((n) => n.port).sort((x, y) => x - y);
          // Slots being imported or migrated show as `[slot->-id]`: not owned yet or still owned.
          for (const range of m.slots.filter((r) => !r.startsWith("["))) {
            const [from, to = from] = range.split("-").map(Number);
            ranges.push({ from, to, master: m.port, replicas });
          }
        }
        return {
          port,
          ok: cluster.cluster_state === "ok",
          replica: replication.role === "slave",
          linkUp: replication.master_link_status === "up",
          suspects: nodes.filter((n) => !up(n) || n.flags.includes("handshake")).map((n) => n.port),
          ranges: ranges.sort((x, y) => x.from - y.from),
        };
      }),
    );
  }

  /**
   * `{ value: the slot map }` once the cluster has settled: every running node says
   * `cluster_state:ok`, sees all 16384 slots on `masters` masters with `replicas` replicas
   * each, agrees with the others on that map, suspects no running node, and every replica's
   * link is up. Else what is missing.
   */
  async settled() {
    const views = await this.#views();
    for (const v of views) {
      if (!v.ok) return `node ${v.port}: cluster_state is not ok`;
      const covered = v.ranges.reduce((n, r) => n + r.to - r.from + 1, 0);
      if (covered !== CLUSTER_SLOTS) return `node ${v.port} sees ${covered} slots covered`;
      if (v.replica && !v.linkUp) return `replica ${v.port}: its master link is down`;
      const suspected = v.suspects.filter((p) => this.running().includes(p));
      if (suspected.length) return `node ${v.port} suspects (or is still meeting) ${JSON.stringify(suspected)}`;
    }
    const map = agreed(views, (v) => v.ranges, "the slot map");
    if (typeof map === "string") return map;
    const masters = new Set(map.value.map((r) => r.master));
    if (masters.size !== this.shape.masters) return `the slots are on ${masters.size} masters, not ${this.shape.masters}`;
    const short = map.value.find((r) => r.replicas.length !== this.shape.replicas);
    if (short) return `slots ${short.from}-${short.to} on ${short.master} have replicas ${JSON.stringify(short.replicas)}`;
    return map;
  }

  /** The ports of the masters, sorted, as the running nodes agree. */
  async masters() {
    const ranges = await settle(
      async () => agreed(await this.#views(), (v) => v.ranges, "the slot map"),
      { what: "the Redis Cluster nodes to agree on the slot map" },
    );
    return [...new Set(ranges.map((r) => r.master))].sort((x, y) => x - y);
  }

  /** The hash slot of `key` (a channel's slot is computed the same way): `CLUSTER KEYSLOT`. */
  keyslot(key) {
    return redisCommand(this.running()[0], "CLUSTER", "KEYSLOT", key);
  }

  /** The port of the master that owns `channel`'s slot, as the running nodes agree. */
  async slotOwnerPort(channel) {
    const slot = await this.keyslot(channel);
    return this.#ownerOf(slot, `${channel} (slot ${slot})`);
  }

  /** The port of the master that owns `slot` (`name` in a timeout's message), as the running nodes agree. */
  #ownerOf(slot, name = `slot ${slot}`) {
    return settle(
      async () => agreed(await this.#views(), (v) => ownerIn(v, slot), `the owner of slot ${slot}`),
      { what: `the Redis Cluster nodes to agree on the owner of ${name}` },
    );
  }

  /**
   * Moves `slot` (and its keys, if any) from its owner to another master, the one on
   * `toPort`, the way `redis-cli --cluster reshard` does: `IMPORTING` at the target,
   * `MIGRATING` at the owner, the keys moved, then `SETSLOT NODE` at the target (it takes
   * the slot and bumps its epoch), at the old owner (it stops serving the slot and sends
   * `sunsubscribe` to the slot's shard subscribers) and at the other masters (gossip tells
   * the replicas). Resolves to the old owner's port once every running node says
   * `cluster_state:ok` and sees `toPort` own the slot.
   */
  async migrateSlot(slot, toPort) {
    const masters = await this.masters();
    if (!masters.includes(toPort) || !this.running().includes(toPort)) {
      throw new Error(`migrateSlot: ${toPort} is not a running master of the Redis Cluster`);
    }
    const fromPort = await this.#ownerOf(slot);
    if (fromPort === toPort) throw new Error(`migrateSlot: ${toPort} owns slot ${slot} already`);
    const [fromId, toId] = await Promise.all([fromPort, toPort].map((p) => redisCommand(p, "CLUSTER", "MYID")));
    await redisCommand(toPort, "CLUSTER", "SETSLOT", slot, "IMPORTING", fromId);
    await redisCommand(fromPort, "CLUSTER", "SETSLOT", slot, "MIGRATING", toId);
    for (;;) {
      const keys = await redisCommand(fromPort, "CLUSTER", "GETKEYSINSLOT", slot, 100);
      if (keys.length === 0) break;
      await redisCommand(fromPort, "MIGRATE", "127.0.0.1", toPort, "", 0, 5000, "REPLACE", "KEYS", ...keys);
    }
    for (const port of [toPort, fromPort, ...masters.filter((p) => p !== fromPort && p !== toPort)]) {
      await redisCommand(port, "CLUSTER", "SETSLOT", slot, "NODE", toId);
    }
    await this.#settleOwner(slot, (port) => port === toPort, `every Redis Cluster node to see slot ${slot} on ${toPort}`);
    return fromPort;
  }

  /**
   * Kills the master on `port` with SIGKILL (a crash) and resolves once it is gone. Its
   * replica takes over when the other masters agree that it failed: see `waitFailover`.
   */
  async killMaster(port) {
    const node = this.nodes.find((n) => n.port === port);
    if (!node?.proc.running || !(await this.masters()).includes(port)) {
      throw new Error(`killMaster: ${port} is not a running master of the Redis Cluster`);
    }
    await node.proc.stop();
  }

  /**
   * Waits until every running node says `cluster_state:ok` and they agree that a running
   * node other than `oldPort` owns `slot` (2 to 3 s after a kill, with
   * `--cluster-node-timeout 1000`); resolves to its port. (The cluster does not settle in
   * the sense of `settled()` any more: the promoted replica has no replica of its own.)
   */
  waitFailover(slot, oldPort, timeout = 20_000) {
    return this.#settleOwner(
      slot,
      (port) => port !== oldPort && this.running().includes(port),
      `a failover of slot ${slot} away from ${oldPort}`,
      timeout,
    );
  }

  /**
   * Waits until every running node says `cluster_state:ok`, they agree on the owner of
   * `slot`, and `wanted(owner)` holds; resolves to the owner's port.
   */
  #settleOwner(slot, wanted, what, timeout = 20_000) {
    return settle(
      async () => {
        const views = await this.#views();
        const down = views.find((v) => !v.ok);
        if (down) return `node ${down.port}: cluster_state is not ok`;
        const owner = agreed(views, (v) => ownerIn(v, slot), `the owner of slot ${slot}`);
        if (typeof owner === "string") return owner;
        return wanted(owner.value) ? owner : `slot ${slot} is still on ${owner.value}`;
      },
      { timeout, what },
    );
  }

  /**
   * `SPUBLISH channel payload` at the master owning `channel` (a worker's direct publish);
   * resolves to the number of that master's subscribers that got it. `payload`: a string,
   * or anything else as JSON.
   */
  async spublish(channel, payload) {
    return settle(
      async () => {
        const port = await this.slotOwnerPort(channel);
        // MOVED (the slot changed hands meanwhile) is answered as an error: ask again.
        return { value: await redisCommand(port, "SPUBLISH", channel, wire(payload)) };
      },
      { what: `SPUBLISH ${channel} at its owner` },
    );
  }

  /** How many connections of the owning master subscribe to `channel` (`PUBSUB SHARDNUMSUB`). */
  async shardSubscribers(channel) {
    const [, count] = await redisCommand(await this.slotOwnerPort(channel), "PUBSUB", "SHARDNUMSUB", channel);
    return count;
  }
}

/** The entries of `SENTINEL REPLICAS|SENTINELS <name>`, each as an object of its fields. */
async function sentinelTable(port, what, name) {
  const rows = await redisCommand(port, "SENTINEL", what, name);
  return rows.map((flat) => {
    const entry = {};
    for (let i = 0; i + 1 < flat.length; i += 2) entry[flat[i]] = flat[i + 1];
    return entry;
  });
}

/** Neither down (subjectively or objectively) nor disconnected, as a sentinel sees it. */
const healthy = (entry) => !/(^|,)(s_down|o_down|disconnected)(,|$)/.test(entry.flags ?? "");

/**
 * A private Redis Sentinel group of one scenario (`Testbed.redisSentinel`): a master, its
 * replica and three sentinels monitoring it as `masterName` (quorum 2). `sentinelUrls` is a
 * `REDIS_SENTINEL_URLS`; `bed.replica({ sentinel })` sets it and `REDIS_SENTINEL_MASTER`.
 */
export class RedisSentinel {
  constructor(masterName, nodes, sentinels) {
    this.masterName = masterName;
    /** `{ port, proc }` of the data nodes (the first master, then its replica). */
    this.nodes = nodes;
    /** `{ port, proc }` of the sentinels. */
    this.sentinels = sentinels;
    this.sentinelPorts = sentinels.map((s) => s.port);
    this.sentinelUrls = this.sentinelPorts.map((p) => `redis://127.0.0.1:${p}`).join(",");
  }

  #running(list) {
    return list.filter((n) => n.proc.running).map((n) => n.port);
  }

  /** `{ value: port }` of the master if every running sentinel names the same one, else why not. */
  async #namedMaster() {
    const named = await Promise.all(
      this.#running(this.sentinels).map(async (s) => [
        s,
        await redisCommand(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", this.masterName),
      ]),
    );
    if (named.length === 0) return "no sentinel runs";
    const missing = named.find(([, addr]) => !addr);
    if (missing) return `sentinel ${missing[0]} does not know ${this.masterName}`;
    const differs = named.find(([, addr]) => addr[1] !== named[0][1][1]);
    if (differs) return `sentinels ${named[0][0]} and ${differs[0]} name ${named[0][1][1]} and ${differs[1][1]}`;
    return { value: Number(named[0][1][1]) };
  }

  /**
   * `{ value: master port }` once the group has settled, else what is missing: the
   * sentinels agree on a running master that says `role:master`; every other running data
   * node is its replica with the link up; every sentinel knows those replicas and the other
   * sentinels, none down or disconnected. Short of that, a failover could not be authorised
   * (quorum, leader election) or would have no replica to promote.
   */
  async settled() {
    const named = await this.#namedMaster();
    if (typeof named === "string") return named;
    const master = named.value;
    const running = this.#running(this.nodes);
    if (!running.includes(master)) return `the sentinels name ${master}, which is not running`;
    const role = (await redisInfo(master, "replication")).role;
    if (role !== "master") return `${master}, named by the sentinels, says role:${role}`;
    const replicas = running.filter((p) => p !== master);
    for (const port of replicas) {
      const r = await redisInfo(port, "replication");
      if (r.role !== "slave" || Number(r.master_port) !== master || r.master_link_status !== "up") {
        return `${port} is not an up-to-date replica of ${master}: role:${r.role} master_port:${r.master_port} link:${r.master_link_status}`;
      }
    }
    const sentinels = this.#running(this.sentinels);
    for (const s of sentinels) {
      const known = await sentinelTable(s, "REPLICAS", this.masterName);
      for (const port of replicas) {
        const entry = known.find((e) => Number(e.port) === port);
        if (!entry || !healthy(entry)) return `sentinel ${s} sees replica ${port} as ${entry?.flags ?? "unknown"}`;
      }
      const peers = (await sentinelTable(s, "SENTINELS", this.masterName)).filter(healthy).map((e) => Number(e.port));
      const others = sentinels.filter((p) => p !== s);
      if (others.some((p) => !peers.includes(p))) return `sentinel ${s} sees sentinels ${JSON.stringify(peers)} up, not ${JSON.stringify(others)}`;
    }
    return { value: master };
  }

  /** The port of the master, as the sentinels agree (right after a kill: the dead one, until the failover). */
  masterPort() {
    return settle(() => this.#namedMaster(), { what: `the sentinels to agree on ${this.masterName}` });
  }

  /** Kills the current master with SIGKILL (a crash) and resolves to its port once it is gone. */
  async killMaster() {
    const port = await this.masterPort();
    const node = this.nodes.find((n) => n.port === port);
    if (!node?.proc.running) throw new Error(`killMaster: the master the sentinels name, ${port}, is not running`);
    await node.proc.stop();
    return port;
  }

  /**
   * Waits until the sentinels agree on a master other than `oldPort` and the group has
   * settled around it (2 to 3 s after a kill); resolves to its port.
   */
  waitFailover(oldPort, timeout = 20_000) {
    return settle(
      async () => {
        const settled = await this.settled();
        if (typeof settled === "string") return settled;
        return settled.value === oldPort ? `the sentinels still name ${oldPort}` : settled;
      },
      { timeout, what: `a Sentinel failover away from ${oldPort}` },
    );
  }

  /**
   * `PUBLISH channel payload` at the master the sentinels name (a worker's direct publish);
   * resolves to the number of the master's subscribers that got it (a replica's own
   * subscribers get it too, uncounted). `payload`: a string, or anything else as JSON.
   */
  async publish(channel, payload) {
    return settle(
      async () => {
        const named = await this.#namedMaster();
        if (typeof named === "string") return named;
        return { value: await redisCommand(named.value, "PUBLISH", channel, wire(payload)) };
      },
      { what: `PUBLISH ${channel} at the master` },
    );
  }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/** `url` with its database replaced by `name` (query parameters kept). */
function withDatabase(url, name) {
  const [base, query] = url.includes("?") ? [url.slice(0, url.indexOf("?")), url.slice(url.indexOf("?"))] : [url, ""];
  const authority = base.includes("://") ? base.indexOf("://") + 3 : 0;
  const slash = base.indexOf("/", authority);
  return `${slash < 0 ? base : base.slice(0, slash)}/${name}${query}`;
}

/** Runs one statement on the database of `url`; resolves to its rows. */
async function query(url, sql, params = []) {
  const client = new pg.Client({ connectionString: url });
  // An error after connecting (the server going away) must not crash the test process.
  client.on("error", () => {});
  try {
    await client.connect();
  } catch (err) {
    throw new Error(`cannot connect to the test PostgreSQL (set FANOUT_TEST_DATABASE_URL): ${err.message}`);
  }
  try {
    return (await client.query(sql, params)).rows;
  } finally {
    await client.end().catch(() => {});
  }
}

/** A database of one scenario: `url` is the `DATABASE_URL` of its replicas. */
export class Database {
  constructor(name) {
    this.name = name;
    this.url = withDatabase(DATABASE_SERVER, name);
  }

  /** Runs `sql` on this database (to look at or change what the replicas stored); resolves to the rows. */
  query(sql, params = []) {
    return query(this.url, sql, params);
  }

  drop() {
    return query(DATABASE_SERVER, `DROP DATABASE IF EXISTS ${this.name} WITH (FORCE)`);
  }
}

// ---------------------------------------------------------------------------------------
// fanout replicas

export class Replica {
  constructor(name, proc, publicPort, internalPort) {
    this.name = name;
    this.proc = proc;
    this.url = `http://127.0.0.1:${publicPort}`;
    this.internal = `http://127.0.0.1:${internalPort}`;
  }

  /** Status of `GET /readyz`, or `null` when nothing answers. */
  async readyz() {
    return (await this.readiness())?.status ?? null;
  }

  /** `{ status, body }` of `GET /readyz` (body parsed if JSON), or `null` when nothing answers. */
  async readiness() {
    try {
      const res = await fetch(`${this.internal}/readyz`, { signal: AbortSignal.timeout(2000) });
      const text = await res.text();
      let body = text;
      try {
        body = JSON.parse(text);
      } catch {}
      return { status: res.status, body };
    } catch {
      return null;
    }
  }

  /**
   * The sum of the samples of metric `name` (whatever their labels) on `GET /metrics`, or
   * `null` when nothing answers or the replica has no such sample yet (a counter appears
   * once it is first counted).
   */
  async metric(name) {
    let text;
    try {
      const res = await fetch(`${this.internal}/metrics`, { signal: AbortSignal.timeout(2000) });
      text = await res.text();
    } catch {
      return null;
    }
    const samples = [...text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "gm"))];
    return samples.length ? samples.reduce((sum, m) => sum + Number(m[1]), 0) : null;
  }

  /** POSTs `body` to the ingest API; resolves to `{ status, body }` (body parsed if JSON). */
  async post(route, body, { key = INGEST_KEYS[0], headers = {} } = {}) {
    const res = await fetch(`${this.internal}${route}`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        ...(key === null ? {} : { authorization: `Bearer ${key}` }),
        ...headers,
      },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed = text;
    try {
      parsed = JSON.parse(text);
    } catch {}
    return { status: res.status, body: parsed };
  }

  async #accepted(route, body) {
    const res = await this.post(route, body);
    if (res.status !== 200) {
      throw new Error(`${this.name} ${route} answered ${res.status} ${JSON.stringify(res.body)}`);
    }
    return res.body;
  }

  /** `POST /v1/publish { organizationId, event, data, userId? }`, which must answer 200. */
  publish(message) {
    return this.#accepted("/v1/publish", message);
  }

  /** `POST /executions/update`, which must answer 200. */
  update(body) {
    return this.#accepted("/executions/update", body);
  }

  /** `POST /executions/log`, which must answer 200. */
  log(body) {
    return this.#accepted("/executions/log", body);
  }
}

// ---------------------------------------------------------------------------------------
// Clients

/**
 * An http.Agent for a polling client that counts its long-poll GETs on the wire: handed to
 * the operating system, not answered yet. The stock client accepts an `agent` option; this
 * one changes nothing but what the test can observe.
 */
class PollWatcher extends http.Agent {
  constructor() {
    super();
    this.inFlight = 0;
    this.onChange = () => {};
  }

  addRequest(req, options) {
    if (req.method === "GET" && /[?&]transport=polling/.test(req.path) && /[?&]sid=/.test(req.path)) {
      let counted = false;
      req.on("finish", () => {
        counted = true;
        this.inFlight++;
        this.onChange();
      });
      const done = () => {
        if (!counted) return;
        counted = false;
        this.inFlight--;
        this.onChange();
      };
      req.on("response", done);
      req.on("close", done);
    }
    return super.addRequest(req, options);
  }
}

const LIFECYCLE = ["connect", "disconnect", "connect_error"];
/** What the client itself reports, as opposed to events the server emitted. */
const CLIENT_SIDE = new Set([...LIFECYCLE, "reconnect_attempt", "upgrade"]);

/**
 * A stock socket.io-client socket that records everything that happens to it, in order:
 * server events, its lifecycle (`connect`, `disconnect`, `connect_error`), the manager's
 * `reconnect_attempt` and the engine's `upgrade` (with the new transport's name).
 */
export class Client {
  constructor(name, socket, polls) {
    this.name = name;
    this.socket = socket;
    this.polls = polls;
    /** `{ name, args, at }` in arrival order. */
    this.log = [];
    this.cursor = new Map();
    this.waiters = new Set();
    socket.onAny((event, ...args) => this.#record(event, args));
    for (const event of LIFECYCLE) socket.on(event, (...args) => this.#record(event, args));
    socket.io.on("reconnect_attempt", (n) => this.#record("reconnect_attempt", [n]));
    socket.io.on("open", () => {
      socket.io.engine.on("upgrade", (transport) => this.#record("upgrade", [transport.name]));
    });
  }

  #record(name, args) {
    this.log.push({ name, args, at: Date.now() });
    this.notify();
  }

  /** Re-checks what is being waited for (after a change that is not an event). */
  notify() {
    for (const w of this.waiters) w();
  }

  /** Long-poll GETs on the wire (sent, not answered yet); needs `watchPolls` at connect. */
  get pollsInFlight() {
    return this.polls?.inFlight ?? 0;
  }

  /** Names of everything recorded, in order. */
  names() {
    return this.log.map((e) => e.name);
  }

  /** Names of the events the server emitted, in order. */
  serverEvents() {
    return this.log.filter((e) => !CLIENT_SIDE.has(e.name)).map((e) => e.name);
  }

  /** First argument of every `name` event so far. */
  all(name) {
    return this.log.filter((e) => e.name === name).map((e) => e.args[0]);
  }

  /**
   * The first argument of the next `name` event not yet returned by `next`, waiting for it
   * up to `timeout` ms.
   */
  async next(name, timeout = WAIT_MS) {
    const seen = this.cursor.get(name) ?? 0;
    const entry = await this.#wait(() => this.log.filter((e) => e.name === name)[seen], timeout, `"${name}" #${seen + 1}`);
    this.cursor.set(name, seen + 1);
    return entry.args[0];
  }

  /** Waits until `predicate(client)` holds. */
  async until(predicate, what, timeout = WAIT_MS) {
    return this.#wait(() => predicate(this), timeout, what);
  }

  /** Waits until some `name` event satisfies `match(data)`, and returns its data. */
  async find(name, match, timeout = WAIT_MS) {
    const entry = await this.#wait(
      () => this.log.find((e) => e.name === name && match(e.args[0])),
      timeout,
      `a matching "${name}"`,
    );
    return entry.args[0];
  }

  #wait(check, timeout, what) {
    const hit = check();
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const waiter = () => {
        const found = check();
        if (found) {
          cleanup();
          resolve(found);
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${this.name}: timed out after ${timeout}ms waiting for ${what}; got ${JSON.stringify(this.names())}`));
      }, timeout);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
      this.waiters.add(waiter);
    });
  }

  /** When the first `name` was recorded (ms since the epoch), or undefined. */
  timeOf(name) {
    return this.log.find((e) => e.name === name)?.at;
  }

  /** Waits for `auth-success` and returns its payload. */
  authenticated(timeout = WAIT_MS) {
    return this.next("auth-success", timeout);
  }

  /** Emits with an acknowledgement, which must come within `timeout`. */
  request(event, payload, timeout = WAIT_MS) {
    return this.socket.timeout(timeout).emitWithAck(event, payload);
  }

  /** The Engine.IO transport in use (`websocket` or `polling`). */
  get transport() {
    return this.socket.io.engine?.transport?.name;
  }

  close() {
    this.socket.disconnect();
    this.socket.io.engine?.close();
  }
}

/**
 * A request in progress on `replica`'s public port: a replica's drain waits for it, which
 * keeps the replica (and its internal port) up long enough to watch it drain. It is a
 * polling POST that sends its headers with `Expect: 100-continue` and never its body; the
 * "100 Continue" answer proves the replica has started handling it. `end()` lets it go.
 */
export async function straggler(replica) {
  const open = await fetch(`${replica.url}/socket.io/?EIO=4&transport=polling`).then((r) => r.text());
  const { sid } = JSON.parse(open.slice(1));
  const sock = net.connect(Number(new URL(replica.url).port), "127.0.0.1");
  sock.on("error", () => {});
  let answer = "";
  await deadline(
    new Promise((resolve) => {
      sock.on("data", (chunk) => {
        answer += chunk;
        if (answer.includes(" 100 ")) resolve();
      });
      sock.write(
        `POST /socket.io/?EIO=4&transport=polling&sid=${sid} HTTP/1.1\r\nHost: fanout\r\n` +
          "Content-Type: text/plain\r\nContent-Length: 16\r\nExpect: 100-continue\r\n\r\n",
      );
    }),
    8000,
    "100 Continue",
  );
  return { end: () => sock.destroy() };
}

// ---------------------------------------------------------------------------------------
// HAProxy

/**
 * The repository's HAProxy configuration with its addresses moved to this machine: each
 * `bind :PORT` to a free loopback port (`ports` maps the configured port to the new one),
 * each `server fanout-N fanout-N:3000|3001 ... check port 3001` to replica N's public or
 * internal port, and `server dashboard worker-sim:PORT ...` (the dashboard's static files)
 * to `dashboard`, a loopback port. Nothing else changes; a line of another shape, or a
 * replica the file does not name, is an error, so the test never runs a configuration
 * other than the one shipped.
 */
export function localHaproxyConfig(text, replicas, ports, dashboard) {
  const portOf = (replica, configured) => {
    const url = configured === 3000 ? replica.url : configured === 3001 ? replica.internal : null;
    if (!url) throw new Error(`haproxy.cfg: a server on port ${configured}, neither 3000 nor 3001`);
    return new URL(url).port;
  };
  const named = new Set();
  const out = text.split("\n").map((line) => {
    const bind = line.match(/^(\s*bind\s+):(\d+)(\s.*)?$/);
    if (bind) {
      const port = ports[bind[2]];
      if (!port) throw new Error(`haproxy.cfg: no port given for \`bind :${bind[2]}\``);
      return `${bind[1]}127.0.0.1:${port}${bind[3] ?? ""}`;
    }
    if (/^\s*bind\s/.test(line)) throw new Error(`haproxy.cfg: unexpected bind line: ${line.trim()}`);
    const server = line.match(/^(\s*server\s+fanout-(\d+)\s+)fanout-(\d+):(\d+)(.*)$/);
    if (server) {
      const [, head, n, host, port, rest] = server;
      const replica = replicas[Number(n) - 1];
      if (host !== n || !replica) throw new Error(`haproxy.cfg: server fanout-${n} has no replica here: ${line.trim()}`);
      named.add(Number(n));
      const check = rest.replace(/\bport 3001\b/, `port ${portOf(replica, 3001)}`);
      return `${head}127.0.0.1:${portOf(replica, Number(port))}${check}`;
    }
    const statics = line.match(/^(\s*server\s+dashboard\s+)worker-sim:\d+(\s.*)?$/);
    if (statics) return `${statics[1]}127.0.0.1:${dashboard}${statics[2] ?? ""}`;
    if (/^\s*server\s/.test(line)) throw new Error(`haproxy.cfg: unexpected server line: ${line.trim()}`);
    return line;
  });
  if (named.size !== replicas.length) {
    throw new Error(`haproxy.cfg names ${named.size} replicas, the test runs ${replicas.length}`);
  }
  return out.join("\n");
}

/** Rows of HAProxy's stats CSV (`/stats;csv`), as objects keyed by the header's names. */
function statsRows(csv) {
  const [header, ...lines] = csv.trim().split("\n");
  const names = header.replace(/^# /, "").split(",");
  return lines.map((line) => Object.fromEntries(line.split(",").map((v, i) => [names[i], v])));
}

/** HAProxy running the compose demo's configuration, on loopback: see `Testbed.haproxy`. */
export class Haproxy {
  constructor(proc, ports) {
    this.name = "haproxy";
    this.proc = proc;
    /** Dashboards connect here (frontend public), like to a replica. */
    this.url = `http://127.0.0.1:${ports.public}`;
    /** Workers publish here (frontend ingest). */
    this.ingest = `http://127.0.0.1:${ports.ingest}`;
    this.stats = `http://127.0.0.1:${ports.stats}`;
  }

  /**
   * `{ status, check }` of every server of `backend` (default `fanout`) by name, e.g.
   * `{ "fanout-1": { status: "UP", check: "L7OK" } }`.
   */
  async servers(backend = "fanout") {
    const csv = await (await fetch(`${this.stats}/stats;csv`, { signal: AbortSignal.timeout(2000) })).text();
    const servers = {};
    for (const row of statsRows(csv)) {
      if (row.pxname === backend && !["FRONTEND", "BACKEND"].includes(row.svname)) {
        servers[row.svname] = { status: row.status, check: row.check_status };
      }
    }
    return servers;
  }

  /** POSTs `body` to the ingest frontend with an ingest key; resolves to `{ status, body }`. */
  async post(route, body) {
    const res = await fetch(`${this.ingest}${route}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${INGEST_KEYS[0]}` },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    let parsed = text;
    try {
      parsed = JSON.parse(text);
    } catch {}
    return { status: res.status, body: parsed };
  }
}

// ---------------------------------------------------------------------------------------
// The test bed

/**
 * Base environment of a replica: nothing inherited but PATH, so ambient settings don't leak
 * in. Its bus: `redis` (REDIS_URL), `cluster` (REDIS_CLUSTER_URLS), `sentinel`
 * (REDIS_SENTINEL_URLS and REDIS_SENTINEL_MASTER), else the in-process one. FANOUT_BUS is set
 * only for the last: fanout refuses two buses at once.
 */
function replicaEnv({ publicPort, internalPort, redis, cluster, sentinel, database, env }) {
  if ([redis, cluster, sentinel].filter(Boolean).length > 1) {
    throw new Error("a replica has one bus: give at most one of redis, cluster and sentinel");
  }
  const base = {
    PATH: process.env.PATH,
    NO_COLOR: "1",
    RUST_LOG: process.env.FANOUT_TEST_LOG ?? "info,fanout=debug",
    FANOUT_LISTEN: `127.0.0.1:${publicPort}`,
    FANOUT_INTERNAL_LISTEN: `127.0.0.1:${internalPort}`,
    JWT_SECRET: SECRET,
    FANOUT_INGEST_KEYS: INGEST_KEYS.join(","),
    FANOUT_SHUTDOWN_TIMEOUT: "5s",
  };
  if (redis) base.REDIS_URL = redis.url;
  else if (cluster) base.REDIS_CLUSTER_URLS = cluster.seedUrls;
  else if (sentinel) {
    base.REDIS_SENTINEL_URLS = sentinel.sentinelUrls;
    base.REDIS_SENTINEL_MASTER = sentinel.masterName;
  } else base.FANOUT_BUS = "memory";
  if (database) base.DATABASE_URL = database.url;
  return { ...base, ...env };
}

export class Testbed {
  constructor() {
    this.procs = [];
    this.clients = [];
    this.servers = [];
    this.databases = [];
    this.dirs = [];
    this.count = { replica: 0, client: 0 };
  }

  /**
   * Creates an empty database `fanout_node_<random>` on the test PostgreSQL server, dropped
   * (with its connections) when the scenario ends. Pass it to `replica({ database })`.
   */
  async database() {
    const db = new Database(`fanout_node_${randomBytes(8).toString("hex")}`);
    await query(DATABASE_SERVER, `CREATE DATABASE ${db.name}`);
    this.databases.push(db);
    return db;
  }

  /**
   * Starts a redis-server of this test (never the shared 6379), ready for commands; on
   * `port` if given (to bring a stopped one back), else on a free port.
   */
  async redis({ port: wanted } = {}) {
    for (let attempt = 1; ; attempt++) {
      const port = wanted ?? (await freePort());
      const proc = this.#spawn(`redis:${port}`, REDIS_SERVER, [
        "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
      ], { PATH: process.env.PATH });
      try {
        await until(
          async () => {
            if (!proc.running) throw new Error(`redis-server exited: ${JSON.stringify(proc.exit)}`);
            return (await redisCommand(port, "PING").catch(() => null)) === "PONG";
          },
          { what: `redis-server on ${port}` },
        );
        return new Redis(port, proc);
      } catch (err) {
        await proc.stop();
        if (wanted !== undefined || attempt >= 3) throw err;
      }
    }
  }

  /**
   * Starts a Redis Cluster of this test: `masters` masters (at least 3) with `replicas`
   * replicas each, every node on two free ports (clients; the cluster bus, given with
   * `--cluster-port`, since client port + 10000 could be anybody's), in a directory of its
   * own, joined with `redis-cli --cluster create`. Resolves to a `RedisCluster` once it has
   * settled (every node `cluster_state:ok`, all agreeing on the slot map): about 2 s.
   */
  async redisCluster({ masters = 3, replicas = 0 } = {}) {
    if (masters < 3) throw new Error("redisCluster: redis-cli --cluster create needs at least 3 masters");
    const dir = await this.#tempDir("fanout-redis-cluster-");
    const nodes = await Promise.all(
      Array.from({ length: masters * (1 + replicas) }, () =>
        this.#onFreePorts(2, async ([port, busPort]) => {
          const own = path.join(dir, `node-${port}`);
          await mkdir(own);
          const proc = await this.#redisProcess(`redis-cluster:${port}`, port, [
            "--port", String(port), "--bind", "127.0.0.1", "--protected-mode", "no",
            "--save", "", "--appendonly", "no", "--dir", own,
            "--cluster-enabled", "yes", "--cluster-config-file", path.join(own, "nodes.conf"),
            "--cluster-port", String(busPort), "--cluster-node-timeout", "1000",
            // A replica's first sync starts at once, not after the default 5 s.
            "--repl-diskless-sync-delay", "0",
          ]);
          return { port, busPort, proc };
        }),
      ),
    );
    const create = this.#spawn("redis-cli --cluster create", REDIS_CLI, [
      "--cluster", "create", ...nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas", String(replicas), "--cluster-yes",
    ], { PATH: process.env.PATH });
    const exit = await deadline(create.exited, 30_000, "redis-cli --cluster create");
    if (exit.error) throw new Error(`cannot run ${REDIS_CLI} (${exit.error.code}): install redis-tools or set REDIS_CLI`);
    if (exit.code !== 0) throw new Error(`redis-cli --cluster create failed (${JSON.stringify(exit)}):\n${create.log()}`);
    const cluster = new RedisCluster(nodes, { masters, replicas });
    // The tool returns once the nodes agree on the configuration; gossip still has to reach
    // cluster_state:ok everywhere (and replicas to sync) before a client can rely on it.
    await settle(() => cluster.settled(), { timeout: 20_000, what: "the new Redis Cluster to settle" });
    return cluster;
  }

  /**
   * Starts a Redis Sentinel group of this test on free ports: a master, its replica, and
   * three sentinels monitoring it as `masterName` with quorum 2, `down-after-milliseconds
   * 1000` and `failover-timeout 3000`, announcing 127.0.0.1 and resolving no host names (what
   * they name is an address a test can connect to); each sentinel has its own writable
   * sentinel.conf (Sentinel rewrites it, and will not start without one). Resolves to a
   * `RedisSentinel` once the group has settled, which takes about 2 s (the sentinels find
   * each other by hello messages, sent every 2 s).
   */
  async redisSentinel({ masterName = "fanout-master" } = {}) {
    const dir = await this.#tempDir("fanout-redis-sentinel-");
    const dataNode = (replicaOf) =>
      this.#onFreePorts(1, async ([port]) => {
        const own = path.join(dir, `node-${port}`);
        await mkdir(own);
        const args = [
          "--port", String(port), "--bind", "127.0.0.1", "--protected-mode", "no",
          "--save", "", "--appendonly", "no", "--dir", own, "--repl-diskless-sync-delay", "0",
        ];
        if (replicaOf) args.push("--replicaof", "127.0.0.1", String(replicaOf));
        return { port, proc: await this.#redisProcess(`sentinel-node:${port}`, port, args) };
      });
    const master = await dataNode();
    const replica = await dataNode(master.port);
    // A sentinel learns the replicas from the master's INFO, asked at once and then every
    // 10 s: the replica must be attached before the sentinels start, or it is found late.
    await until(
      async () => (await redisInfo(replica.port, "replication").catch(() => ({}))).master_link_status === "up",
      { what: `replica ${replica.port} to sync with master ${master.port}` },
    );
    const sentinels = await Promise.all(
      [1, 2, 3].map(() =>
        this.#onFreePorts(1, async ([port]) => {
          const own = path.join(dir, `sentinel-${port}`);
          await mkdir(own);
          const conf = path.join(own, "sentinel.conf");
          await writeFile(conf, [
            `port ${port}`,
            "bind 127.0.0.1",
            "protected-mode no",
            `dir "${own}"`,
            "sentinel resolve-hostnames no",
            "sentinel announce-ip 127.0.0.1",
            `sentinel monitor ${masterName} 127.0.0.1 ${master.port} 2`,
            `sentinel down-after-milliseconds ${masterName} 1000`,
            `sentinel failover-timeout ${masterName} 3000`,
            `sentinel parallel-syncs ${masterName} 1`,
            "",
          ].join("\n"));
          return { port, proc: await this.#redisProcess(`sentinel:${port}`, port, [conf, "--sentinel"]) };
        }),
      ),
    );
    const group = new RedisSentinel(masterName, [master, replica], sentinels);
    const settled = await settle(() => group.settled(), { timeout: 20_000, what: "the new Redis Sentinel group to settle" });
    if (settled !== master.port) throw new Error(`the new Sentinel group names ${settled} as the master, not ${master.port}`);
    return group;
  }

  /** A temporary directory of this bed, removed when it closes. */
  async #tempDir(prefix) {
    const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  /**
   * `start(ports)` with `count` free ports; again with other ports (three attempts in all)
   * if it fails, as when another process took one between freePort() and bind.
   */
  async #onFreePorts(count, start) {
    for (let attempt = 1; ; attempt++) {
      const ports = [];
      for (let i = 0; i < count; i++) ports.push(await freePort());
      try {
        return await start(ports);
      } catch (err) {
        if (attempt >= 3) throw err;
      }
    }
  }

  /**
   * Runs `redis-server args` as `name` and resolves to its `Proc` once the server on `port`
   * answers as that very process (`INFO server` process_id): not a stranger that holds the
   * port. Stops it and rejects if it exits first or never answers.
   */
  async #redisProcess(name, port, args) {
    const proc = this.#spawn(name, REDIS_SERVER, args, { PATH: process.env.PATH });
    try {
      await until(
        async () => {
          if (proc.exit?.error) throw new Error(`cannot run ${REDIS_SERVER} (${proc.exit.error.code}): install redis-server or set REDIS_SERVER`);
          if (!proc.running) throw new Error(`${name} exited: ${JSON.stringify(proc.exit)}\n${proc.log()}`);
          const info = await redisInfo(port, "server").catch(() => null);
          return Number(info?.process_id) === proc.child.pid;
        },
        { what: `${name} to answer on ${port}` },
      );
      return proc;
    } catch (err) {
      await proc.stop();
      throw err;
    }
  }

  /**
   * Starts a replica. `redis`: a `Redis` (or any `{ url }`) for fleet mode; `cluster`: a
   * `RedisCluster` (or any `{ seedUrls }`); `sentinel`: a `RedisSentinel` (or any
   * `{ sentinelUrls, masterName }`); none of them: the in-process bus. `database`: a `Database` (or any `{ url }`) for the durable history;
   * `env`: extra or overriding settings. Waits until `/readyz` answers 200 (and, with a
   * database, says `"store": "up"`: migrated and reachable), or with `ready: false` only
   * until it answers at all.
   */
  async replica({ redis, cluster, sentinel, database, env = {}, ready = true } = {}) {
    const name = `fanout-${++this.count.replica}`;
    for (let attempt = 1; ; attempt++) {
      const [publicPort, internalPort] = [await freePort(), await freePort()];
      const proc = this.#spawn(name, FANOUT_BIN, [], replicaEnv({ publicPort, internalPort, redis, cluster, sentinel, database, env }));
      const replica = new Replica(name, proc, publicPort, internalPort);
      try {
        await until(
          async () => {
            if (proc.exit?.error) {
              throw new Error(`cannot run ${FANOUT_BIN} (${proc.exit.error.code}): build it with \`cargo build\` or set FANOUT_BIN`);
            }
            if (!proc.running) throw new Error(`${name} exited at start: ${JSON.stringify(proc.exit)}`);
            const res = await replica.readiness();
            if (!ready) return res !== null;
            return res?.status === 200 && (!database || res.body?.store === "up");
          },
          { what: `${name} /readyz ${ready ? `200${database ? ' with "store": "up"' : ""}` : "to answer"}` },
        );
        return replica;
      } catch (err) {
        await proc.stop();
        // Another process took a port between freePort() and bind: try other ports.
        const portTaken = proc.output.some((l) => l.includes("cannot listen"));
        if (!portTaken || attempt >= 3) throw err;
      }
    }
  }

  /** A Redis and `n` replicas sharing it (and `options.database`, if given). */
  async fleet(n, options = {}) {
    const redis = await this.redis();
    const replicas = [];
    for (let i = 0; i < n; i++) replicas.push(await this.replica({ ...options, redis }));
    return { redis, replicas };
  }

  /**
   * Connects a stock client to `replica`. `token` becomes `auth: { token }`; `auth` is passed
   * as is (omit both for a client without auth). Websocket only unless `transports` says
   * otherwise. `watchPolls`: count the long-polls on the wire (`client.pollsInFlight`).
   * Reconnection stays on (stock behaviour) with a short delay, so that a reconnection the
   * contract forbids would show up quickly.
   */
  connect(replica, { token: tok, auth, name, watchPolls = false, ...options } = {}) {
    const clientName = name ?? `client-${++this.count.client}`;
    const opts = {
      forceNew: true,
      transports: ["websocket"],
      reconnectionDelay: 100,
      reconnectionDelayMax: 200,
      timeout: WAIT_MS,
      ...options,
    };
    if (tok !== undefined) opts.auth = { token: tok };
    else if (auth !== undefined) opts.auth = auth;
    const polls = watchPolls ? new PollWatcher() : undefined;
    if (polls) opts.agent = polls;
    const client = new Client(clientName, io(replica.url, opts), polls);
    if (polls) polls.onChange = () => client.notify();
    this.clients.push(client);
    return client;
  }

  /** Connects with a token of `claims` and waits for (consumes) its `auth-success`. */
  async join(replica, claims, options = {}) {
    const client = this.connect(replica, { token: token(claims), ...options });
    await client.authenticated();
    return client;
  }

  /**
   * A TCP load balancer in front of `replicas`: each new connection goes to the first
   * replica that accepts it, so when one stops listening, clients reconnect to the next.
   * Connect clients to it like to a replica. `awaitingReply()` counts the connections whose
   * last request reached a replica and has no answer yet (a long-poll held there).
   */
  async balancer(replicas) {
    const open = new Set();
    const waiting = new Set();
    const track = (sock) => {
      open.add(sock);
      sock.on("close", () => {
        open.delete(sock);
        waiting.delete(sock);
      });
    };
    const server = net.createServer((down) => {
      track(down);
      down.pause();
      down.on("error", () => {});
      const tryFrom = (i) => {
        if (i >= replicas.length || down.destroyed) return down.destroy();
        const up = net.connect(Number(new URL(replicas[i].url).port), "127.0.0.1");
        const next = () => tryFrom(i + 1);
        up.once("error", next);
        up.once("connect", () => {
          up.off("error", next);
          track(up);
          // An orderly close is passed on after the data; a reset, as a reset.
          up.on("error", () => down.destroy());
          down.on("error", () => up.destroy());
          down.on("data", (chunk) => up.write(chunk, () => waiting.add(up)));
          down.on("end", () => up.end());
          up.on("data", () => waiting.delete(up));
          up.pipe(down);
          down.resume();
        });
      };
      tryFrom(0);
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    this.servers.push({ server, open });
    return {
      name: "balancer",
      url: `http://127.0.0.1:${server.address().port}`,
      awaitingReply: () => waiting.size,
    };
  }

  /**
   * HAProxy with the compose demo's configuration (examples/compose/haproxy.cfg: addresses
   * and ports moved to this machine, nothing else) in front of `replicas`, which must be as
   * many as the file names (three). `dashboard`: the URL of the server of the dashboard's
   * static files (its backend, under /dashboard/); without it, a port where nothing listens
   * (that backend is DOWN). Runs in the foreground, its log kept with the bed's; returns
   * once every replica passed HAProxy's health check (GET /readyz).
   */
  async haproxy(replicas, { dashboard } = {}) {
    const ports = { 3000: await freePort(), 3001: await freePort(), 8404: await freePort() };
    const statics = dashboard ? new URL(dashboard).port : await freePort();
    const config = localHaproxyConfig(await readFile(HAPROXY_CONFIG, "utf8"), replicas, ports, statics);
    const dir = await mkdtemp(path.join(os.tmpdir(), "fanout-haproxy-"));
    this.dirs.push(dir);
    const file = path.join(dir, "haproxy.cfg");
    await writeFile(file, config);
    const proc = this.#spawn("haproxy", HAPROXY, ["-db", "-f", file], { PATH: process.env.PATH });
    const lb = new Haproxy(proc, { public: ports[3000], ingest: ports[3001], stats: ports[8404] });
    await until(
      async () => {
        if (proc.exit?.error) {
          throw new Error(
            `cannot run ${HAPROXY} (${proc.exit.error.code}): install HAProxy 2.6 or later ` +
              "(scripts/test installs Debian's haproxy) or set HAPROXY to its path",
          );
        }
        if (!proc.running) throw new Error(`haproxy exited at start: ${JSON.stringify(proc.exit)}`);
        const servers = await lb.servers().catch(() => ({}));
        const states = Object.values(servers);
        return states.length === replicas.length && states.every((s) => s.status === "UP" && s.check === "L7OK");
      },
      { timeout: 15_000, what: "haproxy: every replica UP after a passed /readyz check" },
    );
    return lb;
  }

  /**
   * An HTTP server of the scenario on a free loopback port (e.g. a page's static files),
   * closed with the bed; resolves to its URL.
   */
  async serve(handler) {
    const server = http.createServer(handler);
    const open = new Set();
    server.on("connection", (sock) => {
      open.add(sock);
      sock.on("close", () => open.delete(sock));
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    this.servers.push({ server, open });
    return `http://127.0.0.1:${server.address().port}`;
  }

  /** Runs another program of the scenario (e.g. the compose demo's worker simulator); its output joins the bed's logs. */
  run(name, command, args, env) {
    return this.#spawn(name, command, args, env);
  }

  #spawn(name, command, args, env) {
    const proc = new Proc(name, command, args, env);
    this.procs.push(proc);
    return proc;
  }

  /** Everything the processes of this bed wrote. */
  logs() {
    return this.procs.map((p) => `--- ${p.name} (exit ${JSON.stringify(p.exit)}) ---\n${p.log()}`).join("\n");
  }

  async close() {
    for (const c of this.clients) c.close();
    for (const { server, open } of this.servers) {
      server.close();
      for (const sock of open) sock.destroy();
    }
    await Promise.all(this.procs.map((p) => p.stop()));
    await Promise.all(this.dirs.map((d) => rm(d, { recursive: true, force: true })));
    const dropped = await Promise.allSettled(this.databases.map((db) => db.drop()));
    for (const [i, r] of dropped.entries()) {
      if (r.status === "rejected") process.stderr.write(`could not drop test database ${this.databases[i].name}: ${r.reason}\n`);
    }
  }
}

/**
 * Publishes a `marker` event to `organizationId` through `replica` and waits until each of
 * `clients` has it. Messages reach a socket in the order they were published through one
 * bus, so once the marker is in, anything published before it that was going to arrive has
 * arrived: this is how a test proves that something did *not* arrive, without a sleep.
 */
export async function marker(replica, organizationId, clients) {
  const id = randomUUID();
  await replica.publish({ organizationId, event: "marker", data: { id } });
  await Promise.all(clients.map((c) => c.find("marker", (d) => d?.id === id)));
}

/**
 * Wraps a test body: gives it a fresh bed, prints the bed's process logs if the body fails
 * (or runs past `timeout` ms), and always stops the bed's processes and clients.
 */
export function scenario(body, { timeout = 60_000 } = {}) {
  return async (t) => {
    const bed = new Testbed();
    try {
      await deadline(body(bed, t), timeout, "the whole scenario");
    } catch (err) {
      process.stderr.write(`\n=== logs of "${t.name}" ===\n${bed.logs()}\n=== end of logs ===\n`);
      throw err;
    } finally {
      await bed.close();
    }
  };
}
