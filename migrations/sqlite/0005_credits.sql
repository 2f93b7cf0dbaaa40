-- imagebot schema 5: credits bought with Telegram Stars (issue 18).
-- A user's balance is the sum of their ledger rows' credits; every row is written once.

-- An invoice's order: made by /buy, named by the invoice payload, with the price snapshot the
-- pre-checkout answer is checked against (the pack in config may change later).
CREATE TABLE star_orders (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    payload            TEXT NOT NULL UNIQUE,          -- the invoice payload: o:<id>:<random>
    user_id            INTEGER NOT NULL,               -- who may pay it
    chat_id            INTEGER NOT NULL,               -- where the invoice was sent
    pack_id            TEXT NOT NULL,
    stars              INTEGER NOT NULL CHECK (stars > 0),    -- price in Stars (XTR)
    credits            INTEGER NOT NULL CHECK (credits > 0),  -- credits it buys
    title              TEXT NOT NULL,
    status             TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid')),
    invoice_message_id INTEGER,
    created_at         TEXT NOT NULL,
    paid_at            TEXT
);
CREATE INDEX star_orders_user ON star_orders (user_id, id);

-- Every change of a balance. credits > 0 adds, < 0 takes away.
--   purchase     a Stars payment (charge_id = telegram_payment_charge_id, stars > 0)
--   star_refund  a payment given back (same charge_id, credits and stars < 0)
--   grant        credits an admin gave (/grant)
--   welcome      the one-time grant to a new user
--   spend        credits a job reserved when it was created (job_id, credits < 0)
--   job_refund   what a job gave back when it ended (failed, canceled, images withheld; >= 0)
CREATE TABLE credit_ledger (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id        INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN
                   ('purchase', 'star_refund', 'grant', 'welcome', 'spend', 'job_refund')),
    credits        INTEGER NOT NULL,
    stars          INTEGER NOT NULL DEFAULT 0,
    charge_id      TEXT,                              -- telegram_payment_charge_id
    order_id       INTEGER,                           -- star_orders.id
    job_id         INTEGER,                           -- jobs.id (no foreign key: jobs are pruned)
    update_id      INTEGER,                           -- the update that brought the payment
    note           TEXT,
    created_at     TEXT NOT NULL,
    reconciled_at  TEXT                               -- when getStarTransactions listed it
);
-- A charge is credited once and refunded once; a job reserves once and settles once.
CREATE UNIQUE INDEX credit_ledger_charge ON credit_ledger (kind, charge_id)
    WHERE charge_id IS NOT NULL;
CREATE UNIQUE INDEX credit_ledger_job ON credit_ledger (kind, job_id) WHERE job_id IS NOT NULL;
CREATE UNIQUE INDEX credit_ledger_welcome ON credit_ledger (user_id) WHERE kind = 'welcome';
CREATE INDEX credit_ledger_user ON credit_ledger (user_id, id);
CREATE INDEX credit_ledger_created ON credit_ledger (created_at);

-- The reconciliation cursor: how many of getStarTransactions' entries were read.
CREATE TABLE star_sync (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    next_offset  INTEGER NOT NULL DEFAULT 0,
    synced_at    TEXT
);
INSERT INTO star_sync (id, next_offset) VALUES (1, 0);
