// The dashboard (examples/dashboard/) in a real browser: Debian's headless Chromium, driven
// by playwright-core, opens the page through HAProxy running the compose demo's
// configuration, which serves the page's files under /dashboard/ and fanout on the same
// origin, in front of three replicas with Redis and a history. What a user would see is
// what is checked: the table, the statuses, the log lines, lastSeq and the counters.
// A screenshot of the page is left in target/test-artifacts/dashboard.png. The browser and
// the questions asked of the page are chromium.mjs.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdir, readFile } from "node:fs/promises";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { ARTIFACTS, UI_MS, inChromium, logLines, newPage, rows, select, shows, statusOf } from "./chromium.mjs";
import { scenario, token, until } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(here, "../..");
const DASHBOARD = path.join(ROOT, "examples", "dashboard");

// ---------------------------------------------------------------------------------------
// The page's files, as a static server would serve them (HAProxy's backend dashboard).

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
};

async function dashboardFiles(req, res) {
  const { pathname } = new URL(req.url, "http://localhost");
  const name = pathname.startsWith("/dashboard/") ? decodeURIComponent(pathname.slice("/dashboard/".length)) : null;
  const file = name === null ? null : path.resolve(DASHBOARD, name || "index.html");
  if (!file?.startsWith(DASHBOARD + path.sep) || !TYPES[path.extname(file)]) {
    res.writeHead(404).end();
    return;
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": TYPES[path.extname(file)], "cache-control": "no-store" }).end(body);
  } catch {
    res.writeHead(404).end();
  }
}

/** Three replicas (with `options`), HAProxy with the repository's configuration, the page's files behind it. */
async function stack(bed, options = {}) {
  const { replicas } = await bed.fleet(3, options);
  const files = await bed.serve(dashboardFiles);
  const lb = await bed.haproxy(replicas, { dashboard: files });
  await until(
    async () => {
      const s = (await lb.servers("dashboard")).dashboard;
      return s?.status === "UP" && s.check === "L7OK";
    },
    { timeout: 15_000, what: "haproxy: backend dashboard UP after a passed check" },
  );
  return { replicas, lb };
}

// ---------------------------------------------------------------------------------------
// fanout's metrics

/** Sum of a metric's samples on `replicas` (those that answer). */
async function metric(replicas, name) {
  let total = 0;
  for (const r of replicas) {
    const text = await fetch(`${r.internal}/metrics`, { signal: AbortSignal.timeout(2000) }).then((res) => res.text(), () => "");
    for (const m of text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "gm"))) total += Number(m[1]);
  }
  return total;
}

/** The replica holding the page's (one) authenticated connection. */
function holder(replicas) {
  return until(
    async () => {
      const counts = await Promise.all(replicas.map((r) => metric([r], "fanout_connections")));
      const held = replicas.filter((_, i) => counts[i] === 1);
      return counts.reduce((a, b) => a + b, 0) === 1 && held[0];
    },
    { what: "the replica holding the page's connection" },
  );
}

// ---------------------------------------------------------------------------------------

