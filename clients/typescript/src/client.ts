// A dashboard's connection to fanout, with the parts every dashboard must otherwise get
// right by hand (docs/protocol.md):
//
// - every (re)connection sends `lastSeq`, the highest sequence number applied, kept in a
//   storage so that a reloaded page resumes where it was;
// - events reach the application once each and in order: one queue takes every event in
//   arrival order, and a durable event at or below `lastSeq` is dropped;
// - when a replay cannot be had (`resync-required`), or a connection could not ask for one
//   (nothing seen yet), the application's `refetch` reloads the state over REST while the
//   events that arrive meanwhile wait in the queue; then they are applied on top;
// - the token is refreshed before its `exp` (`auth-refresh`), and a session fanout ended
//   for an expired token is reopened with a new one.
//
// The queue is what keeps it simple: events, refetches and the moves of `lastSeq` happen one
// after the other in the order the socket saw them, so no handler ever runs during a
// refetch, and nothing is applied twice whichever way a replay and a refetch overlap.

import { io, type ManagerOptions, type Socket, type SocketOptions } from "socket.io-client";
import type {
  AuthPayload,
  AuthRefreshAck,
  AuthSuccess,
  ClientToServerEvents,
  EventMeta,
  ExecutionLog,
  ExecutionUpdate,
  Id,
  ResyncRequired,
  ResyncReason,
  ServerToClientEvents,
} from "./protocol.js";
import { createRest, type FanoutRest, FanoutRestError } from "./rest.js";
import { defaultStorage, loadSeq, saveSeq, type SeqStorage } from "./storage.js";
import { readClaims } from "./token.js";

/** Why `refetch` is called. */
export type RefetchReason =
  | ResyncReason
  /** the connection carried no `lastSeq` (first start, or no durable event seen yet): nothing could be replayed */
  | "no_last_seq";

export interface RefetchContext {
  reason: RefetchReason;
  /** From `resync-required`: the newest event that will not be sent (the live ones after it follow). */
  latestSeq: number | null;
  /** The REST API, with the client's current token. */
  rest: FanoutRest;
}

/** Where the connection stands. */
export type FanoutStatus =
  | { state: "connecting" }
  | { state: "live"; organizationId: Id; userId: Id; role: string }
  | { state: "reconnecting"; reason: string }
  /** fanout refused the token and no new one from `getToken()` passed: log in again, then create a new client */
  | { state: "unauthorized"; error: string }
  | { state: "closed" };

export interface FanoutClientOptions {
  /** fanout's origin, e.g. `https://fanout.example.com` (it serves `/socket.io/` and `/v1/` at its root). */
  url: string;
  /** The application's token source: called at start, before each refresh, and after fanout refused a token. */
  getToken: () => string | Promise<string>;
  /**
   * Reload the application's state over REST (e.g. `rest.executions()`). Called on
   * `resync-required`, and after a connection that could ask for no replay. Events wait
   * until it settles; a failure is reported to `onError` and retried with backoff when it
   * may pass (429, 503, no answer). Without it, the client just carries on after `latestSeq`.
   */
  refetch?: (context: RefetchContext) => void | Promise<void>;
  /** `execution-updated`, once per durable event, in order (ephemeral ones as they come, `meta` undefined). */
  onUpdate?: (update: ExecutionUpdate, meta: EventMeta | undefined) => void;
  /** `execution-log`, the same way. */
  onLog?: (log: ExecutionLog, meta: EventMeta | undefined) => void;
  /** Any other event (those of `POST /v1/publish`), the same way. */
  onEvent?: (event: string, data: unknown, meta: EventMeta | undefined) => void;
  onStatus?: (status: FanoutStatus) => void;
  /** What went wrong and was handled (a refused refresh, a failed refetch, a throwing handler). Default: `console.error`. */
  onError?: (error: Error) => void;
  /**
   * Where `lastSeq` survives a reload: `localStorage` when there is one (the default), any
   * object with `getItem`/`setItem`/`removeItem` (`memoryStorage()` in Node), or `null` for none.
   */
  storage?: SeqStorage | null;
  /** The key in `storage`; by default one per fanout origin, organization and user, from the first token. */
  storageKey?: string;
  /** Refresh this many seconds before `exp` (at most half of the token's remaining life). Default 60. */
  refreshBeforeExp?: number;
  /** More options of socket.io-client's `io()` (`transports`, `withCredentials`, ...); `auth` is the client's own. */
  socketOptions?: Omit<Partial<ManagerOptions & SocketOptions>, "auth">;
}

