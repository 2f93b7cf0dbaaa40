-- imagebot schema 11 (PostgreSQL twin of sqlite/0011): several processes on one database
-- (issue 16).

-- Every running process ("node"), on the database clock: live while its heartbeat is fresh.
CREATE TABLE nodes (
    id           text PRIMARY KEY,            -- <host>-<pid>-<4 hex>, new at every start
    host         text NOT NULL,
    pid          bigint NOT NULL,
    roles        text NOT NULL,               -- intake,worker,maintenance
    ops_port     bigint,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL
);

-- One holder at a time per name (maintenance, poller), until expires_at (database clock).
CREATE TABLE leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,                 -- a nodes.id
    term       bigint NOT NULL DEFAULT 1,     -- +1 at every change of holder
    expires_at timestamptz NOT NULL
);

-- Which process runs a job, and the fence its writes carry: the token changes whenever the
-- job is taken from one process and handed to another, so a process frozen past its lease
-- writes nothing once it wakes.
ALTER TABLE jobs ADD COLUMN owner text;
ALTER TABLE jobs ADD COLUMN lease_token bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN rescues bigint NOT NULL DEFAULT 0;  -- taken over from dead nodes
CREATE INDEX jobs_owner_running ON jobs (owner) WHERE status = 'running';

-- The process that saved an update (its handlers run there; a dead one's are replayed).
ALTER TABLE inbox ADD COLUMN received_by text;
