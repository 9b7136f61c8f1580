"""The benchmark's own PostgreSQL: started in a temporary directory, counted, truncated, locked.

It runs with PostgreSQL's default settings, durability included (fsync and
synchronous_commit on): the committed rate is that of a database that keeps what it
commits, as in production. Only the port and the data directory are ours, and what
--pg-set NAME=VALUE adds. With --pg-nice its processes run at a lower CPU priority
(see lower_priority).
"""

import datetime
import os
import pathlib
import threading
import time

import psycopg2

from bench.processes import free_port
from storage import partitions
from storage.localdb import LocalPostgres
from tests.processes import children

DATABASE = "firehose_bench"
QUERY_TIMEOUT_MS = 60_000  # a count waits behind the lock scenario's LOCK TABLE, never forever
TABLES = "events, dead_letters"
# The partitions of events (the growth scenario's sizes and statistics are theirs).
PARTITIONS = ("SELECT i.inhrelid FROM pg_inherits i "
              "WHERE i.inhparent = to_regclass('events')")
SIZES = ("SELECT c.relname, pg_total_relation_size(c.oid), pg_indexes_size(c.oid) "
         f"FROM pg_class c WHERE c.oid IN ({PARTITIONS})")
ROLLUP_SIZES = ("SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0) FROM unnest("
                "array['event_counts', 'event_counts_by_user', 'event_counts_by_key']) AS t")
# Counters of the whole server (before PostgreSQL 17 the checkpoint counts are in
# pg_stat_bgwriter; from 17 on in pg_stat_checkpointer).
CHECKPOINTS_17 = "SELECT num_timed, num_requested FROM pg_stat_checkpointer"
CHECKPOINTS_OLD = "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"
WAL_BYTES = "SELECT wal_bytes FROM pg_stat_wal"
PARTITION_COUNTERS = (
    "SELECT coalesce(sum(t.autovacuum_count), 0), coalesce(sum(t.autoanalyze_count), 0), "
    "coalesce(sum(i.idx_blks_hit), 0), coalesce(sum(i.idx_blks_read), 0) "
    "FROM pg_stat_user_tables t LEFT JOIN ("
    "  SELECT relid, sum(idx_blks_hit) AS idx_blks_hit, sum(idx_blks_read) AS idx_blks_read"
    "  FROM pg_statio_user_indexes GROUP BY relid) i ON i.relid = t.relid "
    f"WHERE t.relid IN ({PARTITIONS})")


