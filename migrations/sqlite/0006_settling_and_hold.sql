-- imagebot schema 6: a final job whose chat is not tidied yet (status line to remove, failure
-- or cancel notice to send) has its own phase, `settling`, instead of reusing `delivering`
-- (which now only means "a running job's result is being sent"). Old rows move over.
UPDATE jobs SET phase = 'settling'
 WHERE status IN ('succeeded', 'failed', 'canceled') AND phase = 'delivering';

-- A job is created held by the handler that made it, until that handler has sent the first
-- status message and saved its id (JobStore.release): the runner claims no held job, so it
-- never starts one whose "Generating…" line is still on its way. The hold is a lease: it
-- lapses at held_until if the handler never releases it, and a start-up releases them all.
ALTER TABLE jobs ADD COLUMN held_until TEXT;  -- NULL = not held
