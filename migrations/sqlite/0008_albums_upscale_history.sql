-- imagebot schema 8 (issue 17): album edits, the upscale operation, deleted results.
--
-- jobs.kind gains 'upscale'. SQLite cannot change a CHECK constraint in place; rather than
-- rebuilding the table with a fixed column list (which would drop columns other migrations
-- add to jobs), the kind column is replaced: a new column with the wider CHECK takes the
-- values, the old one is dropped (its CHECK goes with it), the new one takes its name. Every
-- other column, row, index and the AUTOINCREMENT counter stay as they are. (DROP COLUMN needs
-- SQLite 3.35, 2021.)
ALTER TABLE jobs ADD COLUMN kind_v8 TEXT NOT NULL DEFAULT 'generate'
    CHECK (kind_v8 IN ('generate', 'edit', 'upscale'));
UPDATE jobs SET kind_v8 = kind;
ALTER TABLE jobs DROP COLUMN kind;
ALTER TABLE jobs RENAME COLUMN kind_v8 TO kind;

ALTER TABLE jobs ADD COLUMN input_file_ids TEXT NOT NULL DEFAULT '[]';  -- album edit: file_ids, in order
ALTER TABLE jobs ADD COLUMN source_index INTEGER;                     -- upscale: which image of parent_job_id
ALTER TABLE jobs ADD COLUMN deleted_at TEXT;                          -- 🗑 Delete removed the result messages
ALTER TABLE jobs ADD COLUMN deleted_by INTEGER;                       -- who pressed it (requester or admin)
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
