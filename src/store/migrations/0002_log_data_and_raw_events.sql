-- A log chunk keeps the whole body the worker sent (stream name, timestamps, ...), not only
-- its "log" field, so the REST API returns what the live event carried.
ALTER TABLE execution_logs RENAME COLUMN log TO data;

-- Events are replayed to clients exactly as they were delivered live: `json` keeps the text
-- byte for byte (jsonb would reorder keys), and costs less to insert.
ALTER TABLE events ALTER COLUMN data TYPE json USING data::json;