export interface FanoutClient {
  /** The REST API with the current token. */
  readonly rest: FanoutRest;
  /** The Socket.IO socket, typed: for what the client does not cover. */
  readonly socket: Socket<ServerToClientEvents, ClientToServerEvents>;
  /** The highest sequence number applied (`null`: none yet), what the next connection sends. */
  readonly lastSeq: number | null;
  readonly status: FanoutStatus;
  /** Disconnects, stops the timers; no callback runs afterwards. */
  close(): void;
}

/** How long `auth-refresh` may go unanswered. */
const ACK_TIMEOUT_MS = 10_000;
/** Consecutive refusals after which a new token is not tried any more. */
const MAX_AUTH_RETRIES = 3;
const BACKOFF_MS = { first: 1000, max: 30_000 };

/** Connects to fanout at once; see `FanoutClientOptions`. */
export function createFanoutClient(options: FanoutClientOptions): FanoutClient {
  return new Client(options);
}

class Client implements FanoutClient {
  readonly rest: FanoutRest;
  readonly socket: Socket<ServerToClientEvents, ClientToServerEvents>;
  status: FanoutStatus = { state: "connecting" };
  lastSeq: number | null = null;

  readonly #options: FanoutClientOptions;
  readonly #origin: string;
  readonly #storage: SeqStorage | null;
  #storageKey: string | null = null;
  #token: string | null = null;
  #exp: number | null = null;
  /** The `lastSeq` the current connection sent (`undefined`: not connected yet). */
  #askedFrom: number | null | undefined = undefined;
  /**
   * Where the last `resync-required` received says to continue from, until its refetch is
   * done and `lastSeq` moves there: a reconnection meanwhile asks from there (the refetch
   * covers what is before), and is not told to resync again.
   */
  #resync: { to: number | null } | null = null;
  /** Every event and refetch, one after the other, in arrival order. */
  #queue: Promise<void> = Promise.resolve();
  #refusal: { error: string; token: string | null } | null = null;
  #authRetries = 0;
  #historyDisabled = false;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #sleeps = new Set<ReturnType<typeof setTimeout>>();
  #closed = false;

