-- imagebot schema 8 (issue 17): album edits, the upscale operation, deleted results.
--
-- jobs.kind gains 'upscale'. SQLite cannot change a CHECK constraint in place, so the table is
-- rebuilt the documented way (rename, create, copy, drop), keeping every row, id and the
-- AUTOINCREMENT counter (buttons name job ids: they are never reused). The column list below
-- is every column the earlier migrations gave `jobs`: a later migration that adds a column
-- to `jobs` must come after this one (tests/test_albums.py checks no column is lost).
ALTER TABLE jobs RENAME TO jobs_before_0008;

CREATE TABLE jobs (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind                  TEXT NOT NULL CHECK (kind IN ('generate', 'edit', 'upscale')),
    status                TEXT NOT NULL
                          CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    phase                 TEXT NOT NULL DEFAULT 'new',
    update_id             INTEGER NOT NULL UNIQUE,
    chat_id               INTEGER NOT NULL,
    user_id               INTEGER NOT NULL,
    chat_type             TEXT NOT NULL,
    command_message_id    INTEGER,
    status_message_id     INTEGER,
    prompt                TEXT NOT NULL,
    input_file_id         TEXT,
    input_file_size       INTEGER,
    input_width           INTEGER,
    input_height          INTEGER,
    parent_job_id         INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    provider              TEXT NOT NULL,
    params                TEXT NOT NULL DEFAULT '{}',
    provider_request_id   TEXT,
    attempts              INTEGER NOT NULL DEFAULT 0,
    poll_failures         INTEGER NOT NULL DEFAULT 0,
    error_code            TEXT,
    error_message         TEXT,
    output_urls           TEXT NOT NULL DEFAULT '[]',
    result_paths          TEXT NOT NULL DEFAULT '[]',
    result_file_ids       TEXT NOT NULL DEFAULT '[]',
    delivered_message_ids TEXT NOT NULL DEFAULT '[]',
    cost_estimate_usd     REAL NOT NULL DEFAULT 0,
    created_at            TEXT NOT NULL,
    started_at            TEXT,
    submitted_at          TEXT,
    deadline_at           TEXT,
    finished_at           TEXT,
    updated_at            TEXT NOT NULL,
    -- schema 3
    deliver_after          TEXT,
    delivery_attempts      INTEGER NOT NULL DEFAULT 0,
    delivery_waiting_since TEXT,
    -- schema 8
    input_file_ids        TEXT NOT NULL DEFAULT '[]',  -- album edit: Telegram file_ids, in order
    source_index          INTEGER,                     -- upscale: which image of parent_job_id
    deleted_at            TEXT,                        -- 🗑 Delete removed the result messages
    deleted_by            INTEGER                      -- who pressed it (requester or admin)
);

INSERT INTO jobs (
    id, kind, status, phase, update_id, chat_id, user_id, chat_type, command_message_id,
    status_message_id, prompt, input_file_id, input_file_size, input_width, input_height,
    parent_job_id, provider, params, provider_request_id, attempts, poll_failures, error_code,
    error_message, output_urls, result_paths, result_file_ids, delivered_message_ids,
    cost_estimate_usd, created_at, started_at, submitted_at, deadline_at, finished_at,
    updated_at, deliver_after, delivery_attempts, delivery_waiting_since
)
SELECT
    id, kind, status, phase, update_id, chat_id, user_id, chat_type, command_message_id,
    status_message_id, prompt, input_file_id, input_file_size, input_width, input_height,
    parent_job_id, provider, params, provider_request_id, attempts, poll_failures, error_code,
    error_message, output_urls, result_paths, result_file_ids, delivered_message_ids,
    cost_estimate_usd, created_at, started_at, submitted_at, deadline_at, finished_at,
    updated_at, deliver_after, delivery_attempts, delivery_waiting_since
FROM jobs_before_0008;

-- The id counter carries over even past ids whose rows were pruned.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'jobs', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'jobs');
UPDATE sqlite_sequence
    SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs_before_0008'), 0))
    WHERE name = 'jobs';

DROP TABLE jobs_before_0008;
DELETE FROM sqlite_sequence WHERE name = 'jobs_before_0008';

CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_user_created ON jobs (user_id, created_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_chat ON jobs (chat_id, id);
CREATE INDEX jobs_deliver_after ON jobs (deliver_after) WHERE deliver_after IS NOT NULL;
-- /history: a user's newest jobs in a chat
CREATE INDEX jobs_user_chat ON jobs (user_id, chat_id, id);

-- Photos sent together as one album arrive as separate messages sharing media_group_id. Each
-- part is written here by its handler (its update is already in the inbox); once the album
-- has been quiet for edit.album_quiet_s it becomes one job (keyed by the captioned part's
-- update_id, so a repeated pass cannot make two) and its parts are deleted.
CREATE TABLE album_parts (
    chat_id        INTEGER NOT NULL,
    media_group_id TEXT NOT NULL,
    message_id     INTEGER NOT NULL,
    update_id      INTEGER NOT NULL,
    user_id        INTEGER NOT NULL,
    file_id        TEXT,               -- NULL: this part cannot be edited (a video, too big)
    file_size      INTEGER,
    width          INTEGER,
    height         INTEGER,
    instruction    TEXT,               -- the text after /edit, on the captioned part only
    received_at    TEXT NOT NULL,
    PRIMARY KEY (chat_id, media_group_id, message_id)
);
CREATE INDEX album_parts_received ON album_parts (received_at);
