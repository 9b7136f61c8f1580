"""Event counts per time bucket: kept by the writer's INSERT, read from the rollup tables.

The writer's INSERT counts the rows it really stored (its RETURNING leaves out the
repeats ON CONFLICT skipped) in the same statement (`counted_insert`), so the counts
equal a `count(*) ... GROUP BY` on events at every commit, under concurrent workers,
retries and spool replays. Concurrent workers serialise on the row locks of the
buckets they share; each statement takes them in bucket order, and a deadlock (40P01)
is retried like any class 40 error. Buckets are UTC. What is kept, and so what can be
asked:

    all events          per minute, hour and day   event_counts
    per user            per minute (summed up)     event_counts_by_user
    per value of a key  per minute, hour and day   event_counts_by_key
                        for the keys in rollup_keys (COLLECTOR_ROLLUP_KEYS), counted
                        from the moment each was registered

The per-user rows are appended, not upserted (schema.sql says why); `merge_user_minutes`
folds the several rows of a busy user's minute into one, so that a user's count over a
month reads one row per minute at most, however many batches the user was in.

A query reads at most the rollup rows of its range: the range is bounded in buckets
by the caller, and a key's values are cut at `limit` rows.
"""

import datetime
from typing import NamedTuple, Sequence

import psycopg2.extensions

from storage.readpool import ReadPool

UNITS = ("minute", "hour", "day")
_UNITS_TABLE = "(VALUES ('minute'), ('hour'), ('day')) AS u (unit)"

# {insert}: an INSERT INTO events ... ON CONFLICT DO NOTHING, without RETURNING. The
# statement answers one row: the number of events it stored.
_COUNTED_INSERT = f"""WITH stored AS ({{insert}} RETURNING user_id, "timestamp", metadata),
totals AS (
    INSERT INTO event_counts AS c (unit, bucket, n)
    SELECT u.unit, date_trunc(u.unit, s."timestamp", 'UTC'), count(*)
    FROM stored s CROSS JOIN {_UNITS_TABLE}
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (unit, bucket) DO UPDATE SET n = c.n + EXCLUDED.n),
by_user AS (
    INSERT INTO event_counts_by_user (user_id, bucket, n)
    SELECT s.user_id, date_trunc('minute', s."timestamp", 'UTC'), count(*)
    FROM stored s
    GROUP BY 1, 2),
by_key AS (
    INSERT INTO event_counts_by_key AS c (key, unit, bucket, value, n)
    SELECT k.key, u.unit, date_trunc(u.unit, s."timestamp", 'UTC'),
           left(s.metadata ->> k.key, 200), count(*)
    FROM stored s
    JOIN rollup_keys k ON s.metadata ->> k.key IS NOT NULL
    CROSS JOIN {_UNITS_TABLE}
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (key, unit, bucket, value) DO UPDATE SET n = c.n + EXCLUDED.n)
SELECT count(*) FROM stored"""

# The (user, minute)s of [since, until) that have several rows, each made one row of
# their sum, in one statement: a reader sees the rows before or after, never between.
# Rows appended meanwhile are not in the DELETE's snapshot and stay as they are; two
# merges at once each insert the sum of the rows they deleted, so neither loses any.
MERGE_USER_MINUTES = """WITH shared AS (
    SELECT user_id, bucket FROM event_counts_by_user
    WHERE bucket >= %(since)s AND bucket < %(until)s
    GROUP BY 1, 2 HAVING count(*) > 1),
merged AS (
    DELETE FROM event_counts_by_user c USING shared s
    WHERE c.user_id = s.user_id AND c.bucket = s.bucket
      AND c.bucket >= %(since)s AND c.bucket < %(until)s
    RETURNING c.user_id, c.bucket, c.n)
INSERT INTO event_counts_by_user (user_id, bucket, n)
SELECT user_id, bucket, sum(n) FROM merged GROUP BY 1, 2"""

