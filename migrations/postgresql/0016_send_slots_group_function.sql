-- imagebot schema 16 (PostgreSQL twin of sqlite/0016): a group of send-slot asks in one
-- round trip (issue 16).
-- store/sendslots.py sends the asks that met in one group call (store/groupcall.py) to this
-- function: it takes the advisory lock that orders every transaction locking several keys'
-- rows (the same lock the prune takes: hashtext('send_slots')), applies the holds, then makes
-- each reservation with imagebot_send_slot (0015) in the asks' order, each seeing the ones
-- before it. Called in autocommit it is one statement, so the lock is held only while the
-- server runs it. As a client transaction (BEGIN, lock, holds, reservations, COMMIT) it was
-- held across three round trips, and each waited for the writer thread's turn at a CPU and
-- at the GIL: at 200 updates a second on two processes, the other process's groups queued
-- behind it.
CREATE FUNCTION imagebot_send_slots(hold_keys text[], hold_steps_s double precision[],
                                    gate_keys text[], gate_steps_s double precision[],
                                    global_steps_s double precision[])
RETURNS TABLE (reserved boolean, wait_s double precision)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('send_slots'));
    -- each held key busy until at least now + its step (the longest where a key comes twice)
    UPDATE send_slots AS s
        SET tat = greatest(s.tat, clock_timestamp() + make_interval(secs => h.step))
        FROM (SELECT key, max(step) AS step
              FROM unnest(hold_keys, hold_steps_s) AS u(key, step) GROUP BY key) AS h
        WHERE s.key = h.key;
    RETURN QUERY
        SELECT r.reserved, r.wait_s
        FROM unnest(gate_keys, gate_steps_s, global_steps_s)
             WITH ORDINALITY AS g(key, step, glob, i)
        CROSS JOIN LATERAL imagebot_send_slot(g.key, g.step, g.glob) AS r
        ORDER BY g.i;
END
$$;
