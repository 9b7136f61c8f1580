-- Firehose schema. Applied by every worker at start under an advisory lock, so it must
-- stay idempotent: IF NOT EXISTS everywhere, never a destructive change.

-- An `events` table from before partitioning cannot be turned into a partitioned one
-- in place; say so clearly instead of failing on the first PARTITION OF below.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class
               WHERE oid = to_regclass('events') AND relkind <> 'p') THEN
        RAISE EXCEPTION 'table events exists but is not partitioned (an earlier Firehose '
                        'created it): rename it, restart, and copy its rows into events';
    END IF;
END $$;

-- Partitioned by time (storage/partitions.py creates the partitions ahead and drops
-- expired ones), with a DEFAULT partition so that no event is ever refused for lack
-- of a partition, whatever its timestamp (year 1900 or 2999 included).
CREATE TABLE IF NOT EXISTS events (
    event_id     uuid        NOT NULL,
    user_id      bigint      NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    metadata     jsonb       NOT NULL,
    received_at  timestamptz NOT NULL,
    -- A client's retry (or a spool replay) carries the same event_id, timestamp and
    -- user_id, and is stored once. A unique key of a partitioned table must hold the
    -- partition key ("timestamp"); user_id is in it too so that Citus can distribute
    -- the table by user_id without changing the key. Its leading column also serves
    -- GET /events, newest first, with event_id breaking ties.
    CONSTRAINT events_timestamp_event_id_user_id_key UNIQUE ("timestamp", event_id, user_id)
) PARTITION BY RANGE ("timestamp");

CREATE TABLE IF NOT EXISTS events_default PARTITION OF events DEFAULT;

-- Created only when missing: CREATE INDEX IF NOT EXISTS would first take a SHARE lock
-- on events and every partition, holding up all inserts at every worker start.
DO $$
BEGIN
    -- GET /events?user_id=..., newest first.
    IF to_regclass('events_user_id_timestamp_event_id_idx') IS NULL THEN
        CREATE INDEX events_user_id_timestamp_event_id_idx
            ON events (user_id, "timestamp", event_id);
    END IF;
    -- The metadata index (GET /events?metadata=...) is a setting: storage/database.py.
END $$;

-- Events PostgreSQL refused for their content, with the reason; each at most once.
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id       uuid        NOT NULL,
    payload        bytea       NOT NULL,
    error_code     text        NOT NULL,
    error_message  text        NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_event_id_key UNIQUE (event_id)
);

-- Rollups: event counts per time bucket (UTC), kept by the trigger below in the same
-- transaction as the INSERT that stores the events, so GET /counts never scans events.
-- Only rows the INSERT really stored are counted (a repeat skipped by ON CONFLICT is
-- not), so retries and spool replays never count an event twice. Concurrent workers
-- serialise on the row locks of the buckets they share; each statement takes them in
-- bucket order, and a deadlock (40P01) is retried like any class 40 error.

-- All events, per minute, hour and day.
CREATE TABLE IF NOT EXISTS event_counts (
    unit    text        NOT NULL CHECK (unit IN ('minute', 'hour', 'day')),
    bucket  timestamptz NOT NULL,
    n       bigint      NOT NULL,
    PRIMARY KEY (unit, bucket)
);

-- Per user, per minute only: users are the many-valued dimension, so one row per
-- (user, minute) instead of three; hours and days are summed from minutes on reading.
CREATE TABLE IF NOT EXISTS event_counts_by_user (
    user_id  bigint      NOT NULL,
    bucket   timestamptz NOT NULL,
    n        bigint      NOT NULL,
    PRIMARY KEY (user_id, bucket)
);

-- The metadata keys counted per value (COLLECTOR_ROLLUP_KEYS, registered by the
-- service), each from the moment it was registered: earlier events are not counted.
CREATE TABLE IF NOT EXISTS rollup_keys (
    key            text        PRIMARY KEY,
    counted_since  timestamptz NOT NULL DEFAULT now()
);

-- Per value of each registered key (metadata ->> key, at most 200 characters), per
-- minute, hour and day. Events without the key, or with a JSON null, are not counted.
CREATE TABLE IF NOT EXISTS event_counts_by_key (
    key     text        NOT NULL,
    unit    text        NOT NULL CHECK (unit IN ('minute', 'hour', 'day')),
    bucket  timestamptz NOT NULL,
    value   text        NOT NULL,
    n       bigint      NOT NULL,
    PRIMARY KEY (key, unit, bucket, value)
);

-- jit off: the planner cannot size the transition table and guesses millions of rows,
-- so it would JIT-compile these statements for every batch (measured: 150 ms of 180).
-- Buckets are date_bin()s from 2000-01-01 UTC: the UTC minute, hour and day by integer
-- arithmetic (date_trunc with a time zone converts through the zone for every row, three
-- times per event here); totals are summed to minutes first, then minutes to hours and days.
CREATE OR REPLACE FUNCTION firehose_count_events() RETURNS trigger
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    origin CONSTANT timestamptz := '2000-01-01 00:00:00+00';
BEGIN
    INSERT INTO event_counts AS c (unit, bucket, n)
    SELECT u.unit, date_bin(u.width, m.minute, origin), sum(m.n)::bigint
    FROM (SELECT date_bin('1 minute', e."timestamp", origin) AS minute, count(*) AS n
          FROM new_events e GROUP BY 1) AS m
    CROSS JOIN (VALUES ('minute', interval '1 minute'), ('hour', interval '1 hour'),
                       ('day', interval '1 day')) AS u (unit, width)
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (unit, bucket) DO UPDATE SET n = c.n + EXCLUDED.n;

    INSERT INTO event_counts_by_user AS c (user_id, bucket, n)
    SELECT e.user_id, date_bin('1 minute', e."timestamp", origin), count(*)
    FROM new_events e
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (user_id, bucket) DO UPDATE SET n = c.n + EXCLUDED.n;

    INSERT INTO event_counts_by_key AS c (key, unit, bucket, value, n)
    SELECT k.key, u.unit, date_bin(u.width, e."timestamp", origin),
           left(e.metadata ->> k.key, 200), count(*)
    FROM new_events e
    JOIN rollup_keys k ON e.metadata ->> k.key IS NOT NULL
    CROSS JOIN (VALUES ('minute', interval '1 minute'), ('hour', interval '1 hour'),
                       ('day', interval '1 day')) AS u (unit, width)
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (key, unit, bucket, value) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END
$$;

-- Created once: CREATE OR REPLACE TRIGGER would lock events at every worker start.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'events'::regclass AND tgname = 'events_count') THEN
        CREATE TRIGGER events_count AFTER INSERT ON events
            REFERENCING NEW TABLE AS new_events
            FOR EACH STATEMENT EXECUTE FUNCTION firehose_count_events();
    END IF;
END $$;
