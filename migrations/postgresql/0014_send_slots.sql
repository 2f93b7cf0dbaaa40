-- imagebot schema 14 (PostgreSQL twin of sqlite/0014): Telegram's outgoing limits shared by
-- every process (issue 16).
-- One row per limited key ('global', 'progress', 'chat:<id>', 'group:<id>'): its GCRA
-- "theoretical arrival time", the earliest moment the key's next send may go. A send
-- reserves a slot by moving tat forward by the key's step, on the database clock
-- (clock_timestamp()). A row whose tat is past says nothing (the key is free), so such rows
-- may be deleted any time.
CREATE TABLE send_slots (
    key  text PRIMARY KEY,
    tat  timestamptz NOT NULL
);
