// The dashboard's logic: what any dashboard of fanout does (docs/protocol.md), in one file.
//
//   1. the state over REST: GET /v1/executions with the token (and a task's logs when it is
//      selected); a deployment without history answers 404, and the page goes live-only;
//   2. the stock socket.io-client with `auth: (cb) => cb({ token, lastSeq })`, so that every
//      (re)connection asks for what this page missed since the highest seq it has seen;
//   3. execution-updated / execution-log applied once each (by their seq), resync-required
//      answered by reloading over REST.
//
// Everything that comes from the network is shown with textContent: nothing is parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FINAL = new Set(["PASSED", "FAILED", "ERROR", "CANCELLED"]);
  const MAX_ROWS = 200;
  const MAX_LINES = 1000;
  const LOG_PAGE = 500;

  let session = null; // the current connection's state, replaced by each Connect

  // --- settings: the form, the URL fragment (#token=...&url=...), this tab's storage -------

  const fragment = new URLSearchParams(location.hash.slice(1));
  $("token").value = fragment.get("token") ?? sessionStorage.getItem("fanout-token") ?? "";
  $("url").value = fragment.get("url") ?? sessionStorage.getItem("fanout-url") ?? "";
  if (fragment.has("token")) {
    // Out of the address bar (history, shared screens), kept for this tab only.
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  if ($("token").value) start();

  function start() {
    const token = $("token").value.trim();
    let base = location.origin;
    if ($("url").value.trim()) {
      try {
        // fanout serves /socket.io/ and /v1/ at its root: only the origin is used.
        base = new URL($("url").value.trim()).origin;
      } catch {
        notice(`Not a URL: ${$("url").value}`);
        return;
      }
    }
    if (!token) return;
    sessionStorage.setItem("fanout-token", token);
    sessionStorage.setItem("fanout-url", $("url").value.trim());
    session?.socket?.disconnect();
    session = {
      token,
      base,
      executions: new Map(), // taskId -> { taskId, status, startedAt, finishedAt, updatedAt, lastSeq }
      logs: new Map(), // taskId -> { lines: [{ key, seq, text }], seqs: Set }
      selected: null,
      lastSeq: undefined, // highest seq seen: sent on every (re)connect
      history: undefined, // false once the deployment said it keeps none
      events: 0,
      sessions: 0,
      socket: null,
    };
    notice("");
    render();
    connect(session);
  }

  // --- REST -------------------------------------------------------------------------------

  /** GET on fanout with the token: the JSON body, or null when the deployment keeps no history. */
  async function rest(s, path) {
    const res = await fetch(`${s.base}${path}`, { headers: { Authorization: `Bearer ${s.token}` } });
    const body = await res.json().catch(() => ({}));
    if (res.ok) return body;
    if (res.status === 404 && /history is not enabled/.test(body.error ?? "")) {
      s.history = false;
      return null;
    }
    throw new Error(`${res.status} ${body.error ?? res.statusText}`);
  }

  /** The latest executions (one page: the table shows the most recent ones). */
  async function loadExecutions(s) {
    try {
      const page = await rest(s, `/v1/executions?limit=${MAX_ROWS}`);
      if (s !== session) return;
      if (!page) {
        notice("This deployment keeps no history (DATABASE_URL is not set): live updates only.");
        return;
      }
      s.history = true;
      for (const row of page.executions) {
        const id = String(row.taskId);
        const known = s.executions.get(id);
        if (!known || known.lastSeq === undefined || known.lastSeq < row.lastSeq) {
          const { status, startedAt, finishedAt, updatedAt, lastSeq } = row;
          s.executions.set(id, { taskId: id, status, startedAt, finishedAt, updatedAt, lastSeq });
        }
        seen(s, row.lastSeq);
      }
      // Nothing yet: from the first event on, whatever happens next is replayed.
      s.lastSeq ??= 0;
      render();
    } catch (err) {
      if (s === session) notice(`Could not load the executions (${err.message}): live updates only until the next reload.`);
    }
  }

  /** Every stored log chunk of `taskId`, merged with those that arrived live. */
  async function loadLogs(s, taskId) {
    if (s.history === false) return;
    try {
      for (let afterSeq = 0, pages = 0; pages < 20; pages++) {
        const path = `/v1/executions/${encodeURIComponent(taskId)}/logs?afterSeq=${afterSeq}&limit=${LOG_PAGE}`;
        const page = await rest(s, path);
        if (!page || s !== session) return;
        for (const chunk of page.logs) addLog(s, taskId, chunk.seq, chunk.data?.log);
        renderLogs();
        if (page.logs.length < LOG_PAGE) return;
        afterSeq = page.nextAfterSeq;
      }
    } catch (err) {
      if (s === session) notice(`Could not load the logs of ${taskId} (${err.message}).`);
    }
  }

  // --- Socket.IO --------------------------------------------------------------------------

  async function connect(s) {
    state("loading", "loading history");
    await loadExecutions(s);
    if (s !== session) return;
    const crossOrigin = s.base !== location.origin;
    s.socket = io(s.base, {
      // Called on every (re)connection: the latest lastSeq, so fanout replays what was missed.
      auth: (cb) => cb({ token: s.token, lastSeq: s.lastSeq }),
      // Another origin: send the balancer's affinity cookie along (long-polling stays on one
      // replica); fanout must then list this page's origin in FANOUT_CORS_ORIGINS.
      withCredentials: crossOrigin,
    });
    const socket = s.socket;
    const live = (handler) => (...args) => s === session && handler(...args);

    socket.on("connect", live(() => {
      state("authenticating", "authenticating");
      showTransport(socket);
      socket.io.engine.once("upgrade", live(() => showTransport(socket)));
    }));
    socket.on("auth-success", live(({ organizationId, userId }) => {
      s.sessions++;
      $("org").textContent = String(organizationId);
      $("user").textContent = String(userId);
      state("connected", "connected");
      render();
    }));
    socket.on("auth-error", live(({ error }) => {
      // fanout disconnects next; the client does not retry: a new token is needed.
      state("error", `auth-error: ${error}`);
      notice("Authentication failed: paste a valid token and Connect again.");
    }));
    socket.on("disconnect", live((reason) => {
      if ($("state").dataset.state === "error") return;
      state("disconnected", socket.active ? `disconnected (${reason}), reconnecting` : `disconnected (${reason})`);
    }));
    socket.on("connect_error", live((err) => {
      if (socket.active) state("disconnected", `cannot connect (${err.message}), retrying`);
      else state("error", `cannot connect: ${err.message}`);
    }));
    socket.on("execution-updated", live((data, meta) => {
      s.events++;
      applyUpdate(s, data, meta?.seq);
      render();
    }));
    socket.on("execution-log", live((data, meta) => {
      s.events++;
      if (data?.taskId !== undefined && data?.taskId !== null) {
        addLog(s, String(data.taskId), meta?.seq, data.log);
        if (String(data.taskId) === s.selected) renderLogs();
      }
      seen(s, meta?.seq);
      render();
    }));
    socket.on("resync-required", live(async ({ reason, latestSeq }) => {
      // Too much (or something unreadable) was missed to be replayed: reload over REST, and
      // continue after latestSeq (live events after it follow on this socket).
      notice(`fanout asked for a resync (${reason}): reloaded from the history.`);
      seen(s, latestSeq);
      await loadExecutions(s);
      if (s.selected !== null) await loadLogs(s, s.selected);
    }));
  }

  function showTransport(socket) {
    $("transport").textContent = `(${socket.io.engine?.transport?.name ?? "?"})`;
  }

  // --- state ------------------------------------------------------------------------------

  function seen(s, seq) {
    if (Number.isInteger(seq) && (s.lastSeq === undefined || seq > s.lastSeq)) s.lastSeq = seq;
  }

  function applyUpdate(s, data, seq) {
    if (data?.taskId === undefined || data?.taskId === null) return;
    const id = String(data.taskId);
    const known = s.executions.get(id);
    // Already in what REST returned (or a duplicate): applied once only.
    if (seq !== undefined && known?.lastSeq !== undefined && seq <= known.lastSeq) return;
    // The times are those of arrival; the history keeps the server's (same rules).
    const now = new Date().toISOString();
    const status = typeof data.status === "string" ? data.status : (known?.status ?? "");
    s.executions.set(id, {
      taskId: id,
      status,
      startedAt: known?.startedAt ?? (status && status !== "PENDING" ? now : null),
      finishedAt: FINAL.has(status) ? now : (known?.finishedAt ?? null),
      updatedAt: now,
      lastSeq: seq ?? known?.lastSeq,
    });
    seen(s, seq);
  }

  function addLog(s, taskId, seq, log) {
    let entry = s.logs.get(taskId);
    if (!entry) s.logs.set(taskId, (entry = { lines: [], seqs: new Set() }));
    if (seq !== undefined) {
      if (entry.seqs.has(seq)) return;
      entry.seqs.add(seq);
    }
    const text = typeof log === "string" ? log : JSON.stringify(log);
    // In seq order; a chunk without seq (published straight into Redis) where it arrived.
    const key = seq ?? (s.lastSeq ?? 0) + 0.5;
    entry.lines.push({ key, seq, text });
    if (entry.lines.length > 1 && entry.lines.at(-2).key > key) entry.lines.sort((a, b) => a.key - b.key);
    if (entry.lines.length > MAX_LINES) entry.lines.splice(0, entry.lines.length - MAX_LINES);
  }

  function select(taskId) {
    session.selected = taskId;
    render();
    renderLogs();
    loadLogs(session, taskId);
  }

  // --- rendering --------------------------------------------------------------------------

  function state(kind, text) {
    $("state").dataset.state = kind;
    $("state").textContent = text;
  }

  function notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }

  function time(iso) {
    const cell = document.createElement("td");
    if (iso) {
      cell.textContent = new Date(iso).toLocaleTimeString();
      cell.title = iso;
    }
    return cell;
  }

  function render() {
    const s = session;
    $("seq").textContent = s?.lastSeq ?? "-";
    $("events").textContent = s?.events ?? 0;
    $("reconnections").textContent = Math.max(0, (s?.sessions ?? 0) - 1);
    const rows = [...(s?.executions.values() ?? [])]
      .sort((a, b) => (b.updatedAt ?? "").localeCompare(a.updatedAt ?? "") || b.taskId.localeCompare(a.taskId))
      .slice(0, MAX_ROWS);
    $("executions").replaceChildren(...rows.map((e) => {
      const tr = document.createElement("tr");
      tr.dataset.taskId = e.taskId;
      if (e.taskId === s.selected) tr.className = "selected";
      const status = document.createElement("td");
      status.className = "status";
      status.dataset.status = e.status; // styled by attribute: never a class name from the network
      status.textContent = e.status;
      const task = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = e.taskId;
      button.addEventListener("click", () => select(e.taskId));
      task.append(button);
      tr.append(status, task, time(e.startedAt), time(e.finishedAt), time(e.updatedAt));
      return tr;
    }));
    $("empty").hidden = rows.length > 0;
  }

  function renderLogs() {
    const s = session;
    if (s?.selected === null || s?.selected === undefined) return;
    $("selected").textContent = `of ${s.selected}`;
    const lines = s.logs.get(s.selected)?.lines ?? [];
    $("logs").replaceChildren(...lines.map((line) => {
      const li = document.createElement("li");
      li.textContent = line.text;
      if (line.seq !== undefined) li.dataset.seq = line.seq;
      return li;
    }));
  }
})();
