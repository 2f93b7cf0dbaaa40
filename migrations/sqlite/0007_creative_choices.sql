-- imagebot schema 7: styles, shapes and image counts users choose; 🎨 Remix questions (issue 17).

-- What a job runs with, recorded when it is made, so a restart resumes with the same model.
ALTER TABLE jobs ADD COLUMN style_id TEXT;                      -- [[styles]] id; NULL = no styles
ALTER TABLE jobs ADD COLUMN model TEXT;                         -- vendor model ref; NULL = the default
ALTER TABLE jobs ADD COLUMN prompt_suffix TEXT NOT NULL DEFAULT ''; -- the style's words after the prompt
ALTER TABLE jobs ADD COLUMN shape TEXT;                         -- [generate.shapes] name; NULL = default
ALTER TABLE jobs ADD COLUMN images_asked INTEGER NOT NULL DEFAULT 1;
-- images the user got; NULL until delivered. Caps, spend and credits count these once known
-- (a provider's safety filter may withhold some of those asked for).
ALTER TABLE jobs ADD COLUMN images_delivered INTEGER;
ALTER TABLE jobs ADD COLUMN images_withheld INTEGER NOT NULL DEFAULT 0;

-- A user's choices from /style and /settings; NULL = the operator's default.
CREATE TABLE user_prefs (
    user_id      INTEGER PRIMARY KEY,
    style_id     TEXT,
    shape        TEXT,
    image_count  INTEGER,
    updated_at   TEXT NOT NULL
);

-- 🎨 Remix: the question the bot sent (a forced reply); the user's reply to that message is
-- run as a new job like job_id (same style, shape and count), also after a restart.
CREATE TABLE remix_prompts (
    chat_id     INTEGER NOT NULL,
    message_id  INTEGER NOT NULL,   -- the bot's question
    job_id      INTEGER NOT NULL,   -- the job remixed (no foreign key: jobs are pruned)
    user_id     INTEGER NOT NULL,   -- who may answer it
    created_at  TEXT NOT NULL,
    PRIMARY KEY (chat_id, message_id)
);
CREATE INDEX remix_prompts_created ON remix_prompts (created_at);
