-- imagebot schema 2: why an update could not be handled.
-- An update whose body PTB cannot parse, or whose handler raised, is closed (processed_at set)
-- like any other, so it is never replayed into the same failure at the next start; `failure`
-- says why ("unparseable: TypeError: ...", "handler_error: KeyError: ..."). NULL when handled.
ALTER TABLE inbox ADD COLUMN failure TEXT;
