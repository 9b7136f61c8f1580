-- Firehose schema. Applied by every worker at start under an advisory lock, so it must
-- stay idempotent: IF NOT EXISTS everywhere, never a destructive change.

CREATE TABLE IF NOT EXISTS events (
    event_id     uuid        NOT NULL,
    user_id      bigint      NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    metadata     jsonb       NOT NULL,
    received_at  timestamptz NOT NULL,
    -- A client's retry (or a spool replay) of a stored event_id is stored once.
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- Reading by time, newest first, optionally per user.
CREATE INDEX IF NOT EXISTS events_timestamp_idx ON events ("timestamp");
CREATE INDEX IF NOT EXISTS events_user_id_timestamp_idx ON events (user_id, "timestamp");

-- Events PostgreSQL refused for their content, with the reason; each at most once.
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id       uuid        NOT NULL,
    payload        bytea       NOT NULL,
    error_code     text        NOT NULL,
    error_message  text        NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_event_id_key UNIQUE (event_id)
);
