// The README's first command, as a newcomer lives it: `fanout --demo` with no configuration
// at all (no key, no Redis, no database: dev mode), its banner's link opened in headless
// Chromium. The page served by fanout itself must connect with the link's token and show
// the demo worker's executions changing status, with their log lines. The screenshot left in
// target/test-artifacts/quickstart.png is the README's (docs/images/quickstart.png).

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { test } from "node:test";
import { ARTIFACTS, UI_MS, inChromium, newPage, rows, select, shows } from "./chromium.mjs";
import { FANOUT_BIN, freePort, scenario, until } from "./harness.mjs";

const FINAL = new Set(["PASSED", "FAILED", "ERROR"]);
/** A demo execution runs at most 7 test cases of at most 1.5 s each; on a loaded machine, more. */
const EXECUTION_MS = 45_000;

test("fanout --demo alone: the banner's link opens the dashboard, which shows demo executions changing status", scenario(async (bed, t) => {
  const [publicPort, internalPort] = [await freePort(), await freePort()];
  // Exactly this environment: nothing configured but where to listen (the default ports
  // may be taken on a test machine).
  const fanout = bed.run("fanout --demo", FANOUT_BIN, ["--demo"], {
    PATH: process.env.PATH,
    FANOUT_LISTEN: `127.0.0.1:${publicPort}`,
    FANOUT_INTERNAL_LISTEN: `127.0.0.1:${internalPort}`,
    RUST_LOG: "info",
  });
  const link = await until(
    () => {
      if (!fanout.running) throw new Error(`fanout exited: ${JSON.stringify(fanout.exit)}`);
      return fanout.output.map((l) => l.trim()).find((l) => /^http:\/\/\S+\/dashboard\/#token=\S+$/.test(l));
    },
    { what: "the banner's dashboard link" },
  );
  assert.equal(new URL(link).origin, `http://127.0.0.1:${publicPort}`);
  assert.equal(new URL(link).search, "", "the token is never in a query string");
  assert.ok(fanout.output.some((l) => l.includes("demo worker is publishing")), "the banner says the demo runs");

  await inChromium(async (context, messages) => {
    const page = await newPage(context, messages);
    await page.goto(link, { timeout: UI_MS });
    await shows(page, "state", "connected");
    await shows(page, "org", "demo");
    await shows(page, "user", "dev");
    assert.equal(new URL(page.url()).hash, "", "the token is taken out of the address bar");
    // No DATABASE_URL: the page says it follows live events only.
    await page.locator("#notice", { hasText: "keeps no history" }).waitFor({ timeout: UI_MS });

    // One execution followed from PENDING (so the page was there for its whole life: without
    // a history, what came before the page is not shown) through RUNNING to its final
    // status: the page changes by itself.
    const pending = new Set((await rows(page)).filter(([, status]) => status === "PENDING").map(([id]) => id));
    const running = await until(
      async () => {
        const now = await rows(page);
        for (const [id, status] of now) if (status === "PENDING") pending.add(id);
        return now.find(([id, status]) => status === "RUNNING" && pending.has(id))?.[0];
      },
      { timeout: EXECUTION_MS, every: 50, what: "a demo execution seen PENDING, then RUNNING, on the page" },
    );
    await select(page, running);
    await page.locator("#logs li", { hasText: /checked out .+@[0-9a-f]+, running \d+ tests/ }).waitFor({ timeout: UI_MS });
    const final = await until(
      async () => {
        const status = new Map(await rows(page)).get(running);
        return FINAL.has(status) && status;
      },
      { timeout: EXECUTION_MS, every: 100, what: `${running} to reach its final status on the page` },
    );
    const lines = await page.$$eval("#logs li", (lis) => lis.map((li) => li.textContent));
    assert.ok(lines.some((l) => /^[✓✗] .+ \(\d+ ms\)/.test(l) || l.includes("giving up")), `test case lines: ${lines}`);
    t.diagnostic(`${running}: RUNNING -> ${final}, ${lines.length} log lines`);

    // Several executions at once, for the screenshot as for a newcomer's first look.
    await until(async () => (await rows(page)).length >= 5, { timeout: EXECUTION_MS, every: 200, what: "five executions on the page" });
    assert.ok(Number(await page.locator("#events").textContent()) > 0);
    assert.deepEqual(page.errors, []);

    await mkdir(ARTIFACTS, { recursive: true });
    const screenshot = path.join(ARTIFACTS, "quickstart.png");
    // The page down to the end of its content (the README shows it, not the empty rest).
    const bottom = await page.$eval("main", (main) => main.getBoundingClientRect().bottom);
    await page.screenshot({ path: screenshot, clip: { x: 0, y: 0, width: 1280, height: Math.ceil(bottom) + 24 } });
    t.diagnostic(`screenshot: ${screenshot}`);
  });
}), { timeout: 150_000 });
