-- imagebot schema 15 (PostgreSQL twin of sqlite/0015): one send-slot reservation in one
-- round trip (issue 16).
-- The reservation of store/sendslots.py (a chat's or group's gate key, then the global key,
-- GCRA on the database clock) as a function: called in autocommit it is one statement, so the
-- 'global' row is locked only while the server runs it, not across a client's round trips
-- (three processes sending hundreds of messages a second queued on that row lock).
-- Returns reserved = false and how long to wait when the gate key is still busy (nothing is
-- reserved then); otherwise reserved = true and how long to wait for the global slot.
CREATE FUNCTION imagebot_send_slot(gate_key text, gate_step_s double precision,
                                   global_step_s double precision)
RETURNS TABLE (reserved boolean, wait_s double precision)
LANGUAGE plpgsql AS $$
DECLARE
    now_ts     timestamptz := clock_timestamp();
    gate_tat   timestamptz;
    global_tat timestamptz;
    send_at    timestamptz;
BEGIN
    IF gate_key IS NOT NULL THEN
        -- lock the gate's row (made free when new) and read it
        INSERT INTO send_slots (key, tat) VALUES (gate_key, now_ts)
            ON CONFLICT (key) DO UPDATE SET tat = send_slots.tat
            RETURNING tat INTO gate_tat;
        now_ts := clock_timestamp();
        IF gate_tat > now_ts THEN
            RETURN QUERY SELECT false, extract(epoch FROM gate_tat - now_ts)::double precision;
            RETURN;
        END IF;
    END IF;
    INSERT INTO send_slots (key, tat)
        VALUES ('global', clock_timestamp() + make_interval(secs => global_step_s))
        ON CONFLICT (key) DO UPDATE
        SET tat = greatest(send_slots.tat, clock_timestamp()) + make_interval(secs => global_step_s)
        RETURNING tat INTO global_tat;
    send_at := global_tat - make_interval(secs => global_step_s);
    IF gate_key IS NOT NULL THEN
        -- the gate's spacing counts from the moment the send really goes
        UPDATE send_slots SET tat = send_at + make_interval(secs => gate_step_s)
            WHERE key = gate_key;
    END IF;
    RETURN QUERY SELECT true,
        greatest(0, extract(epoch FROM send_at - clock_timestamp()))::double precision;
END
$$;

-- The slots are pacing state for the next seconds, not records: a crash may lose them (the
-- table is empty after one; every key is then free, as a pruned one). Unlogged, a
-- reservation writes no WAL and its commit waits for no disk flush, so the 'global' row's
-- lock is free again at once.
ALTER TABLE send_slots SET UNLOGGED;
