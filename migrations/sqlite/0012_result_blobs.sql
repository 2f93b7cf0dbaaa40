-- imagebot schema 12 (issue 16): result images kept in the database, so that every bot process
-- can send 📎 Original and deliver a job another process fetched. Used when
-- storage.results_store is "database" ("auto" picks it on PostgreSQL; SQLite keeps files on
-- disk by default). Written in one transaction before the job row says phase 'fetched';
-- the prune removes rows older than storage.results_retention_days and those of pruned jobs.
CREATE TABLE result_blobs (
    job_id     INTEGER NOT NULL,    -- jobs.id (no foreign key: the prune removes both)
    n          INTEGER NOT NULL,    -- the image's place in the job's result, from 0
    mime       TEXT NOT NULL,       -- image/png, image/jpeg, image/webp
    size_bytes INTEGER NOT NULL,    -- length(data), readable without reading the image
    data       BLOB NOT NULL,       -- the image exactly as the provider gave it
    created_at TEXT NOT NULL,       -- when it was saved (retention counts from here)
    PRIMARY KEY (job_id, n)
);
CREATE INDEX result_blobs_created ON result_blobs (created_at);