TOTALS = (
    "SELECT bucket, n FROM event_counts "
    "WHERE unit = %(unit)s AND bucket >= %(since)s AND bucket < %(until)s ORDER BY bucket"
)
BY_USER = (
    "SELECT date_trunc(%(unit)s, bucket, 'UTC'), sum(n)::bigint FROM event_counts_by_user "
    "WHERE user_id = %(user_id)s AND bucket >= %(since)s AND bucket < %(until)s "
    "GROUP BY 1 ORDER BY 1"
)
BY_KEY = (
    "SELECT bucket, value, n FROM event_counts_by_key "
    "WHERE key = %(key)s AND unit = %(unit)s AND bucket >= %(since)s AND bucket < %(until)s "
    "ORDER BY bucket, n DESC, value LIMIT %(limit)s"
)
KEY_SINCE = "SELECT counted_since FROM rollup_keys WHERE key = %(key)s"
REGISTER_KEYS = (
    "INSERT INTO rollup_keys (key) SELECT unnest(%s::text[]) ON CONFLICT (key) DO NOTHING "
    "RETURNING key"
)


def counted_insert(insert: str) -> str:
    """Return `insert` (INSERT INTO events ... ON CONFLICT DO NOTHING) with the rollups
    of the rows it stores; the statement answers one row, the number stored."""
    return _COUNTED_INSERT.format(insert=insert)


def merge_user_minutes(conn: psycopg2.extensions.connection, since: datetime.datetime,
                       until: datetime.datetime) -> int:
    """Make each (user, minute) of [since, until) one row; return the rows merged into."""
    with conn.cursor() as cur:
        cur.execute(MERGE_USER_MINUTES, {"since": since, "until": until})
        merged = cur.rowcount
    if not conn.autocommit:
        conn.commit()
    return merged


class CountFilter(NamedTuple):
    """What GET /counts asks for: a unit, a range of whole buckets, and at most one breakdown."""

    unit: str  # one of UNITS
    since: datetime.datetime  # the start of the first bucket
    until: datetime.datetime  # the end of the last bucket
    user_id: int | None = None  # only this user's events
    key: str | None = None  # one count per value of metadata ->> key


class Counts(NamedTuple):
    """The non-empty buckets of a range, oldest first."""

    rows: list[tuple]  # (start, count), or (start, value, count) for a key
    truncated: bool  # a key's rows were cut at the limit
    counted_since: datetime.datetime | None  # when the key began to be counted


def counts_query(wanted: CountFilter, limit: int) -> tuple[str, dict]:
    """Return the SQL and parameters that answer `wanted` from the rollups."""
    params = {"unit": wanted.unit, "since": wanted.since, "until": wanted.until,
              "user_id": wanted.user_id, "key": wanted.key, "limit": limit + 1}
    if wanted.key is not None:
        return BY_KEY, params
    if wanted.user_id is not None:
        return BY_USER, params
    return TOTALS, params


def register_keys(conn: psycopg2.extensions.connection, keys: Sequence[str]) -> list[str]:
    """Start counting per value of these metadata keys; return the ones new to the table."""
    with conn.cursor() as cur:
        cur.execute(REGISTER_KEYS, (list(keys),))
        added = [row[0] for row in cur.fetchall()]
    conn.commit()
    return added


class CountReader:
    """Answers count queries through the worker's read connections."""

    def __init__(self, pool: ReadPool) -> None:
        self._pool = pool

    def counts(self, wanted: CountFilter, limit: int) -> Counts:
        """Return the counts of `wanted`, at most `limit` rows; raise ReadFailed if it cannot."""
        query, params = counts_query(wanted, limit)
        since = None
        if wanted.key is not None:
            found = self._pool.fetch(KEY_SINCE, params)
            since = found[0][0] if found else None
        rows = self._pool.fetch(query, params)
        return Counts(rows[:limit], len(rows) > limit, since)
