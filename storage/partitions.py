"""Time partitions of `events`: create them ahead, and drop whole expired ones.

`events` is partitioned by range of "timestamp" (UTC) into one partition a month
(`events_2026_11`) or a day (`events_2026_11_23`), plus `events_default`, which takes
every event no partition covers: far past and far future timestamps are stored, not
refused. The service keeps partitions from one interval before the current one to a
few ahead (`ensure_partitions`), and with a retention set, detaches and drops the
partitions that ended before it (`drop_expired`); rows are never DELETEd for
retention. Events in the default partition are never dropped.

A partition is created as a plain table and then attached: ATTACH takes only a SHARE
UPDATE EXCLUSIVE lock on `events`, which lets inserts and reads go on (CREATE TABLE
... PARTITION OF would lock them out). It does lock the default partition, which
PostgreSQL scans to check that none of its rows belong to the new range; rows that
do (an event that came early, or before the service made the partition) are moved
into the new partition in the same transaction, else ATTACH would fail.

Each change is one transaction holding the schema's advisory lock, so workers and
collectors doing it at once take turns, and each re-checks what exists once it holds
the lock. DDL lock waits are short (`DDL_LOCK_TIMEOUT`): a waiting DETACH would hold
up every insert queued behind it, so it gives up and is tried again later.
"""

import contextlib
import datetime
import logging
import re
from typing import Iterator, NamedTuple

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from storage.database import SCHEMA_LOCK_KEY

logger = logging.getLogger(__name__)

INTERVALS = ("month", "day")
AHEAD = {"month": 2, "day": 7}  # partitions kept after the current one
BEHIND = 1  # and before it, for late events
SCHEMA_LOCK_WAIT = "30s"  # longest wait for another worker's schema or partition change
DDL_LOCK_TIMEOUT = "1s"  # longest wait for the table locks of ATTACH and DETACH
DEFAULT_PARTITION = "events_default"
NAME_PATTERN = re.compile(r"events_(\d{4})_(\d{2})(?:_(\d{2}))?")
OVERLAP = "42P17"  # invalid_object_definition: a partition of another layout covers it

UTC = datetime.timezone.utc

