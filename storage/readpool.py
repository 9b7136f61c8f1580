"""A worker's few read-only connections, apart from the flusher's, lent one greenlet at a time.

Reads (GET /events, GET /counts) never use the flusher's connection, so a slow read
cannot hold up a write, and the pool is small, so reads cannot take every connection
the server has. A psycopg2 connection is not safe for two greenlets at once: each is
lent to one caller at a time and given back when its query is done; a caller that
finds none free waits up to `wait_timeout`, then is told the reads are busy.

Each read is one statement in autocommit (never idle in a transaction), and runs
read-only, in UTC, cancelled by the server after `read_timeout` (`READ_SETTINGS`,
applied per transaction by storage/database.py, so that the reads hold behind
PgBouncer in transaction mode and on a standby alike). `threading` and `queue` are gevent's
own once gunicorn's gevent worker has monkey-patched them, so waiting is cooperative.
"""

import contextlib
import queue
import threading
from typing import Callable, ContextManager, Iterator

import psycopg2
import psycopg2.extensions

from storage import database
from storage.errors import OperationTimedOut

APPLICATION_NAME = "firehose-reader"  # apart from the flusher's "firehose" in pg_stat_activity
# jit off: a read is a short index scan, and JIT compiling costs tens of milliseconds.
READ_SETTINGS = {"transaction_read_only": "on", "TimeZone": "UTC", "jit": "off"}
QUERY_CANCELED = "57014"  # statement_timeout
REFUSED_CLASSES = ("22", "54")  # a value of the query PostgreSQL cannot take

BUSY, TIMEOUT, REFUSED, UNAVAILABLE = "busy", "timeout", "refused", "unavailable"


class ReadFailed(Exception):
    """A read could not be answered; `reason` says why: busy, timeout, refused or unavailable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReadPool:
    """At most `size` read connections, opened on demand and kept for the next read."""

    def __init__(self, dsn: str | None, size: int, read_timeout: float, wait_timeout: float,
                 bound: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self._dsn = dsn or ""
        self.size = size
        self.read_timeout = read_timeout
        self._wait_timeout = wait_timeout
        self._bound = bound  # a deadline around connecting, which green mode leaves unbounded
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue = queue.LifoQueue()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """Lend a connection for one read; a broken one is closed instead of kept."""
        if not self._slots.acquire(timeout=self._wait_timeout):
            raise ReadFailed(BUSY, f"all {self.size} read connections stayed busy for "
                                   f"{self._wait_timeout:g} s")
        conn = None
        try:
            conn = self._take()
            yield conn
        except BaseException as ex:
            if conn is not None and not conn.closed:
                if _still_usable(conn, ex):
                    self._idle.put(conn)
                else:
                    conn.close()  # it may be mid-query (a client-side timeout)
            raise
        else:
            if not conn.closed:
                self._idle.put(conn)
        finally:
            self._slots.release()

    def fetch(self, query: str, params: dict | tuple) -> list[tuple]:
        """Run one read statement and return its rows; raise ReadFailed if it cannot."""
        try:
            with self.connection() as conn, self._bound(), conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        except ReadFailed:
            raise
        except OperationTimedOut as ex:
            raise ReadFailed(TIMEOUT, str(ex)) from ex
        except (psycopg2.Error, OSError) as ex:
            code = getattr(ex, "pgcode", None) or ""
            message = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            if code == QUERY_CANCELED:
                raise ReadFailed(TIMEOUT, f"the query ran past {self.read_timeout:g} s") from ex
            if code[:2] in REFUSED_CLASSES:
                raise ReadFailed(REFUSED, message) from ex
            raise ReadFailed(UNAVAILABLE, message) from ex

    def close(self) -> None:
        """Close the idle connections."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def _take(self) -> psycopg2.extensions.connection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not conn.closed:
                return conn
        with self._bound():
            return database.connect(self._dsn, self.read_timeout, self.read_timeout,
                                    APPLICATION_NAME, settings=READ_SETTINGS)


def _still_usable(conn: psycopg2.extensions.connection, ex: BaseException) -> bool:
    """Tell whether a connection can be lent again after a read raised `ex`.

    The server refused the statement (a bad value, statement_timeout) and the
    connection is idle: yes. Anything else (a client-side timeout interrupted it
    mid-query, the network failed): no.
    """
    return (isinstance(ex, psycopg2.Error) and bool(ex.pgcode)
            and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE)
