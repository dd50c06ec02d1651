// The dashboard's `useExecutions` hook on top of `createFanoutClient`, with React Query as
// the store: the list comes from `GET /v1/executions`, live events are written into the
// query cache with `setQueryData`, and fanout's `resync-required` refetches the queries.
//
// What the hook no longer does by hand: keeping `lastSeq` (across reloads too), sending it
// on every reconnection, dropping events it has applied, reloading on `resync-required`,
// refreshing the token before it expires. What stays here is the application's part: how an
// event changes a row.
//
// One rule makes the cache right whatever arrives first, the page loaded on mount or an
// event: a row is replaced only by a newer one, by its `lastSeq`. The query functions merge
// what they fetched into what the cache holds by that rule, and so do the events. Only the
// client's `refetch` replaces the cache outright: it runs when fanout could not replay
// (the history may even have been reset, its numbers starting again), and no event is
// applied while it runs.

import { useEffect, useMemo, useRef, useState } from "react";
import { useQuery, useQueryClient } from "@tanstack/react-query";
import {
  createFanoutClient,
  createRest,
  FanoutRestError,
  FINAL_STATUSES,
  type EventMeta,
  type Execution,
  type ExecutionLog,
  type ExecutionUpdate,
  type FanoutStatus,
  type LogChunk,
} from "@fanout/client";

export interface FanoutConnection {
  /** fanout's origin, e.g. `https://fanout.example.com`. */
  url: string;
  /** The app's token source (called for each connection, REST request and refresh). */
  getToken: () => string | Promise<string>;
}

/** The rows the table shows: the most recently updated executions. */
const MAX_ROWS = 200;
const LOG_PAGE = 500;

const executionsKey = (url: string) => ["fanout", url, "executions"] as const;
const logsKey = (url: string, taskId: string) => ["fanout", url, "logs", taskId] as const;

/**
 * The organization's executions, most recently updated first, kept live; and the state of
 * the connection. Mount it once per page (it holds the page's one socket); the logs of a
 * task are `useExecutionLogs`, fed by this hook's socket.
 */
export function useExecutions({ url, getToken }: FanoutConnection) {
  const queryClient = useQueryClient();
  const tokenSource = useLatest(getToken);
  const rest = useMemo(() => createRest({ url, token: () => tokenSource.current() }), [url, tokenSource]);
  const [status, setStatus] = useState<FanoutStatus>({ state: "connecting" });

  const executions = useQuery({
    queryKey: executionsKey(url),
    queryFn: async () => {
      const page = await rest.executions({ limit: MAX_ROWS });
      return mergeRows(queryClient.getQueryData<Execution[]>(executionsKey(url)), page.executions);
    },
    // The socket keeps it fresh; fanout says when it cannot (resync-required).
    staleTime: Infinity,
    retry: retryable,
  });

  useEffect(() => {
    const fanout = createFanoutClient({
      url,
      getToken: () => tokenSource.current(),
      onStatus: setStatus,
      onUpdate: (update, meta) => {
        queryClient.setQueryData<Execution[]>(executionsKey(url), (rows) => applyUpdate(rows, update, meta));
      },
      onLog: (log, meta) => {
        // Only into the logs someone is looking at (a query that exists; the others are
        // fetched when opened), and only the history's (a chunk published straight into
        // Redis has no seq, and no place in it).
        if (!meta) return;
        queryClient.setQueryData<LogChunk[]>(logsKey(url, String(log.taskId)), (chunks) => chunks && addChunk(chunks, log, meta.seq));
      },
      // What fanout could not replay: the state as REST has it now replaces the cache
      // (events wait meanwhile, then are applied on top), and the open logs load again.
      refetch: async ({ rest }) => {
        const page = await rest.executions({ limit: MAX_ROWS });
        queryClient.setQueryData<Execution[]>(executionsKey(url), newestFirst(page.executions));
        await queryClient.resetQueries({ queryKey: ["fanout", url, "logs"] });
      },
      onError: (error) => console.warn(error.message),
    });
    return () => fanout.close();
  }, [url, queryClient, tokenSource]);

  return {
    executions: executions.data ?? [],
    isLoading: executions.isLoading,
    /** The REST error, if the list could not be loaded (a deployment without history says so here). */
    error: executions.error,
    status,
  };
}

