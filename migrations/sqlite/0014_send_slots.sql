-- imagebot schema 14: Telegram's outgoing limits shared by every process (issue 16).
-- One row per limited key ('global', 'progress', 'chat:<id>', 'group:<id>'): its GCRA
-- "theoretical arrival time", the earliest moment the key's next send may go. A send
-- reserves a slot by moving tat forward by the key's step, on the database clock. A row
-- whose tat is past says nothing (the key is free), so such rows may be deleted any time.
-- SQLite serves one process, which paces its sends in memory: the table stays empty there.
CREATE TABLE send_slots (
    key  TEXT PRIMARY KEY,
    tat  TEXT NOT NULL           -- ISO-8601 UTC, "2026-11-21T10:15:30.123Z"
);
