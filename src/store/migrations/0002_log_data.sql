-- A log chunk keeps the whole body the worker sent (stream name, timestamps, ...), not only
-- its "log" field, so the REST API returns what the live event carried.
ALTER TABLE execution_logs RENAME COLUMN log TO data;