ATTACHED = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass('events')"
)
CREATE_TABLE = ("CREATE TABLE IF NOT EXISTS {} "
                "(LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
HAS_STRAYS = ('SELECT EXISTS (SELECT 1 FROM events_default '
              'WHERE "timestamp" >= %s AND "timestamp" < %s)')
LOCK_DEFAULT = "LOCK TABLE events_default IN ACCESS EXCLUSIVE MODE"
MOVE_STRAYS = ('WITH moved AS (DELETE FROM events_default '
               'WHERE "timestamp" >= %s AND "timestamp" < %s RETURNING *) '
               "INSERT INTO {} SELECT * FROM moved")
ATTACH = "ALTER TABLE events ATTACH PARTITION {} FOR VALUES FROM (%s) TO (%s)"
DETACH = "ALTER TABLE events DETACH PARTITION {}"
DROP = "DROP TABLE {}"


class Partition(NamedTuple):
    """One partition of events: its name and the range [start, end) it holds."""

    name: str
    start: datetime.datetime
    end: datetime.datetime


def partition_of(moment: datetime.datetime, interval: str) -> Partition:
    """Return the partition of `interval` ("month" or "day") that holds `moment`."""
    moment = moment.astimezone(UTC)
    if interval == "day":
        start = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
        return Partition(f"events_{start:%Y_%m_%d}", start, start + datetime.timedelta(days=1))
    start = datetime.datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime.datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    return Partition(f"events_{start:%Y_%m}", start, end)


def wanted(now: datetime.datetime, interval: str) -> list[Partition]:
    """Return the partitions to keep around `now`: BEHIND before, AHEAD after, oldest first."""
    current = partition_of(now, interval)
    before = [current]
    for _ in range(BEHIND):
        before.insert(0, partition_of(before[0].start - datetime.timedelta(seconds=1), interval))
    after = [current]
    for _ in range(AHEAD[interval]):
        after.append(partition_of(after[-1].end, interval))
    return before + after[1:]


def parse_name(name: str) -> Partition | None:
    """Return the partition a name of ours stands for, or None for any other table."""
    match = NAME_PATTERN.fullmatch(name)
    if not match:
        return None
    year, month, day = match.groups()
    try:
        moment = datetime.datetime(int(year), int(month), int(day or 1), tzinfo=UTC)
    except ValueError:
        return None
    return partition_of(moment, "day" if day else "month")


def attached(conn: psycopg2.extensions.connection) -> list[str]:
    """Return the names of the partitions of events (none if events does not exist)."""
    with conn.cursor() as cur:
        cur.execute(ATTACHED)
        names = [row[0] for row in cur.fetchall()]
    conn.commit()
    return names


def ensure_partitions(conn: psycopg2.extensions.connection, now: datetime.datetime,
                      interval: str) -> list[str]:
    """Create and attach the partitions wanted around `now`; return the names created."""
    existing = set(attached(conn))
    return [p.name for p in wanted(now, interval) if p.name not in existing and _create(conn, p)]


def drop_expired(conn: psycopg2.extensions.connection, now: datetime.datetime,
                 retention_days: int) -> list[str]:
    """Detach and drop the partitions whose whole range is older than the retention."""
    cutoff = now - datetime.timedelta(days=retention_days)
    dropped = []
    for name in attached(conn):
        partition = parse_name(name)
        if partition is None or partition.end > cutoff:
            continue
        with _transaction(conn) as cur:
            if name not in _attached_now(cur):
                continue  # another worker dropped it meanwhile
            cur.execute(sql.SQL(DETACH).format(sql.Identifier(name)))
            cur.execute(sql.SQL(DROP).format(sql.Identifier(name)))
        logger.info("partition %s dropped: it ended %s, before the retention of %d days",
                    name, partition.end.date(), retention_days)
        dropped.append(name)
    return dropped


def _create(conn: psycopg2.extensions.connection, partition: Partition) -> bool:
    """Create one partition, moving into it the rows of its range from the default one."""
    name = sql.Identifier(partition.name)
    try:
        with _transaction(conn) as cur:
            if partition.name in _attached_now(cur):
                return False  # another worker made it meanwhile
            cur.execute(sql.SQL(CREATE_TABLE).format(name))
            # ATTACH takes this lock anyway; taking it first keeps strays from arriving
            # between the move and the attach.
            cur.execute(LOCK_DEFAULT)
            cur.execute(HAS_STRAYS, (partition.start, partition.end))
            if cur.fetchone()[0]:
                cur.execute(sql.SQL(MOVE_STRAYS).format(name), (partition.start, partition.end))
                logger.warning("moved %d events from %s into new partition %s",
                               cur.rowcount, DEFAULT_PARTITION, partition.name)
            cur.execute(sql.SQL(ATTACH).format(name), (partition.start, partition.end))
    except psycopg2.Error as ex:
        if ex.pgcode != OVERLAP:
            raise
        # A partition of the other interval covers part of this range (the setting was
        # changed); its events go there or to the default partition until it ends.
        logger.warning("partition %s not created: %s", partition.name,
                       str(ex).strip().splitlines()[0])
        return False
    logger.info("partition %s created for [%s, %s)", partition.name,
                partition.start.isoformat(), partition.end.isoformat())
    return True


@contextlib.contextmanager
def _transaction(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.cursor]:
    """Run one step of partition DDL in a transaction, under the schema lock."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (SCHEMA_LOCK_WAIT,))
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (DDL_LOCK_TIMEOUT,))
            yield cur
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise
    conn.commit()


def _attached_now(cur: psycopg2.extensions.cursor) -> list[str]:
    cur.execute(ATTACHED)
    return [row[0] for row in cur.fetchall()]


class PartitionSize(NamedTuple):
    """One partition of events as the catalog sees it: its bounds, rows and size on disk."""

    name: str
    start: str | None  # the bounds in UTC, as PostgreSQL prints them; None for the default
    end: str | None
    rows: int | None  # pg_class.reltuples: an estimate, None until VACUUM or ANALYZE ran
    bytes: int  # table, indexes and TOAST


SIZES = (
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint, "
    "pg_total_relation_size(c.oid) "
    "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass('events') ORDER BY c.relname"
)
BOUNDS = re.compile(r"FOR VALUES FROM \('(.*)'\) TO \('(.*)'\)")


def sizes(conn: psycopg2.extensions.connection) -> list[PartitionSize]:
    """Return every partition of events with its bounds, estimated rows and bytes."""
    with conn.cursor() as cur:
        # The bounds print in the session's time zone: UTC for this query string, which is
        # one transaction even in autocommit.
        cur.execute("SELECT set_config('TimeZone', 'UTC', true); " + SIZES)
        found = cur.fetchall()
    conn.commit()
    result = []
    for name, bound, rows, size in found:
        match = BOUNDS.fullmatch(bound or "")
        start, end = match.groups() if match else (None, None)
        result.append(PartitionSize(name, start, end, rows if rows >= 0 else None, size))
    return result
