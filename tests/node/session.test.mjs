// Sessions end when their token expires, unless auth-refresh extended them.
//
// Tokens here live 2-3 seconds (exp has a one-second resolution), so each expiry test takes
// a few seconds of wall time: that time is the scenario, not a synchronisation.

import assert from "node:assert/strict";
import { test } from "node:test";
import { WAIT_MS, delay, nowSeconds, scenario, token, unsignedToken } from "./harness.mjs";

const INVALID = "Invalid or expired token";
const REQUIRED = "Authentication required";
const MISMATCH = "Token is for another organization or user";
const ME = { organizationId: "acme", userId: "alice" };

/** Waits until the wall clock is `ms` past the Unix second `exp`. */
const past = (exp, ms = 0) => delay(Math.max(0, exp * 1000 + ms - Date.now()));

/** Asserts that `client` was told "Token expired" no earlier than `exp`, then disconnected. */
async function assertExpiredAt(client, exp) {
  const error = await client.next("auth-error", Math.max(0, exp * 1000 - Date.now()) + WAIT_MS);
  assert.deepEqual(error, { error: "Token expired" });
  const at = client.timeOf("auth-error");
  assert.ok(at >= exp * 1000, `auth-error came ${exp * 1000 - at}ms before exp`);
  assert.equal(await client.next("disconnect"), "io server disconnect");
  const names = client.names();
  assert.deepEqual(names.slice(-2), ["auth-error", "disconnect"]);
  assert.equal(client.socket.active, false, "an expired session must not reconnect by itself");
}

test("without a refresh, the session ends at exp: auth-error, then server disconnect", scenario(async (bed) => {
  const fanout = await bed.replica();
  const exp = nowSeconds() + 3;
  const clients = [
    await bed.join(fanout, { ...ME, exp }, { name: "websocket" }),
    await bed.join(fanout, { ...ME, exp }, { name: "polling", transports: ["polling"] }),
  ];
  for (const client of clients) {
    await assertExpiredAt(client, exp);
    assert.deepEqual(client.serverEvents(), ["auth-success", "auth-error"]);
  }
}));

test("auth-refresh extends the session to the new exp, where it then ends", scenario(async (bed) => {
  const fanout = await bed.replica();
  const oldExp = nowSeconds() + 3;
  const client = await bed.join(fanout, { ...ME, exp: oldExp });

  const newExp = oldExp + 3;
  const ack = await client.request("auth-refresh", { token: token({ ...ME, exp: newExp }) });
  assert.deepEqual(ack, { ok: true, exp: newExp });

  // Well past the old exp, the session is alive: it still receives its org's messages.
  await past(oldExp, 1000);
  const update = { organizationId: "acme", taskId: "t-after-old-exp", status: "RUNNING" };
  await fanout.update(update);
  assert.deepEqual(await client.next("execution-updated"), update);
  assert.equal(client.all("auth-error").length, 0);
  assert.equal(client.all("disconnect").length, 0);

  await assertExpiredAt(client, newExp);
  assert.deepEqual(client.serverEvents(), ["auth-success", "execution-updated", "auth-error"]);
}));

test("auth-refresh refusals answer ok:false with the reason and leave the session as it was", scenario(async (bed) => {
  const fanout = await bed.replica();
  const client = await bed.join(fanout, ME);
  const far = nowSeconds() + 3600;
  const refusals = [
    [{ token: "not-a-jwt" }, INVALID],
    [{ token: token({ ...ME, exp: nowSeconds() - 30 }) }, INVALID],
    [{ token: token({ ...ME, exp: far }, { secret: "not-the-replicas-secret-0123456789" }) }, INVALID],
    [{ token: token({ ...ME, exp: far }, { algorithm: "HS512" }) }, INVALID],
    [{ token: unsignedToken({ ...ME, exp: far }) }, INVALID],
    [{ token: token({ ...ME, role: undefined, exp: far }) }, INVALID],
    [{}, REQUIRED],
    [{ token: "" }, REQUIRED],
    [{ token: token({ organizationId: "globex", userId: "alice", exp: far }) }, MISMATCH],
    [{ token: token({ organizationId: "acme", userId: "bob", exp: far }) }, MISMATCH],
  ];
  for (const [payload, error] of refusals) {
    const ack = await client.request("auth-refresh", payload);
    assert.deepEqual(ack, { ok: false, error }, `refresh with ${JSON.stringify(payload)}`);
  }
  // Still connected, still in its org.
  const update = { organizationId: "acme", taskId: "t-1", status: "QUEUED" };
  await fanout.update(update);
  assert.deepEqual(await client.next("execution-updated"), update);
  assert.deepEqual(client.serverEvents(), ["auth-success", "execution-updated"]);
  assert.equal(client.socket.connected, true);
}));

test("a refused refresh does not extend the session: it ends at the original exp", scenario(async (bed) => {
  const fanout = await bed.replica();
  const exp = nowSeconds() + 3;
  const client = await bed.join(fanout, { ...ME, exp });
  const far = nowSeconds() + 3600;
  for (const [other, error] of [
    [{ organizationId: "globex", userId: "alice" }, MISMATCH],
    [{ organizationId: "acme", userId: "mallory" }, MISMATCH],
  ]) {
    const ack = await client.request("auth-refresh", { token: token({ ...other, exp: far }) });
    assert.deepEqual(ack, { ok: false, error });
  }
  const badlySigned = token({ ...ME, exp: far }, { secret: "not-the-replicas-secret-0123456789" });
  assert.deepEqual(await client.request("auth-refresh", { token: badlySigned }), { ok: false, error: INVALID });
  await assertExpiredAt(client, exp);
}));
