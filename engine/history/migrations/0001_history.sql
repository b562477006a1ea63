-- 0001: the history of every message and its lifecycle events (issue 17).
-- Tables are partitioned by the day (UTC) the message was made -- its id carries that
-- time, so every row of one message (its record, events, search terms, body) lands in
-- one day's partitions and retention drops whole days (history_ensure_day makes them).
-- Message ids (32 hex digits, time first) are stored as uuid: 16 bytes, compared as
-- bytes, so "ORDER BY id DESC" is newest first and the primary key serves it.

CREATE TABLE history_messages (
    id uuid NOT NULL,
    created_at timestamptz NOT NULL,        -- the id's time (the partition key)
    tenant text NOT NULL,
    sender text,                            -- From, as sent (NULL: record already gone)
    recipients text[],                      -- envelope recipients (to, cc, bcc), bare
    subject text,
    tags text[] NOT NULL DEFAULT '{}',
    metadata jsonb,                         -- to/cc/bcc as written, reply_to, headers,
                                            -- priority, attachments (names, sizes), sandbox
    state text NOT NULL,                    -- the job's state after its latest event
    attempts integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL,
    sent_at timestamptz,
    last_error text,
    bounce text,                            -- the last failure's class (engine.bounce)
    provider_state text,                    -- delivered, bounced, complained, delayed
    provider_message_id text,
    idem_key text,                          -- "<tenant>/<Idempotency-Key>" of its request
    idem_fp text,                           -- that request's body fingerprint
    idem_pos integer,                       -- its place among the request's messages
    idem_n integer,                         -- how many the request had
    ev_ms bigint NOT NULL,                  -- stream position of the event that set
    ev_seq bigint NOT NULL,                 -- state: later events win, whatever the order
    PRIMARY KEY (id, created_at)            -- they are written in
) PARTITION BY RANGE (created_at);
-- A tenant's messages, newest first (the id is time-ordered).
CREATE INDEX history_messages_tenant ON history_messages (tenant, id);
-- Idempotency-Keys beyond Redis's window (only rows that had one).
CREATE INDEX history_messages_idem ON history_messages (idem_key) WHERE idem_key IS NOT NULL;

-- One row per lifecycle event, idempotent by event id (the stream entry id, ".n" for the
-- n-th job of an enqueue entry): a re-delivered entry inserts nothing.
CREATE TABLE history_events (
    message_id uuid NOT NULL,
    created_at timestamptz NOT NULL,        -- the message's (partition key)
    event_id text NOT NULL,
    at timestamptz NOT NULL,
    type text NOT NULL,
    state text NOT NULL,
    attempt integer NOT NULL,
    tenant text NOT NULL,
    error text,
    bounce text,
    recipients text[],                      -- suppressed: dropped; provider events: theirs
    written_at timestamptz NOT NULL DEFAULT clock_timestamp(),  -- the writer's lag, measured
    PRIMARY KEY (message_id, event_id, created_at)
) PARTITION BY RANGE (created_at);

-- What searches look messages up by: 'to:<address>' (each envelope recipient, lower
-- case), 'from:<address>', 'tag:<tag>'. One ordered index serves all three, newest
-- first, so a page costs the same for an address with ten messages or ten million.
CREATE TABLE history_terms (
    term text NOT NULL,
    message_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    tenant text NOT NULL,
    PRIMARY KEY (term, message_id, created_at)
) PARTITION BY RANGE (created_at);

-- Rendered bodies, only with history.keep_bodies_days > 0 (their own, shorter retention).
CREATE TABLE history_bodies (
    message_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    text_body text,
    html_body text,
    PRIMARY KEY (message_id, created_at)
) PARTITION BY RANGE (created_at);

-- Make one day's partitions of every table (idempotent; concurrent callers serialise on
-- an advisory lock, as two CREATE ... PARTITION OF of one name would fail).
CREATE FUNCTION history_ensure_day(day date) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t text;
    suffix text := to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass('history_messages_' || suffix) IS NOT NULL
       AND to_regclass('history_bodies_' || suffix) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('engine.history.partitions'));
    FOREACH t IN ARRAY ARRAY['history_messages', 'history_events', 'history_terms',
                             'history_bodies'] LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)%s',
            t || '_' || suffix, t, lo, hi,
            -- messages are updated as their events come: room on the page keeps those
            -- updates HOT (no index touched; none of their indexed columns changes)
            CASE WHEN t = 'history_messages' THEN ' WITH (fillfactor = 80)' ELSE '' END);
    END LOOP;
END $$;
