-- Indexes for the REST API's pages: an organization's executions, most recently updated
-- first, with task_id breaking ties so that a keyset cursor (updated_at, task_id) names one
-- position. Both columns descend together, so `(updated_at, task_id) < ($1, $2)` is one
-- contiguous range of the index and a page is a bounded index scan, filtered or not.
CREATE INDEX executions_org_updated
    ON executions (organization_id, updated_at DESC, task_id DESC);

-- The status filter: the same order within one status. It covers everything the index of
-- 0001 did (its columns are a prefix of these), so that one goes.
CREATE INDEX executions_org_status_updated_task
    ON executions (organization_id, status, updated_at DESC, task_id DESC);
DROP INDEX executions_org_status_updated;
