"""Event counts per time bucket, read from the rollup tables, never from events.

The trigger in schema.sql keeps the rollups in the transaction that stores the events,
counting only the rows really stored, so the counts equal a `count(*) ... GROUP BY`
on events at every commit, under concurrent workers, retries and spool replays.
Buckets are UTC. What is kept, and so what can be asked:

    all events          per minute, hour and day   event_counts
    per user            per minute (summed up)     event_counts_by_user
    per value of a key  per minute, hour and day   event_counts_by_key
                        for the keys in rollup_keys (COLLECTOR_ROLLUP_KEYS), counted
                        from the moment each was registered

A query reads at most the rollup rows of its range: the range is bounded in buckets
by the caller, and a key's values are cut at `limit` rows.
"""

import datetime
from typing import NamedTuple, Sequence

import psycopg2.extensions

from storage.readpool import ReadPool

UNITS = ("minute", "hour", "day")

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
