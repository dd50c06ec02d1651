// The dashboard (examples/dashboard/) in a real browser, for the tests that open it:
// Debian's headless Chromium driven by playwright-core, each run in a fresh profile, and the
// questions a user would ask of the page (what the status line shows, the row of a task, the
// log lines), each waited for with a deadline.
//
// Chromium: /usr/bin/chromium (Debian's package chromium; scripts/test installs it), or
// CHROMIUM. Playwright's own browser downloads are never used.

import { access, constants, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
/** Where screenshots are left. */
export const ARTIFACTS = path.resolve(here, "../..", "target", "test-artifacts");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// A fresh profile each time (launchPersistentContext), and nothing that reaches the network
// by itself: this machine may have none.
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
/** Deadline of every wait on the page: a browser on a loaded 2-core machine. */
export const UI_MS = 15_000;

/** Runs `body(context, messages)` in a fresh headless Chromium; the pages' console messages are printed if it fails. */
export async function inChromium(body) {
  try {
    await access(CHROMIUM, constants.X_OK);
  } catch {
    throw new Error(
      `no Chromium at ${CHROMIUM}: install Debian's chromium (apt-get install chromium; ` +
        "scripts/test does) or set CHROMIUM to a Chromium binary",
    );
  }
  const profile = await mkdtemp(path.join(os.tmpdir(), "fanout-chromium-"));
  const messages = [];
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_FLAGS,
      viewport: { width: 1280, height: 860 },
    });
    await body(context, messages);
  } catch (err) {
    process.stderr.write(`\n=== browser console ===\n${messages.join("\n")}\n=== end of browser console ===\n`);
    throw err;
  } finally {
    await context?.close().catch(() => {});
    await rm(profile, { recursive: true, force: true });
  }
}

/** A new page whose console and uncaught errors are recorded; `page.errors` must stay empty. */
export async function newPage(context, messages) {
  const page = await context.newPage();
  page.errors = [];
  page.on("console", (m) => messages.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (err) => {
    messages.push(`[pageerror] ${err.message}`);
    page.errors.push(err.message);
  });
  return page;
}

const exactly = (text) => new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);

/** Waits until the element `#id` shows exactly `text`. */
export function shows(page, id, text) {
  return page.locator(`#${id}`, { hasText: exactly(String(text)) }).waitFor({ timeout: UI_MS });
}

/** Waits until the row of `taskId` shows `status`. */
export function statusOf(page, taskId, status) {
  return page
    .locator("#executions tr")
    .filter({ has: page.getByRole("button", { name: taskId, exact: true }) })
    .locator(`td.status[data-status="${status}"]`)
    .waitFor({ timeout: UI_MS });
}

/** `[taskId, status]` of every row, top to bottom. */
export function rows(page) {
  return page.$$eval("#executions tr", (trs) => trs.map((tr) => [tr.dataset.taskId, tr.querySelector(".status").textContent]));
}

/** The log lines shown, in order. */
export function logLines(page) {
  return page.$$eval("#logs li", (lis) => lis.map((li) => li.textContent));
}

export async function select(page, taskId) {
  await page.getByRole("button", { name: taskId, exact: true }).click({ timeout: UI_MS });
  await shows(page, "selected", `of ${taskId}`);
}

