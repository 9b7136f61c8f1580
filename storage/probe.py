"""Look at a database before the collector uses it: are its tables there, may it write them.

For `firehose check`. Writing is proven by doing it: one transaction inserts an event (so
the rollup trigger runs too) and a dead letter, as the collector's writer would, and is
rolled back, leaving nothing behind.
"""

import re
import uuid

import psycopg2.extensions

from storage.database import SCHEMA_PATH

TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA_PATH.read_text()))
SERVER = "SELECT current_setting('server_version'), current_user"
MISSING = "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL"
PROBE_EVENT = ('INSERT INTO events (event_id, user_id, "timestamp", metadata, received_at) '
               "VALUES (%s, 0, now(), '{}', now())")
PROBE_DEAD_LETTER = ("INSERT INTO dead_letters (event_id, payload, error_code, error_message) "
                     "VALUES (%s, '', 'probe', 'firehose check')")


def server(conn: psycopg2.extensions.connection) -> tuple[str, str]:
    """Return the server's version and the user the connection logged in as."""
    with conn.cursor() as cur:
        cur.execute(SERVER)
        found = cur.fetchone()
    if not conn.autocommit:
        conn.rollback()
    return found


def missing_tables(conn: psycopg2.extensions.connection) -> list[str]:
    """Return the tables of schema.sql that the database lacks."""
    with conn.cursor() as cur:
        cur.execute(MISSING, (list(TABLES),))
        missing = [row[0] for row in cur.fetchall()]
    if not conn.autocommit:
        conn.rollback()
    return missing


def probe_writes(conn: psycopg2.extensions.connection) -> None:
    """Write an event and a dead letter in one transaction and roll it back; raise if refused."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            probe_id = str(uuid.uuid4())
            cur.execute(PROBE_EVENT, (probe_id,))
            cur.execute(PROBE_DEAD_LETTER, (probe_id,))
    finally:
        if not conn.closed:
            conn.rollback()
            conn.autocommit = autocommit