class BenchDatabase:
    """A PostgreSQL server and database of the benchmark's own, and what it asks of them."""

    def __init__(self, root: pathlib.Path, settings: dict[str, str]) -> None:
        self.server = LocalPostgres(root / "pgdata", free_port(), settings)
        self.url = ""
        self._conn = None

    @property
    def log_path(self) -> pathlib.Path:
        """Return the server's log file."""
        return self.server.log_file

    def start(self) -> str:
        """Initialise and start the server, create the database; return its URL."""
        self.url = self.server.start(DATABASE)
        return self.url

    def lower_priority(self, nice: int) -> None:
        """Run the server and the backends it will fork at this nice value.

        On this one box PostgreSQL, wrk and the workers share two cores. A production
        database runs elsewhere, or can be given a lower priority than the collector,
        whose answers wait on CPU while the flusher's writes do not (they grow into
        larger batches instead).
        """
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        for pid in [postmaster, *children(postmaster)]:
            os.setpriority(os.PRIO_PROCESS, pid, nice)

    def stop(self) -> None:
        """Close our connection and stop the server."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.server.stop("fast")

    def _query(self, sql: str) -> list[tuple]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.url,
                                          options=f"-c statement_timeout={QUERY_TIMEOUT_MS}")
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []

    def version(self) -> str:
        """Return the server's version, e.g. '15.8'."""
        return self._query("SHOW server_version")[0][0].split()[0]

    def count(self) -> int:
        """Return the number of rows in events (0 before the collector created the table)."""
        if not self._query("SELECT to_regclass('events') IS NOT NULL")[0][0]:
            return 0
        return self._query("SELECT count(*) FROM events")[0][0]

    def dead_letters(self) -> int:
        """Return the number of rows in dead_letters (0 if it does not exist)."""
        if not self._query("SELECT to_regclass('dead_letters') IS NOT NULL")[0][0]:
            return 0
        return self._query("SELECT count(*) FROM dead_letters")[0][0]

    def truncate(self) -> None:
        """Empty the tables, so that a run does not pay for the rows of the one before."""
        if self._query("SELECT to_regclass('events') IS NOT NULL")[0][0]:
            self._query(f"TRUNCATE {TABLES}")

    def setting(self, name: str) -> str:
        """Return a server setting as SHOW gives it, e.g. shared_buffers '128MB'."""
        return self._query(f"SHOW {name}")[0][0]

    def shared_buffers_bytes(self) -> int:
        """Return shared_buffers in bytes."""
        return int(self._query("SELECT pg_size_bytes(current_setting('shared_buffers'))")[0][0])

    def ensure_partitions(self, moments: list[datetime.datetime], interval: str) -> list[str]:
        """Create the partitions of `interval` the service would keep around each moment."""
        conn = psycopg2.connect(self.url)
        try:
            created = []
            for moment in moments:
                created += partitions.ensure_partitions(conn, moment, interval)
            return created
        finally:
            conn.close()

    def partition_sizes(self) -> dict[str, tuple[int, int]]:
        """Return each partition of events: (table with its indexes and TOAST, indexes) bytes."""
        return {name: (total, indexes) for name, total, indexes in self._query(SIZES)}

    def rollup_bytes(self) -> int:
        """Return the size of the rollup tables that GET /counts reads, indexes included."""
        return int(self._query(ROLLUP_SIZES)[0][0])

    def counters(self) -> dict[str, int]:
        """Return the cumulative counters the growth scenario reads causes from.

        checkpoints_timed, checkpoints_requested, wal_bytes (whole server);
        autovacuum, autoanalyze, idx_blks_hit, idx_blks_read (the partitions of events).
        An idx_blks_read is a block PostgreSQL did not find in shared_buffers: it came
        from the kernel's page cache or the disk, which these counters cannot tell apart.
        """
        new = self._query("SELECT to_regclass('pg_catalog.pg_stat_checkpointer') IS NOT NULL")
        timed, requested = self._query(CHECKPOINTS_17 if new[0][0] else CHECKPOINTS_OLD)[0]
        vacuums, analyzes, hit, read = self._query(PARTITION_COUNTERS)[0]
        return {"checkpoints_timed": int(timed), "checkpoints_requested": int(requested),
                "wal_bytes": int(self._query(WAL_BYTES)[0][0]), "autovacuum": int(vacuums),
                "autoanalyze": int(analyzes), "idx_blks_hit": int(hit),
                "idx_blks_read": int(read)}

    def lock_events(self, after: float, seconds: float) -> "TableLock":
        """Start holding ACCESS EXCLUSIVE on events for `seconds`, `after` seconds from now."""
        return TableLock(self.url, after, seconds).start()


class TableLock:
    """A separate connection that holds `LOCK TABLE events IN ACCESS EXCLUSIVE MODE` a while."""

    def __init__(self, url: str, after: float, seconds: float) -> None:
        self.url = url
        self.after = after
        self.seconds = seconds
        self.held: tuple[float, float] | None = None  # monotonic start and end
        self.error: Exception | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="table-lock", daemon=True)

    def start(self) -> "TableLock":
        """Begin (in a thread)."""
        self._thread.start()
        return self

    def join(self) -> None:
        """Wait until the lock has been released (at most its delay and duration, and a margin)."""
        self._thread.join(self.after + self.seconds + 30)

    def cancel(self) -> None:
        """Release the lock now (on Ctrl-C or failure)."""
        self._cancel.set()
        self._thread.join(10)

    def _hold(self) -> None:
        if self._cancel.wait(self.after):
            return
        try:
            conn = psycopg2.connect(self.url)
            try:
                # psycopg2 opens a transaction: the lock lasts until the rollback.
                with conn.cursor() as cur:
                    cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                    begun = time.monotonic()
                    self._cancel.wait(self.seconds)
                conn.rollback()
                self.held = (begun, time.monotonic())
            finally:
                conn.close()
        except psycopg2.Error as ex:
            self.error = ex
