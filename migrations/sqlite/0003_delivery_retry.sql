-- imagebot schema 3: results and chat notices wait out a Telegram outage instead of failing.
-- A job whose images are made (phase fetched/delivering) and whose send Telegram could not
-- take is "parked": still `running` but holding no provider slot, tried again at
-- deliver_after. A final job whose status line/failure notice could not be sent (phase
-- delivering) uses the same columns for its own retries.
ALTER TABLE jobs ADD COLUMN deliver_after TEXT;                         -- next try; NULL = none planned
ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0; -- tries since waiting began
ALTER TABLE jobs ADD COLUMN delivery_waiting_since TEXT;                -- first refused try: the window starts
CREATE INDEX jobs_deliver_after ON jobs (deliver_after) WHERE deliver_after IS NOT NULL;

-- One row rewritten by the write probe: tells /healthz whether the database takes writes.
CREATE TABLE write_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at TEXT NOT NULL
);
