// The wire contract of fanout for dashboards (docs/protocol.md), as types: the Socket.IO
// events in both directions, for `io<ServerToClientEvents, ClientToServerEvents>(...)`, and the
// answers of the REST API (src/api.rs, rendered by src/store/read.rs).
//
// Types only: nothing here runs. They describe what fanout sends; what workers put in the
// events' data beyond the fields fanout requires is theirs, and typed as `unknown`.

/** An organization or user id: as the token (or the worker) spells it, text or a non-negative integer. */
export type Id = string | number;

/**
 * The status of an execution. With a history (`DATABASE_URL`), fanout refuses any other
 * value at ingest; without one, `status` is whatever the worker sent.
 */
export type ExecutionStatus = "PENDING" | "RUNNING" | "PASSED" | "FAILED" | "ERROR" | "CANCELLED";

/** Every status, in the order of the REST API's error message. */
export const EXECUTION_STATUSES: readonly ExecutionStatus[] = ["PENDING", "RUNNING", "PASSED", "FAILED", "ERROR", "CANCELLED"];

/** The statuses after which an execution does not change any more (`finishedAt` is set). */
export const FINAL_STATUSES: readonly ExecutionStatus[] = ["PASSED", "FAILED", "ERROR", "CANCELLED"];

// ---------------------------------------------------------------------------------------
// Socket.IO

/**
 * The second argument of a durable event: its sequence number in its organization (1, 2,
 * 3, ...: increasing, no gaps in the organization, though a user sees only the numbers of
 * events meant for it). Ephemeral events (published straight into Redis, or by a
 * deployment without history) have no second argument.
 */
export interface EventMeta {
  seq: number;
}

/** `auth` of `io(url, { auth })`: what fanout reads on every (re)connection. */
export interface AuthPayload {
  /** The dashboard's JWT (claims `userId`, `organizationId`, `role`, `exp`); a leading `Bearer ` is tolerated. */
  token: string;
  /**
   * The highest `meta.seq` seen: the durable events after it are replayed first. `0`:
   * everything kept; absent or `null`: live events only. A decimal string is accepted too.
   */
  lastSeq?: number | string | null;
}

/** `auth-success`: the socket is in its organization's room; what is published from now on reaches it. */
export interface AuthSuccess {
  message: string;
  organizationId: Id;
  userId: Id;
  role: string;
}

/** Why fanout refused a socket (or ended its session), always followed by a server disconnect. */
export type AuthErrorMessage =
  | "Authentication required"
  | "Invalid or expired token"
  | "Too many connections"
  | "Token expired";

/** `auth-error`: the socket is refused and disconnected; the stock client does not reconnect by itself. */
export interface AuthError {
  error: AuthErrorMessage;
}

/**
 * `execution-updated`: the body of the worker's `POST /executions/update`, unchanged (key
 * order included).
 */
export interface ExecutionUpdate {
  organizationId: Id;
  taskId: Id;
  status: ExecutionStatus;
  [field: string]: unknown;
}

/** `execution-log`: the body of the worker's `POST /executions/log`, unchanged. */
export interface ExecutionLog {
  organizationId: Id;
  taskId: Id;
  /** Usually a line of text; whatever JSON the worker sent. */
  log: unknown;
  [field: string]: unknown;
}

/** Why the missed events cannot be replayed (the `reason` of `resync-required`). */
export type ResyncReason =
  /** more than `FANOUT_REPLAY_MAX` events are missing */
  | "too_far_behind"
  /** some of them are older than `FANOUT_EVENT_RETENTION` and were deleted */
  | "expired"
  /** `lastSeq` is beyond the newest event (the history was reset or restored) */
  | "unknown_seq"
  /** `lastSeq` is not a non-negative integer */
  | "invalid_last_seq"
  /** PostgreSQL is unreachable */
  | "history_unavailable";

/**
 * `resync-required`: instead of a replay (or, on a connected socket, after events the
 * replica could not read back). Refetch the state over REST; the live events after
 * `latestSeq` follow on the same socket.
 */
export interface ResyncRequired {
  reason: ResyncReason;
  /** The position the replay was asked from (`0` when `lastSeq` was invalid). */
  lastSeq: number;
  /** The newest event that will not be sent. */
  latestSeq: number;
}

/** The answer to `auth-refresh`. Refused: the session keeps its old expiry. */
export type AuthRefreshAck =
  | { ok: true; exp: number }
  | { ok: false; error: "Authentication required" | "Invalid or expired token" | "Token is for another organization or user" };

/**
 * What fanout emits to a dashboard. Events of `POST /v1/publish` are the application's own:
 * add them with an intersection, e.g.
 * `ServerToClientEvents & { "report.ready": (data: Report, meta?: EventMeta) => void }`.
 */
export interface ServerToClientEvents {
  "auth-success": (data: AuthSuccess) => void;
  "auth-error": (data: AuthError) => void;
  "execution-updated": (data: ExecutionUpdate, meta?: EventMeta) => void;
  "execution-log": (data: ExecutionLog, meta?: EventMeta) => void;
  "resync-required": (data: ResyncRequired) => void;
}

/** What a dashboard may emit. */
export interface ClientToServerEvents {
  /** Extends the session to the new token's `exp` (same organization and user). */
  "auth-refresh": (payload: { token: string }, ack: (answer: AuthRefreshAck) => void) => void;
}

// ---------------------------------------------------------------------------------------
// REST API (public listener, `Authorization: Bearer <jwt>`; the organization is the token's)

/** One execution: the row fanout keeps for a task, merged from its updates. */
export interface Execution<Data extends object = ExecutionUpdate> {
  /** Always text here (an integer `taskId` of a worker is kept as its decimal text); `data.taskId` is as sent. */
  taskId: string;
  status: ExecutionStatus;
  /** RFC 3339, UTC, milliseconds: the first update that was not `PENDING`. */
  startedAt: string | null;
  /** The last update with a final status. */
  finishedAt: string | null;
  updatedAt: string;
  /** The sequence number of the last event applied to this execution. */
  lastSeq: number;
  /** The top-level merge of all its updates' bodies. */
  data: Data;
}

/** `GET /v1/executions`: most recently updated first; follow `nextCursor` until it is `null`. */
export interface ExecutionPage<Data extends object = ExecutionUpdate> {
  executions: Execution<Data>[];
  nextCursor: string | null;
}

/** One `POST /executions/log` body, as the worker sent it. */
export interface LogChunk<Data extends object = ExecutionLog> {
  seq: number;
  data: Data;
  createdAt: string;
}

/**
 * `GET /v1/executions/{taskId}/logs`: in `seq` order; ask again with
 * `afterSeq: nextAfterSeq` until fewer than `limit` come back.
 */
export interface LogPage<Data extends object = ExecutionLog> {
  logs: LogChunk<Data>[];
  nextAfterSeq: number;
}

/** Query of `GET /v1/executions`. */
export interface ExecutionsQuery {
  status?: ExecutionStatus;
  /** 1-500, default 50. */
  limit?: number;
  /** The `nextCursor` of the previous page, unchanged. */
  cursor?: string;
}

/** Query of `GET /v1/executions/{taskId}/logs`. */
export interface LogsQuery {
  /** Only chunks with a greater `seq` (default 0). */
  afterSeq?: number;
  /** 1-5000, default 500. */
  limit?: number;
}

/** Every refusal of the REST API: 400, 401, 404, 405, 429 (with `Retry-After`), 503. */
export interface ApiErrorBody {
  error: string;
}
