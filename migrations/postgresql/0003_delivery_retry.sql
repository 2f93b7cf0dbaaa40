-- imagebot schema 3 (PostgreSQL twin): results and chat notices wait out a Telegram outage.
ALTER TABLE jobs ADD COLUMN deliver_after timestamptz;                     -- next try; NULL = none planned
ALTER TABLE jobs ADD COLUMN delivery_attempts bigint NOT NULL DEFAULT 0;  -- tries since waiting began
ALTER TABLE jobs ADD COLUMN delivery_waiting_since timestamptz;            -- first refused try
CREATE INDEX jobs_deliver_after ON jobs (deliver_after) WHERE deliver_after IS NOT NULL;

-- One row rewritten by the write probe: tells /healthz whether the database takes writes.
CREATE TABLE write_probe (
    id         bigint PRIMARY KEY CHECK (id = 1),
    written_at timestamptz NOT NULL
);
