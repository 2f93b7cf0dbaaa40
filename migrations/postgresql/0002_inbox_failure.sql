-- imagebot schema 2 (PostgreSQL twin): why an update could not be handled (NULL when handled).
ALTER TABLE inbox ADD COLUMN failure text;
