-- imagebot schema 11: several processes on one database (issue 16). On SQLite there is only
-- ever one process (the file is locked), but the tables exist so the code is the same.

-- Every running process ("node"), on the database clock: live while its heartbeat is fresh.
CREATE TABLE nodes (
    id           TEXT PRIMARY KEY,            -- <host>-<pid>-<4 hex>, new at every start
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    roles        TEXT NOT NULL,               -- intake,worker,maintenance
    ops_port     INTEGER,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL
);

-- One holder at a time per name (maintenance, poller), until expires_at (database clock).
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,                 -- a nodes.id
    term       INTEGER NOT NULL DEFAULT 1,    -- +1 at every change of holder
    expires_at TEXT NOT NULL
);

-- Which process runs a job, and the fence its writes carry: the token changes whenever the
-- job is taken from one process and handed to another, so a process frozen past its lease
-- writes nothing once it wakes.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN rescues INTEGER NOT NULL DEFAULT 0;  -- taken over from dead nodes
CREATE INDEX jobs_owner_running ON jobs (owner) WHERE status = 'running';

-- The process that saved an update (its handlers run there; a dead one's are replayed).
ALTER TABLE inbox ADD COLUMN received_by TEXT;
