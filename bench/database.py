"""The benchmark's own PostgreSQL: started in a temporary directory, counted, truncated, locked.

It runs with PostgreSQL's default settings, durability included (fsync and
synchronous_commit on): the committed rate is that of a database that keeps what it
commits, as in production. Only the port and the data directory are ours, and what
--pg-set NAME=VALUE adds. With --pg-nice its processes run at a lower CPU priority
(see lower_priority).
"""

import os
import pathlib
import threading
import time

import psycopg2

from bench.processes import free_port
from storage.localdb import LocalPostgres
from tests.processes import children

DATABASE = "firehose_bench"
QUERY_TIMEOUT_MS = 60_000  # a count waits behind the lock scenario's LOCK TABLE, never forever
TABLES = "events, dead_letters"


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