test("the dashboard's socket.io-client is the suite's own, byte for byte, and the page pins its hash", async () => {
  const vendored = await readFile(path.join(DASHBOARD, "vendor", "socket.io.min.js"));
  const pkg = path.join(here, "node_modules", "socket.io-client");
  const { version } = JSON.parse(await readFile(path.join(pkg, "package.json"), "utf8"));
  assert.ok(
    vendored.equals(await readFile(path.join(pkg, "dist", "socket.io.min.js"))),
    `examples/dashboard/vendor/socket.io.min.js must be socket.io-client ${version}'s dist/socket.io.min.js (vendor/README.md says how to update it)`,
  );
  const sri = `sha384-${createHash("sha384").update(vendored).digest("base64")}`;
  const note = await readFile(path.join(DASHBOARD, "vendor", "README.md"), "utf8");
  assert.ok(note.includes(`socket.io-client ${version}`) && note.includes(sri), `vendor/README.md must name ${version} and ${sri}`);
  const html = await readFile(path.join(DASHBOARD, "index.html"), "utf8");
  assert.match(html, new RegExp(`src="vendor/socket\\.io\\.min\\.js"\\s+integrity="${sri.replace(/[+/]/g, "\\$&")}"`));
  assert.doesNotMatch(html, /https?:\/\//, "the page loads nothing from elsewhere");
});

test("in Chromium through HAProxy: the history, live updates and logs of the token's organization only, nothing lost or doubled across a replica's death", scenario(async (bed, t) => {
  const database = await bed.database();
  const { replicas, lb } = await stack(bed, { database });

  // Before the page opens: the history's (REST), and another organization's.
  await replicas[0].update({ organizationId: "acme", taskId: "nightly-1", status: "RUNNING", suite: "nightly" });
  await replicas[0].log({ organizationId: "acme", taskId: "nightly-1", log: "checked out main@4f2a9c1" });
  await replicas[0].update({ organizationId: "globex", taskId: "globex-history", status: "RUNNING" });

  await inChromium(async (context, messages) => {
    const page = await newPage(context, messages);
    const acme = token({ organizationId: "acme", userId: "viewer-1" });
    await page.goto(`${lb.url}/dashboard/#token=${acme}`, { timeout: UI_MS });
    await shows(page, "state", "connected");
    assert.equal(new URL(page.url()).hash, "", "the token is taken out of the address bar");
    await shows(page, "org", "acme");
    await statusOf(page, "nightly-1", "RUNNING");
    await select(page, "nightly-1");
    await page.locator("#logs li", { hasText: "checked out main@4f2a9c1" }).waitFor({ timeout: UI_MS });

    // Live, published through the replicas that do not hold the page's connection.
    const home = await holder(replicas);
    const [a, b] = replicas.filter((r) => r !== home);
    await a.update({ organizationId: "acme", taskId: "e2e-42", status: "RUNNING" });
    await statusOf(page, "e2e-42", "RUNNING");
    await select(page, "e2e-42");
    await b.log({ organizationId: "acme", taskId: "e2e-42", log: "✓ login (120 ms)" });
    await page.locator("#logs li", { hasText: "✓ login (120 ms)" }).waitFor({ timeout: UI_MS });
    await a.update({ organizationId: "acme", taskId: "e2e-42", status: "PASSED" });
    await statusOf(page, "e2e-42", "PASSED");

    // Another organization's events never show: globex's update, then one of acme's through
    // the same replica (delivered in that order), then no globex row.
    await b.update({ organizationId: "globex", taskId: "globex-live", status: "FAILED" });
    await b.update({ organizationId: "acme", taskId: "after-globex", status: "PENDING" });
    await statusOf(page, "after-globex", "PENDING");
    // Text from the network stays text.
    const markup = '<img src=x id=injected onerror="window.injected=1">';
    await a.update({ organizationId: "acme", taskId: markup, status: "RUNNING" });
    await a.log({ organizationId: "acme", taskId: "e2e-42", log: markup });
    await statusOf(page, markup, "RUNNING");
    await page.locator("#logs li", { hasText: markup }).waitFor({ timeout: UI_MS });
    assert.equal(await page.locator("#injected").count(), 0, "no element made of an event's text");
    const ids = (await rows(page)).map(([id]) => id);
    assert.deepEqual(ids.filter((id) => id.startsWith("globex")), [], `globex's executions on acme's page: ${ids}`);

    // A replica dies while updates keep coming: the page's connection goes with it. Whatever
    // is published after its death reaches the page only by the replay of its reconnection
    // (with lastSeq, through HAProxy to a survivor): the page does not reload over REST then.
    const replayed = await metric([a, b], "fanout_replayed_events_total");
    const lines = ["✓ login (120 ms)", markup];
    const burst = [];
    let last;
    for (let i = 1; i <= 30; i++) {
      if (i === 6) {
        home.proc.signal("SIGKILL");
        await home.proc.exited;
      }
      const via = i % 2 ? a : b;
      const taskId = `burst-${String(i).padStart(2, "0")}`;
      burst.push(taskId);
      await via.update({ organizationId: "acme", taskId, status: i % 3 ? "RUNNING" : "FAILED" });
      lines.push(`step ${i} ok`);
      last = await via.log({ organizationId: "acme", taskId: "e2e-42", log: `step ${i} ok` });
    }
    await shows(page, "reconnections", 1);
    await shows(page, "state", "connected");
    // And live again on the new connection.
    last = await b.update({ organizationId: "acme", taskId: "after-reconnect", status: "PASSED" });
    await statusOf(page, "after-reconnect", "PASSED");
    await shows(page, "seq", last.seq);

    const shown = new Map(await rows(page));
    for (const [i, taskId] of burst.entries()) {
      assert.equal(shown.get(taskId), (i + 1) % 3 ? "RUNNING" : "FAILED", `${taskId} on the page`);
    }
    assert.deepEqual(await logLines(page), lines, "e2e-42's log lines: all, in order, once");
    // Every event of acme after the history the page loaded (seq 1) came exactly once.
    await shows(page, "events", last.seq - 1);
    assert.ok((await metric([a, b], "fanout_replayed_events_total")) > replayed, "the reconnection was replayed what it missed");
    assert.equal(await page.locator("#notice").isHidden(), true, `no notice: ${await page.locator("#notice").textContent()}`);
    assert.deepEqual(page.errors, []);

    await mkdir(ARTIFACTS, { recursive: true });
    const screenshot = path.join(ARTIFACTS, "dashboard.png");
    await page.screenshot({ path: screenshot, fullPage: true });
    t.diagnostic(`screenshot: ${screenshot}`);
  });
}), { timeout: 150_000 });

test("in Chromium through HAProxy without history: the page says so and follows live events; a bad token shows auth-error", scenario(async (bed) => {
  const { replicas, lb } = await stack(bed);
  await inChromium(async (context, messages) => {
    const page = await newPage(context, messages);
    await page.goto(`${lb.url}/dashboard/#token=${token({ organizationId: "acme", userId: "viewer-2" })}`, { timeout: UI_MS });
    await shows(page, "state", "connected");
    await page.locator("#notice", { hasText: "keeps no history" }).waitFor({ timeout: UI_MS });
    await replicas[1].update({ organizationId: "acme", taskId: "live-only", status: "RUNNING" });
    await statusOf(page, "live-only", "RUNNING");
    await select(page, "live-only");
    await replicas[2].log({ organizationId: "acme", taskId: "live-only", log: "no history, still live" });
    await page.locator("#logs li", { hasText: "no history, still live" }).waitFor({ timeout: UI_MS });
    await shows(page, "seq", "-");
    assert.deepEqual(page.errors, []);

    const rejected = await newPage(context, messages);
    const expired = token({ organizationId: "acme", userId: "viewer-3", exp: Math.floor(Date.now() / 1000) - 60 });
    await rejected.goto(`${lb.url}/dashboard/#token=${expired}`, { timeout: UI_MS });
    await shows(rejected, "state", "auth-error: Invalid or expired token");
    assert.equal(await rejected.locator("#executions tr").count(), 0);
    assert.deepEqual(rejected.errors, []);
  });
}), { timeout: 120_000 });