  constructor(options: FanoutClientOptions) {
    this.#options = options;
    this.#origin = new URL(options.url, (globalThis as { location?: { href: string } }).location?.href).origin;
    this.#storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.rest = createRest({ url: this.#origin, token: () => this.#currentToken() });
    this.socket = io(this.#origin, {
      forceNew: true,
      ...options.socketOptions,
      auth: (cb: (payload: AuthPayload | Record<string, never>) => void) => {
        this.#authPayload().then(cb, (err) => {
          // fanout answers auth-error "Authentication required"; the disconnect that
          // follows asks getToken() again.
          this.#report(err, "getToken() failed; connecting without a token");
          cb({});
        });
      },
    });
    this.socket.onAny((event: string, ...args: unknown[]) => this.#receive(event, args));
    this.socket.on("auth-error", ({ error }) => {
      this.#refusal = { error, token: this.#token };
    });
    this.socket.on("disconnect", (reason) => this.#disconnected(reason));
    this.socket.on("connect_error", (err) => {
      if (this.socket.active) this.#setStatus({ state: "reconnecting", reason: err.message });
    });
  }

  close(): void {
    if (this.#closed) return;
    this.#setStatus({ state: "closed" });
    this.#closed = true;
    clearTimeout(this.#refreshTimer);
    for (const timer of this.#sleeps) clearTimeout(timer);
    this.socket.offAny();
    this.socket.off();
    this.socket.disconnect();
  }

  // --- tokens -------------------------------------------------------------------------

  /** The token to use now: the current one while it has not expired, else a new one. */
  async #currentToken(): Promise<string> {
    if (this.#token === null || (this.#exp !== null && this.#exp * 1000 <= Date.now())) {
      this.#adopt(await this.#options.getToken());
    }
    return this.#token as string;
  }

  /** Makes `token` the current one, and schedules its refresh. */
  #adopt(token: string): void {
    const claims = readClaims(token);
    this.#token = token;
    this.#exp = claims.exp ?? null;
    if (this.#storageKey === null) {
      this.#storageKey =
        this.#options.storageKey ??
        ["fanout", "lastSeq", this.#origin, claims.organizationId ?? "", claims.userId ?? ""].map((p) => encodeURIComponent(String(p))).join(":");
      const stored = loadSeq(this.#storage, this.#storageKey);
      if (stored !== null && (this.lastSeq === null || stored > this.lastSeq)) this.lastSeq = stored;
    }
    this.#scheduleRefresh();
  }

  #scheduleRefresh(retryMs?: number): void {
    clearTimeout(this.#refreshTimer);
    if (this.#closed || this.#exp === null) return;
    const left = this.#exp * 1000 - Date.now();
    if (left <= 0) return; // the next connection gets a new token
    const before = Math.min((this.#options.refreshBeforeExp ?? 60) * 1000, left / 2);
    // A retry comes at most every second: a source with nothing newer is not asked in a loop.
    const wait = retryMs === undefined ? left - before : Math.min(retryMs, Math.max(1000, left / 2));
    this.#refreshTimer = setTimeout(() => void this.#refresh(), wait);
  }

  /** A new token from `getToken`, handed to the session with `auth-refresh` when connected. */
  async #refresh(): Promise<void> {
    const retry = () => this.#scheduleRefresh(5000);
    // Another token adopted meanwhile (a reconnection after the session ended) is newer
    // than whatever this refresh ends with.
    const replaced = (() => {
      const current = this.#token;
      return () => this.#closed || this.#token !== current;
    })();
    let fresh: string;
    try {
      fresh = await this.#options.getToken();
    } catch (err) {
      if (replaced()) return;
      this.#report(err, "getToken() failed while refreshing the token");
      return retry();
    }
    if (replaced()) return;
    const exp = readClaims(fresh).exp;
    if (this.#exp !== null && exp !== undefined && exp <= this.#exp) {
      this.#report(new Error(`getToken() returned a token that expires no later than the current one (exp ${exp})`));
      return retry();
    }
    if (!this.socket.connected) {
      // The next connection sends it.
      this.#adopt(fresh);
      return;
    }
    let ack: AuthRefreshAck;
    try {
      ack = await this.socket.timeout(ACK_TIMEOUT_MS).emitWithAck("auth-refresh", { token: fresh });
    } catch {
      if (replaced()) return;
      if (!this.socket.connected) {
        this.#adopt(fresh);
        return;
      }
      this.#report(new Error(`auth-refresh had no answer within ${ACK_TIMEOUT_MS / 1000} s`));
      return retry();
    }
    if (replaced()) return;
    if (ack.ok) {
      this.#adopt(fresh);
    } else {
      this.#report(new Error(`fanout refused the refreshed token (${ack.error}); the session ends at the old exp`));
      retry();
    }
  }

  /** What a (re)connection sends: the current token, and `lastSeq` once there is one. */
  async #authPayload(): Promise<AuthPayload> {
    const token = await this.#currentToken();
    const lastSeq = this.#resync ? this.#resync.to : this.lastSeq;
    this.#askedFrom = lastSeq;
    return lastSeq === null ? { token } : { token, lastSeq };
  }

  // --- the connection ---------------------------------------------------------------

  #disconnected(reason: string): void {
    if (this.#closed) return;
    if (reason !== "io server disconnect") {
      this.#setStatus({ state: "reconnecting", reason });
      return;
    }
    // fanout refused the socket or ended its session (auth-error came first); the stock
    // client does not reconnect by itself. With a new token it may pass.
    const refusal = this.#refusal ?? { error: "disconnected by the server", token: this.#token };
    if (refusal.error === "Too many connections" || this.#authRetries >= MAX_AUTH_RETRIES) {
      this.#unauthorized(refusal.error);
      return;
    }
    this.#authRetries++;
    this.#setStatus({ state: "reconnecting", reason: refusal.error });
    void (async () => {
      let fresh: string;
      try {
        fresh = await this.#options.getToken();
      } catch (err) {
        this.#report(err, "getToken() failed after fanout refused the token");
        return this.#unauthorized(refusal.error);
      }
      const exp = readClaims(fresh).exp;
      if (this.#closed) return;
      if (fresh === refusal.token || (exp !== undefined && exp * 1000 <= Date.now())) {
        return this.#unauthorized(refusal.error);
      }
      this.#adopt(fresh);
      await this.#sleep(backoff(this.#authRetries - 1));
      if (!this.#closed) this.socket.connect();
    })();
  }

  #unauthorized(error: string): void {
    this.#report(new Error(`fanout refused the token: ${error}`));
    this.#setStatus({ state: "unauthorized", error });
  }

  // --- events, in order ---------------------------------------------------------------

  #receive(event: string, args: unknown[]): void {
    if (this.#closed) return;
    if (event === "auth-error") return; // handled by its listener; the disconnect follows
    if (event === "auth-success") {
      const success = args[0] as AuthSuccess;
      const askedFrom = this.#askedFrom;
      this.#refusal = null;
      this.#authRetries = 0;
      this.#setStatus({ state: "live", organizationId: success.organizationId, userId: success.userId, role: success.role });
      // Nothing could be replayed: the state is loaded now that live events are arriving,
      // so that none falls between the two.
      if (askedFrom === null && !this.#historyDisabled && this.#options.refetch) {
        this.#enqueue(() => this.#refetch("no_last_seq", null));
      }
      return;
    }
    if (event === "resync-required") {
      const { reason, latestSeq } = args[0] as ResyncRequired;
      // Continue after latestSeq, even below lastSeq (the history was reset: its numbers
      // start again). 0 names no event (lastSeq was invalid, or the replica does not know
      // where the history ends yet): no position, until the next durable event gives one.
      const resync = { to: latestSeq > 0 ? latestSeq : null };
      this.#resync = resync;
      this.#enqueue(async () => {
        await this.#refetch(reason, latestSeq);
        this.#moveTo(resync.to);
        if (this.#resync === resync) this.#resync = null;
      });
      return;
    }
    const [data, meta] = args;
    const seq = isMeta(meta) ? meta.seq : undefined;
    this.#enqueue(() => {
      if (seq !== undefined) {
        if (this.lastSeq !== null && seq <= this.lastSeq) return; // already applied
        this.#advance(seq);
      }
      const m = seq === undefined ? undefined : { seq };
      if (event === "execution-updated") this.#options.onUpdate?.(data as ExecutionUpdate, m);
      else if (event === "execution-log") this.#options.onLog?.(data as ExecutionLog, m);
      else this.#options.onEvent?.(event, data, m);
    });
  }

  #enqueue(step: () => void | Promise<void>): void {
    this.#queue = this.#queue.then(async () => {
      if (this.#closed) return;
      try {
        await step();
      } catch (err) {
        this.#report(err, "a handler threw");
      }
    });
  }

  #advance(seq: number): void {
    if (this.lastSeq === null || seq > this.lastSeq) this.#moveTo(seq);
  }

  /** `lastSeq` becomes `seq`, here and in the storage. */
  #moveTo(seq: number | null): void {
    this.lastSeq = seq;
    if (this.#storageKey !== null) saveSeq(this.#storage, this.#storageKey, seq);
  }

  /** Runs the application's `refetch` until it succeeds, or fails in a way retrying cannot help. */
  async #refetch(reason: RefetchReason, latestSeq: number | null): Promise<void> {
    const refetch = this.#options.refetch;
    if (!refetch) return;
    for (let attempt = 0; !this.#closed; attempt++) {
      try {
        await refetch({ reason, latestSeq, rest: this.rest });
        return;
      } catch (err) {
        if (this.#closed) return;
        this.#report(err, `refetch (${reason}) failed`);
        if (err instanceof FanoutRestError && !err.retryable) {
          // Without a history there is nothing to load, now or later: live events only.
          if (err.historyDisabled) this.#historyDisabled = true;
          return;
        }
        await this.#sleep(err instanceof FanoutRestError && err.retryAfter !== null ? err.retryAfter * 1000 : backoff(attempt));
      }
    }
  }

  // --- small things -------------------------------------------------------------------

  #setStatus(status: FanoutStatus): void {
    if (this.#closed) return;
    this.status = status;
    try {
      this.#options.onStatus?.(status);
    } catch (err) {
      this.#report(err, "onStatus threw");
    }
  }

  #report(err: unknown, context?: string): void {
    if (this.#closed) return;
    const error = err instanceof Error ? err : new Error(String(err));
    const reported = context ? new Error(`fanout client: ${context}: ${error.message}`, { cause: error }) : error;
    try {
      (this.#options.onError ?? console.error)(reported);
    } catch {
      // The application's error handler failed: nothing left to tell.
    }
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#sleeps.delete(timer);
        resolve();
      }, ms);
      this.#sleeps.add(timer);
    });
  }
}

const isMeta = (value: unknown): value is EventMeta =>
  typeof value === "object" && value !== null && Number.isSafeInteger((value as EventMeta).seq);

/** 1 s, 2 s, 4 s, ... at most 30 s, with jitter so that a fleet of pages does not come back at once. */
const backoff = (attempt: number) => Math.min(BACKOFF_MS.max, BACKOFF_MS.first * 2 ** attempt) * (0.5 + Math.random() / 2);
