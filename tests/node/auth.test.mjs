// Connecting: the auth-success payload, and every way a token is refused.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import jwt from "jsonwebtoken";
import { SECRET, delay, marker, nowSeconds, scenario, token, unsignedToken, until } from "./harness.mjs";

const WELCOME = "Connected to organization channel";
const REQUIRED = "Authentication required";
const INVALID = "Invalid or expired token";
const TOO_MANY = "Too many connections";

/**
 * How long a refused client is watched for a reconnection attempt. Nothing can be published
 * to a client that is gone, so this negative has no marker: the window is 3x the longest
 * first retry delay the clients are configured with (100ms +/- 50%), so a client that was
 * going to retry would have done so.
 */
const NO_RECONNECT_WINDOW_MS = 450;

describe("auth-success", () => {
  test("a valid token over websocket: payload echoes the claims, socket is in its org", scenario(async (bed) => {
    const fanout = await bed.replica();
    const client = bed.connect(fanout, {
      token: token({ organizationId: "acme", userId: "alice", role: "admin" }),
    });
    assert.deepEqual(await client.authenticated(), {
      message: WELCOME,
      organizationId: "acme",
      userId: "alice",
      role: "admin",
    });
    assert.equal(client.transport, "websocket");
    // auth-success means "you are in": a publish right after it is received.
    const update = { organizationId: "acme", taskId: "t-1", status: "RUNNING" };
    await fanout.update(update);
    assert.deepEqual(await client.next("execution-updated"), update);
    assert.deepEqual(client.serverEvents(), ["auth-success", "execution-updated"]);
  }));

  test("a valid token over HTTP long-polling gets the same auth-success", scenario(async (bed) => {
    const fanout = await bed.replica();
    const client = bed.connect(fanout, {
      transports: ["polling"],
      token: token({ organizationId: "acme", userId: "bob", role: "viewer" }),
    });
    assert.deepEqual(await client.authenticated(), {
      message: WELCOME,
      organizationId: "acme",
      userId: "bob",
      role: "viewer",
    });
    assert.equal(client.transport, "polling");
  }));

  test("numeric ids stay numeric in auth-success and route like their decimal form", scenario(async (bed) => {
    const fanout = await bed.replica();
    const client = bed.connect(fanout, {
      token: token({ organizationId: 42, userId: 7, role: "member" }),
    });
    assert.deepEqual(await client.authenticated(), {
      message: WELCOME,
      organizationId: 42,
      userId: 7,
      role: "member",
    });
    await fanout.update({ organizationId: 42, taskId: "n", status: "DONE" });
    assert.deepEqual(await client.next("execution-updated"), { organizationId: 42, taskId: "n", status: "DONE" });
    await fanout.publish({ organizationId: "42", event: "notice", data: { n: 1 }, userId: 7 });
    assert.deepEqual(await client.next("notice"), { n: 1 });
    await fanout.publish({ organizationId: 42, event: "notice", data: { n: 2 }, userId: "7" });
    assert.deepEqual(await client.next("notice"), { n: 2 });
  }));

  test("an organizationId of 128 characters of [A-Za-z0-9._-] is accepted and routed", scenario(async (bed) => {
    const fanout = await bed.replica();
    const organizationId = "Org.name_with-all.allowed_CHARS-0123456789".padEnd(128, "x");
    const client = bed.connect(fanout, { token: token({ organizationId, userId: "u:1 with spaces" }) });
    const welcome = await client.authenticated();
    assert.equal(welcome.organizationId, organizationId);
    assert.equal(welcome.userId, "u:1 with spaces");
    await fanout.publish({ organizationId, event: "notice", data: "hi", userId: "u:1 with spaces" });
    assert.equal(await client.next("notice"), "hi");
  }));

  test("a token as a backend mints it (iat, iss, aud, sub, extra claims) is accepted", scenario(async (bed) => {
    const fanout = await bed.replica();
    const tok = jwt.sign(
      { userId: "alice", organizationId: "acme", role: "admin", email: "alice@example.com", permissions: ["read"] },
      SECRET,
      { algorithm: "HS256", expiresIn: "1h", issuer: "backend", audience: "dashboards", subject: "alice" },
    );
    const client = bed.connect(fanout, { token: tok });
    assert.deepEqual(await client.authenticated(), {
      message: WELCOME,
      organizationId: "acme",
      userId: "alice",
      role: "admin",
    });
  }));
});

// The claims a refused token pretends to have: the test publishes to this org while the
// refused client is connected, and checks it received none of it.
const CLAIMS = { organizationId: "acme", userId: "mallory" };

