// A table of executions and the logs of the selected one, on the two hooks: what a page
// of the dashboard renders. Mount it inside a QueryClientProvider.

import { useState } from "react";
import { type FanoutConnection, useExecutionLogs, useExecutions } from "./useExecutions.js";

export function Executions(connection: FanoutConnection) {
  const { executions, isLoading, error, status } = useExecutions(connection);
  const [selected, setSelected] = useState<string | null>(null);
  const logs = useExecutionLogs(connection, selected);

  return (
    <main>
      <p role="status">
        {status.state === "live" ? `live: ${status.organizationId} / ${status.userId}` : status.state}
        {status.state === "unauthorized" && `: ${status.error}`}
      </p>
      {error && <p role="alert">Could not load the executions: {error.message}</p>}
      {isLoading ? (
        <p>Loading…</p>
      ) : (
        <table>
          <tbody>
            {executions.map((e) => (
              <tr key={e.taskId} aria-selected={e.taskId === selected}>
                <td data-status={e.status}>{e.status}</td>
                <td>
                  <button type="button" onClick={() => setSelected(e.taskId)}>
                    {e.taskId}
                  </button>
                </td>
                <td>{e.updatedAt}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {selected !== null && (
        <ol>
          {(logs.data ?? []).map((chunk) => (
            <li key={chunk.seq}>{typeof chunk.data.log === "string" ? chunk.data.log : JSON.stringify(chunk.data.log)}</li>
          ))}
        </ol>
      )}
    </main>
  );
}