/** Every stored log chunk of `taskId`, in `seq` order, then those that arrive live. */
export function useExecutionLogs({ url, getToken }: FanoutConnection, taskId: string | null) {
  const queryClient = useQueryClient();
  const tokenSource = useLatest(getToken);
  const rest = useMemo(() => createRest({ url, token: () => tokenSource.current() }), [url, tokenSource]);
  return useQuery({
    queryKey: logsKey(url, taskId ?? ""),
    enabled: taskId !== null,
    staleTime: Infinity,
    retry: retryable,
    queryFn: async () => {
      const fetched: LogChunk[] = [];
      for (let afterSeq = 0; ; ) {
        const page = await rest.logs(taskId as string, { afterSeq, limit: LOG_PAGE });
        fetched.push(...page.logs);
        if (page.logs.length < LOG_PAGE) break;
        afterSeq = page.nextAfterSeq;
      }
      const cached = queryClient.getQueryData<LogChunk[]>(logsKey(url, taskId as string)) ?? [];
      return cached.reduce((chunks, chunk) => addChunk(chunks, chunk.data, chunk.seq, chunk.createdAt), fetched);
    },
  });
}

// --- how events change the cache: pure functions -------------------------------------------

/** `rows` with `update` applied, unless a row already reflects it (same or later `lastSeq`). */
export function applyUpdate(rows: Execution[] | undefined, update: ExecutionUpdate, meta: EventMeta | undefined): Execution[] {
  const taskId = String(update.taskId);
  const known = rows?.find((row) => row.taskId === taskId);
  if (known && meta && meta.seq <= known.lastSeq) return rows as Execution[];
  // Times of arrival; the history keeps fanout's own, by the same rules.
  const now = new Date().toISOString();
  const row: Execution = {
    taskId,
    status: update.status,
    startedAt: known?.startedAt ?? (update.status !== "PENDING" ? now : null),
    finishedAt: FINAL_STATUSES.includes(update.status) ? now : (known?.finishedAt ?? null),
    updatedAt: now,
    lastSeq: meta?.seq ?? known?.lastSeq ?? 0,
    data: { ...known?.data, ...update },
  };
  return [row, ...(rows ?? []).filter((r) => r.taskId !== taskId)].slice(0, MAX_ROWS);
}

/** The union of two lists of rows, each task's newest (by `lastSeq`; fetched ones win ties), most recently updated first. */
export function mergeRows(cached: Execution[] | undefined, fetched: Execution[]): Execution[] {
  const byTask = new Map(fetched.map((row) => [row.taskId, row]));
  for (const row of cached ?? []) {
    const other = byTask.get(row.taskId);
    if (!other || other.lastSeq < row.lastSeq) byTask.set(row.taskId, row);
  }
  return newestFirst([...byTask.values()]);
}

/** The most recently updated first (ties by `taskId`, descending), as `GET /v1/executions` orders them. */
function newestFirst(rows: Execution[]): Execution[] {
  return [...rows].sort((a, b) => b.updatedAt.localeCompare(a.updatedAt) || b.taskId.localeCompare(a.taskId)).slice(0, MAX_ROWS);
}

/** `chunks` with one more, in `seq` order, once. */
export function addChunk(chunks: LogChunk[], log: ExecutionLog, seq: number, createdAt = new Date().toISOString()): LogChunk[] {
  if (chunks.some((chunk) => chunk.seq === seq)) return chunks;
  const at = chunks.findIndex((chunk) => chunk.seq > seq);
  const chunk: LogChunk = { seq, data: log, createdAt };
  return at < 0 ? [...chunks, chunk] : [...chunks.slice(0, at), chunk, ...chunks.slice(at)];
}

/** Three more tries, unless fanout's answer says a retry cannot help (a 400, a deployment without history). */
function retryable(failures: number, error: Error): boolean {
  return failures < 3 && (!(error instanceof FanoutRestError) || error.retryable);
}

/** A ref that always holds the latest `value`: the token source may change without a reconnection. */
function useLatest<T>(value: T) {
  const ref = useRef(value);
  ref.current = value;
  return ref;
}