const REFUSALS = [
  ["no auth at all", {}, REQUIRED],
  ["auth without a token", { auth: {} }, REQUIRED],
  ["an empty token", { token: "" }, REQUIRED],
  ["a blank token", { token: "   " }, REQUIRED],
  ["a token that is not a JWT", { token: "not-a-jwt" }, INVALID],
  ["a token that is not a string", { auth: { token: 12345 } }, INVALID],
  ["an expired token", { token: () => token({ ...CLAIMS, exp: nowSeconds() - 30 }) }, INVALID],
  ["a token signed with another secret", { token: () => token(CLAIMS, { secret: "not-the-replicas-secret-0123456789" }) }, INVALID],
  ["an HS512 token (the wrong algorithm)", { token: () => token(CLAIMS, { algorithm: "HS512" }) }, INVALID],
  ["an alg:none token", { token: () => unsignedToken(CLAIMS) }, INVALID],
  ["a token without userId", { token: () => token({ ...CLAIMS, userId: undefined }) }, INVALID],
  ["a token without organizationId", { token: () => token({ ...CLAIMS, organizationId: undefined }) }, INVALID],
  ["a token without role", { token: () => token({ ...CLAIMS, role: undefined }) }, INVALID],
  ["a token without exp", { token: () => token({ ...CLAIMS, exp: undefined }) }, INVALID],
  ["an organizationId with a colon", { token: () => token({ ...CLAIMS, organizationId: "acme:x" }) }, INVALID],
  ["an organizationId of 129 characters", { token: () => token({ ...CLAIMS, organizationId: "a".repeat(129) }) }, INVALID],
  ["a negative numeric organizationId", { token: () => token({ ...CLAIMS, organizationId: -1 }) }, INVALID],
];

describe("auth-error", () => {
  for (const [what, options, error] of REFUSALS) {
    test(`${what}: auth-error "${error}", then "io server disconnect", no reconnect, nothing else`, scenario(async (bed) => {
      const fanout = await bed.replica();
      // A member of the claimed org, receiving a steady stream of its org's messages while
      // the refused client comes and goes.
      const member = await bed.join(fanout, CLAIMS);
      const stream = publishing(fanout, CLAIMS.organizationId);
      await member.next("tick");

      const before = stream.sent;
      const refused = bed.connect(fanout, {
        ...options,
        token: typeof options.token === "function" ? options.token() : options.token,
      });
      assert.equal(await refused.next("disconnect"), "io server disconnect");
      await until(() => stream.sent >= before + 2, { what: "more traffic around the refusal" });
      await stream.stop();
      // The member got messages from before the refused client connected to after it left.
      await marker(fanout, CLAIMS.organizationId, [member]);

      assert.deepEqual(refused.names(), ["connect", "auth-error", "disconnect"]);
      assert.deepEqual(refused.all("auth-error"), [{ error }]);
      assert.equal(refused.socket.active, false, "the client must not plan a reconnection");
      await delay(NO_RECONNECT_WINDOW_MS);
      assert.deepEqual(refused.names(), ["connect", "auth-error", "disconnect"]);
      assert.equal(member.all("tick").length, stream.sent);
    }));
  }

  test("many refused clients at once, amid traffic: each gets exactly auth-error", scenario(async (bed) => {
    const fanout = await bed.replica();
    const member = await bed.join(fanout, CLAIMS);
    const stream = publishing(fanout, CLAIMS.organizationId);
    await member.next("tick");
    const refused = [];
    for (let i = 0; i < 20; i++) {
      const tok = i % 2 ? token(CLAIMS, { secret: "not-the-replicas-secret-0123456789" }) : unsignedToken(CLAIMS);
      refused.push(bed.connect(fanout, { token: tok, transports: i % 4 < 2 ? ["websocket"] : ["polling"] }));
    }
    await Promise.all(refused.map(async (c) => assert.equal(await c.next("disconnect"), "io server disconnect")));
    await stream.stop();
    await marker(fanout, CLAIMS.organizationId, [member]);
    for (const c of refused) {
      assert.deepEqual(c.names(), ["connect", "auth-error", "disconnect"], c.name);
      assert.deepEqual(c.all("auth-error"), [{ error: INVALID }]);
    }
    assert.equal(member.all("tick").length, stream.sent);
  }));

  test(`a user over FANOUT_MAX_CONNECTIONS_PER_USER: auth-error "Too many connections", no reconnect; a closed tab makes room`, scenario(async (bed) => {
    const fanout = await bed.replica({ env: { FANOUT_MAX_CONNECTIONS_PER_USER: "2" } });
    const tabs = [await bed.join(fanout, CLAIMS), await bed.join(fanout, CLAIMS, { transports: ["polling"] })];
    for (const transports of [["websocket"], ["polling"]]) {
      const third = bed.connect(fanout, { token: token(CLAIMS), transports });
      assert.equal(await third.next("disconnect"), "io server disconnect");
      assert.deepEqual(third.names(), ["connect", "auth-error", "disconnect"]);
      assert.deepEqual(third.all("auth-error"), [{ error: TOO_MANY }]);
      assert.equal(third.socket.active, false, "the client must not plan a reconnection");
    }
    // The user's admitted tabs still receive; one closes, and the next one is admitted.
    await marker(fanout, CLAIMS.organizationId, tabs);
    tabs.shift().socket.disconnect();
    await until(async () => (await fanout.metric("fanout_connections")) === 1, { what: "the closed tab counted out" });
    const next = await bed.join(fanout, CLAIMS);
    await marker(fanout, CLAIMS.organizationId, [next, ...tabs]);
  }));
});

/** Publishes `tick` events to `org` back to back until `stop()`. */
function publishing(replica, organizationId) {
  let running = true;
  const state = { sent: 0 };
  const loop = (async () => {
    while (running) {
      await replica.publish({ organizationId, event: "tick", data: { n: state.sent + 1 } });
      state.sent++;
    }
  })();
  return {
    get sent() {
      return state.sent;
    },
    async stop() {
      running = false;
      await loop;
    },
  };
}
