-- imagebot schema 10 (PostgreSQL twin of sqlite/0010): the language each user speaks with the
-- bot (issue 19).
-- A user's choice by /language, beside their other choices; NULL: their Telegram
-- language_code decides.
ALTER TABLE user_prefs ADD COLUMN language text;   -- a catalog name: en, ru, es, pt_BR

-- The language a job's texts (status line, caption, failure notice) are in: its requester's
-- when it was made, so a job finishing after a restart still speaks it. NULL: English.
ALTER TABLE jobs ADD COLUMN language text;
