-- imagebot schema 10: the language each user speaks with the bot (issue 19).
-- A user's choice by /language; without a row, their Telegram language_code decides.
CREATE TABLE user_languages (
    user_id    INTEGER PRIMARY KEY,
    language   TEXT NOT NULL,   -- a catalog name: en, ru, es, pt_BR
    updated_at TEXT NOT NULL
);

-- The language a job's texts (status line, caption, failure notice) are in: its requester's
-- when it was made, so a job finishing after a restart still speaks it. NULL: English.
ALTER TABLE jobs ADD COLUMN language TEXT;
