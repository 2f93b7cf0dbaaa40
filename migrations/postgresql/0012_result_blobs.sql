-- imagebot schema 12 (PostgreSQL twin of sqlite/0012, issue 16): result images kept in the
-- database, so that every bot process can send 📎 Original and deliver a job another process
-- fetched. Used when storage.results_store is "database" ("auto" picks it on PostgreSQL).
-- Written in one transaction before the job row says phase 'fetched'; the prune removes rows
-- older than storage.results_retention_days and those of pruned jobs.
CREATE TABLE result_blobs (
    job_id     bigint NOT NULL,      -- jobs.id (no foreign key: the prune removes both)
    n          bigint NOT NULL,      -- the image's place in the job's result, from 0
    mime       text NOT NULL,        -- image/png, image/jpeg, image/webp
    size_bytes bigint NOT NULL,      -- length(data), readable without reading the image
    data       bytea NOT NULL,       -- the image exactly as the provider gave it
    created_at timestamptz NOT NULL, -- when it was saved (retention counts from here)
    PRIMARY KEY (job_id, n)
);
-- Images are already compressed: store them as they are, out of line, without pglz trying.
ALTER TABLE result_blobs ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX result_blobs_created ON result_blobs (created_at);
