-- imagebot schema 6: a final job whose chat is not tidied yet (status line to remove, failure
-- or cancel notice to send) has its own phase, `settling`, instead of reusing `delivering`
-- (which now only means "a running job's result is being sent"). Old rows move over.
UPDATE jobs SET phase = 'settling'
 WHERE status IN ('succeeded', 'failed', 'canceled') AND phase = 'delivering';
