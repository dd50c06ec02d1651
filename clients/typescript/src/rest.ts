// The REST API over the history, as three functions: what a dashboard reads when it opens
// and when fanout tells it to resync. Each request carries the current token, asked for at
// the time of the request, so a refreshed token is used from then on.

import type { ApiErrorBody, Execution, ExecutionPage, ExecutionsQuery, LogPage, LogsQuery } from "./protocol.js";

/** A refusal of the REST API: `status` and fanout's `error` text, which says what to fix. */
export class FanoutRestError extends Error {
  override name = "FanoutRestError";

  constructor(
    readonly status: number,
    /** fanout's `error`, or the status text when the answer was not fanout's JSON. */
    readonly error: string,
    /** Seconds, from `Retry-After` (429, 503), when given. */
    readonly retryAfter: number | null = null,
  ) {
    super(`fanout answered ${status}: ${error}`);
  }

  /** The deployment keeps no history (no `DATABASE_URL`): retrying does not help, live events still arrive. */
  get historyDisabled(): boolean {
    return this.status === 404 && this.error.startsWith("history is not enabled");
  }

  /** Worth retrying later: 429, 503, or no answer at all. */
  get retryable(): boolean {
    return this.status === 429 || this.status >= 500;
  }
}

/** fanout's REST API for one token's organization. */
export interface FanoutRest {
  /** One page of executions, most recently updated first (`GET /v1/executions`). */
  executions(query?: ExecutionsQuery): Promise<ExecutionPage>;
  /** One execution, or `null` when the organization has no such task (`GET /v1/executions/{taskId}`). */
  execution(taskId: string | number): Promise<Execution | null>;
  /** One page of a task's log chunks (`GET /v1/executions/{taskId}/logs`). */
  logs(taskId: string | number, query?: LogsQuery): Promise<LogPage>;
}

export interface RestOptions {
  /** fanout's origin (it serves `/v1/` at its root). */
  url: string;
  /** The current token; called for each request. */
  token: () => string | Promise<string>;
  /** `fetch` to use: the global one by default. */
  fetch?: typeof fetch;
}

/** The REST API of fanout at `url`, authenticated with `token()`. */
export function createRest({ url, token, fetch: fetchImpl }: RestOptions): FanoutRest {
  const origin = new URL(url).origin;

  async function get<T>(path: string, query: Record<string, string | number | undefined> = {}): Promise<T> {
    const target = new URL(path, origin);
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined) target.searchParams.set(name, String(value));
    }
    const bearer = (await token()).replace(/^Bearer\s+/i, "");
    const res = await (fetchImpl ?? fetch)(target, { headers: { Authorization: `Bearer ${bearer}` } });
    const text = await res.text();
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      body = undefined;
    }
    if (res.ok && body !== undefined) return body as T;
    const error = typeof (body as ApiErrorBody | undefined)?.error === "string" ? (body as ApiErrorBody).error : res.statusText || text;
    const retryAfter = Number.parseInt(res.headers.get("retry-after") ?? "", 10);
    throw new FanoutRestError(res.status, error, Number.isNaN(retryAfter) ? null : retryAfter);
  }

  const task = (taskId: string | number) => `/v1/executions/${encodeURIComponent(String(taskId))}`;

  return {
    executions: (query = {}) => get<ExecutionPage>("/v1/executions", { ...query }),
    async execution(taskId) {
      try {
        return await get<Execution>(task(taskId));
      } catch (err) {
        if (err instanceof FanoutRestError && err.status === 404 && err.error === "execution not found") return null;
        throw err;
      }
    },
    logs: (taskId, query = {}) => get<LogPage>(`${task(taskId)}/logs`, { ...query }),
  };
}
