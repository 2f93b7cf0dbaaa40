-- imagebot schema 9: the operator's control room (issue 19). Who was let in from the chat or
-- the shell (config.toml's access lists stay read-only and are not copied here), invite
-- links, and the bot-wide state an admin sets (pause) or start-up keeps (command menus).

-- Invite links https://t.me/<bot>?start=<code>. Only the SHA-256 of the code is kept.
CREATE TABLE invites (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    code_sha256 TEXT NOT NULL UNIQUE,         -- hex digest of the code
    uses        INTEGER NOT NULL CHECK (uses > 0),
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0),
    created_by  INTEGER,                      -- the admin's user id; NULL from the shell
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    revoked_at  TEXT,
    revoked_by  INTEGER
);

-- Users let in by an admin (/allow), by the shell (`imagebot users allow`) or by an invite.
CREATE TABLE allowed_users (
    user_id    INTEGER PRIMARY KEY,
    name       TEXT,                          -- first name or @username when known
    source     TEXT NOT NULL CHECK (source IN ('admin', 'shell', 'invite')),
    added_by   INTEGER,                       -- the admin's user id; NULL from the shell
    invite_id  INTEGER REFERENCES invites (id) ON DELETE SET NULL,
    added_at   TEXT NOT NULL
);

-- One row. `version` grows with every change of allowed_users, invites or the pause, so a
-- running bot notices a change made by another process (the shell) with one small read.
CREATE TABLE bot_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    version        INTEGER NOT NULL DEFAULT 0,
    paused         INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    pause_message  TEXT,                      -- what new requests are told; NULL = the default
    paused_by      INTEGER,
    paused_at      TEXT,
    bot_username   TEXT,                      -- from getMe at the last start (for shell invites)
    command_menus  TEXT NOT NULL DEFAULT '{}' -- {"<scope>": "<sha256 of its list>"} last set
);
INSERT INTO bot_state (id) VALUES (1);
