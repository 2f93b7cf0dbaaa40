-- imagebot schema 13 (issue 16): the /edit conversation in the database, and each inbox
-- row's chat, so a chat's updates keep their order when they reach different processes.
--
-- One row per conversation that is waiting for its next message (PTB's ConversationHandler
-- kept this in memory, where another process cannot see it). A handler reads the row when
-- its update starts and writes the new state in the same transaction that marks the update
-- processed in the inbox, so a crash leaves both or neither. A row past expires_at is no
-- conversation any more: the bot says the edit timed out and deletes it.
CREATE TABLE conversations (
    chat_id    INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    name       TEXT NOT NULL,                -- which conversation: 'edit'
    state      TEXT NOT NULL,                -- what it waits for: 'photo', 'instruction'
    data       TEXT NOT NULL DEFAULT '{}',   -- JSON: what was gathered so far
    updated_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (chat_id, user_id, name)
);
CREATE INDEX conversations_expires_at ON conversations (expires_at);

-- The chat whose order an update keeps (NULL: none, e.g. a pre-checkout query). A process
-- about to run a chat's update first waits for that chat's earlier unprocessed ones.
ALTER TABLE inbox ADD COLUMN chat_key INTEGER;
CREATE INDEX inbox_chat_pending ON inbox (chat_key, update_id) WHERE processed_at IS NULL;
