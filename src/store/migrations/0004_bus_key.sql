-- The key replicas sign durable envelopes with (HMAC-SHA256), so that a replica believes
-- an envelope's `seq` only when a replica of this history published it: a forged `seq` on
-- Redis cannot move a replica's cursor. One row, made here from PostgreSQL's strong random
-- source (two v4 UUIDs: 244 random bits), read by every replica at start.
CREATE TABLE bus_key (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    key bytea NOT NULL CHECK (length(key) >= 32)
);
INSERT INTO bus_key (key) SELECT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
