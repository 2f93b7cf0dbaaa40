-- imagebot schema 8 (PostgreSQL twin of sqlite/0008): album edits, the upscale operation,
-- deleted results. jobs.kind gains 'upscale' (PostgreSQL changes the CHECK in place).
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('generate', 'edit', 'upscale'));

ALTER TABLE jobs ADD COLUMN input_file_ids jsonb NOT NULL DEFAULT '[]';  -- album edit: file_ids, in order
ALTER TABLE jobs ADD COLUMN source_index bigint;                      -- upscale: which image of parent_job_id
ALTER TABLE jobs ADD COLUMN deleted_at timestamptz;                   -- 🗑 Delete removed the result messages
ALTER TABLE jobs ADD COLUMN deleted_by bigint;                        -- who pressed it (requester or admin)
-- /history: a user's newest jobs in a chat
CREATE INDEX jobs_user_chat ON jobs (user_id, chat_id, id);

-- Photos sent together as one album arrive as separate messages sharing media_group_id; once
-- the album has been quiet for edit.album_quiet_s it becomes one job and its parts go.
CREATE TABLE album_parts (
    chat_id        bigint NOT NULL,
    media_group_id text NOT NULL,
    message_id     bigint NOT NULL,
    update_id      bigint NOT NULL,
    user_id        bigint NOT NULL,
    file_id        text,               -- NULL: this part cannot be edited (a video, too big)
    file_size      bigint,
    width          bigint,
    height         bigint,
    instruction    text,               -- the text after /edit, on the captioned part only
    received_at    timestamptz NOT NULL,
    PRIMARY KEY (chat_id, media_group_id, message_id)
);
CREATE INDEX album_parts_received ON album_parts (received_at);
