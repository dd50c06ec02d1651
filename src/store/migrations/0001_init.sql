-- The durable history of events, and the projections built from it.

CREATE TYPE execution_status AS ENUM
    ('PENDING', 'RUNNING', 'PASSED', 'FAILED', 'ERROR', 'CANCELLED');

-- The last sequence number given out per organization. Incremented in the transaction that
-- inserts the event, so sequence numbers are gap-free and in commit order.
CREATE TABLE org_sequences (
    organization_id text PRIMARY KEY,
    last_seq bigint NOT NULL
);

CREATE TABLE events (
    organization_id text NOT NULL,
    seq bigint NOT NULL,
    event text NOT NULL,
    data jsonb NOT NULL,
    user_id text NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, seq)
);

-- Retention deletes by age.
CREATE INDEX events_created_at ON events (created_at);

CREATE TABLE executions (
    organization_id text NOT NULL,
    task_id text NOT NULL,
    status execution_status NOT NULL,
    started_at timestamptz NULL,
    finished_at timestamptz NULL,
    updated_at timestamptz NOT NULL,
    data jsonb NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (organization_id, task_id)
);

-- Listing an organization's executions by status, most recently updated first.
CREATE INDEX executions_org_status_updated
    ON executions (organization_id, status, updated_at DESC);

CREATE TABLE execution_logs (
    organization_id text NOT NULL,
    task_id text NOT NULL,
    seq bigint NOT NULL,
    log jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, task_id, seq)
);
