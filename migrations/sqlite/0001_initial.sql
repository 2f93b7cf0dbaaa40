-- imagebot schema 1: the update inbox (dedupe + save-before-ack), jobs, refusal notices.
-- Timestamps are ISO-8601 UTC text ("2026-11-21T10:15:30.123Z"); lists are JSON arrays.

-- Every update, committed before Telegram is told it arrived. update_id is the dedupe key.
CREATE TABLE inbox (
    update_id    INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,              -- message, callback_query, edited_message, ...
    received_at  TEXT NOT NULL,
    processed_at TEXT,                       -- NULL until the handlers ran
    payload      TEXT NOT NULL               -- the raw update JSON
);
CREATE INDEX inbox_unprocessed ON inbox (update_id) WHERE processed_at IS NULL;
CREATE INDEX inbox_received_at ON inbox (received_at);

CREATE TABLE jobs (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: buttons name it
    kind                  TEXT NOT NULL CHECK (kind IN ('generate', 'edit')),
    status                TEXT NOT NULL
                          CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    -- inside 'running': new, submitting, submitted, fetched, delivering; 'done' once final
    phase                 TEXT NOT NULL DEFAULT 'new',
    update_id             INTEGER NOT NULL UNIQUE,             -- the update that asked for it
    chat_id               INTEGER NOT NULL,
    user_id               INTEGER NOT NULL,
    chat_type             TEXT NOT NULL,
    command_message_id    INTEGER,
    status_message_id     INTEGER,                             -- the "Generating…" message
    prompt                TEXT NOT NULL,                       -- prompt or edit instruction
    input_file_id         TEXT,                                -- edit: Telegram file_id of the photo
    input_file_size       INTEGER,
    input_width           INTEGER,
    input_height          INTEGER,
    parent_job_id         INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    provider              TEXT NOT NULL,                       -- replicate, fal, local
    params                TEXT NOT NULL DEFAULT '{}',          -- operator's backend parameters
    provider_request_id   TEXT,                                -- prediction / request id
    attempts              INTEGER NOT NULL DEFAULT 0,          -- create/submit attempts
    poll_failures         INTEGER NOT NULL DEFAULT 0,          -- failed status polls in a row
    error_code            TEXT,
    error_message         TEXT,
    output_urls           TEXT NOT NULL DEFAULT '[]',
    result_paths          TEXT NOT NULL DEFAULT '[]',          -- downloaded results on disk
    result_file_ids       TEXT NOT NULL DEFAULT '[]',          -- Telegram file_ids of sent results
    delivered_message_ids TEXT NOT NULL DEFAULT '[]',
    cost_estimate_usd     REAL NOT NULL DEFAULT 0,
    created_at            TEXT NOT NULL,
    started_at            TEXT,
    submitted_at          TEXT,
    deadline_at           TEXT,
    finished_at           TEXT,
    updated_at            TEXT NOT NULL
);
CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_user_created ON jobs (user_id, created_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_chat ON jobs (chat_id, id);

-- When a refusal (not allowlisted, ...) was last told to a user: at most one per window.
CREATE TABLE notices (
    user_id  INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    sent_at  TEXT NOT NULL,
    PRIMARY KEY (user_id, reason)
);
