"""The maintenance greenlet: registers rollup keys, makes partitions ahead, drops expired
ones, and merges the per-user count rows of closed minutes.

One per worker. Every worker runs it and the schema's advisory lock makes them take
turns (storage/partitions.py), so Firehose needs no cron job and no leader. It runs
at start, then every MAINTENANCE_INTERVAL seconds, or RETRY_INTERVAL after a failed
run (PostgreSQL unavailable). In between, every MERGE_INTERVAL seconds, one worker
(an advisory lock decides which) merges the per-user rows of the minutes closed since
(storage/rollups.py). Each run opens a connection of its own and closes it: never the
flusher's, and none left idle in between.
"""

import datetime
import logging
import time
from typing import Callable, Sequence

import gevent
import gevent.event
import psycopg2.extensions

from storage import partitions
from storage.database import ensure_schema
from storage.errors import OperationTimedOut
from storage.rollups import merge_user_minutes, register_keys

logger = logging.getLogger(__name__)

MAINTENANCE_INTERVAL = 900.0  # seconds between runs; partitions are made well ahead
RETRY_INTERVAL = 10.0  # seconds before a failed run is tried again
RUN_TIMEOUT = 120.0  # seconds one run may take (moving strays out of the default partition)
MERGE_INTERVAL = 60.0  # seconds between merges of the per-user count rows
MERGE_LAG = datetime.timedelta(minutes=1)  # a minute is merged once it has been over this long
MERGE_REACH = datetime.timedelta(minutes=10)  # how far back a worker's first merge looks
MERGE_LOCK_KEY = 0x4D455247  # "MERG": one worker merges at a time, the others skip their turn


class Maintenance:
    """Keeps the partitions of events and the rollup keys as the settings ask."""

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection],
                 rollup_keys: Sequence[str], partition_interval: str,
                 retention_days: int, metadata_index: bool = True) -> None:
        self._connect = connect
        self.rollup_keys = tuple(rollup_keys)
        self.partition_interval = partition_interval
        self.retention_days = retention_days
        self.metadata_index = metadata_index
        self._schema_ready = False
        self._failing = False
        self._merge_failing = False
        self._error: Exception | None = None  # the last step's failure, for its log line
        self._merged_until: datetime.datetime | None = None
        self._greenlet: gevent.Greenlet | None = None
        # Set once the first run has ended, done or failed: the flusher waits for it, so
        # that a fresh database gets this month's partition before its first rows (they
        # would land in the default partition and be moved out again).
        self.first_run_done = gevent.event.Event()

    def start(self) -> None:
        """Start the greenlet; its first run is at once."""
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop the greenlet, abandoning a run in progress (its transaction rolls back)."""
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=1)

    def run_once(self, now: datetime.datetime) -> dict:
        """Do every maintenance step once and return what changed."""
        conn = self._connect()
        try:
            if not self._schema_ready:
                ensure_schema(conn, self.metadata_index)  # the flusher may not have made the tables yet
                self._schema_ready = True
            done = {"keys_added": register_keys(conn, self.rollup_keys),
                    "partitions_created": partitions.ensure_partitions(
                        conn, now, self.partition_interval),
                    "partitions_dropped": []}
            if self.retention_days:
                done["partitions_dropped"] = partitions.drop_expired(conn, now,
                                                                     self.retention_days)
        finally:
            conn.close()
        if done["keys_added"]:
            logger.info("counting events per value of metadata keys %s", done["keys_added"])
        return done

    def merge_once(self, now: datetime.datetime) -> int | None:
        """Merge the per-user count rows of the minutes closed since the last merge; return
        the rows merged into, or None when another worker was merging."""
        until = now.replace(second=0, microsecond=0) - MERGE_LAG
        since = self._merged_until or until - MERGE_REACH
        if since >= until:
            return 0
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (MERGE_LOCK_KEY,))
                mine = cur.fetchone()[0]
            merged = merge_user_minutes(conn, since, until) if mine else None
            conn.commit()
        finally:
            conn.close()
        self._merged_until = until
        return merged

    def _run(self) -> None:
        next_run = 0.0  # monotonic time of the next full run
        while True:
            if time.monotonic() >= next_run:
                done = self._bounded(self.run_once)
                self.first_run_done.set()
                if done and self._failing:
                    logger.info("maintenance of partitions and rollup keys done again")
                elif not done and not self._failing:
                    logger.warning("maintenance of partitions and rollup keys failed, "
                                   "retrying every %g s: %s", RETRY_INTERVAL, self._error)
                self._failing = not done
                next_run = time.monotonic() + (MAINTENANCE_INTERVAL if done else RETRY_INTERVAL)
            elif not self._failing:
                done = self._bounded(self.merge_once)
                if not done and not self._merge_failing:
                    logger.warning("merging the per-user counts failed, retrying every "
                                   "%g s: %s", MERGE_INTERVAL, self._error)
                self._merge_failing = not done
            gevent.sleep(max(0.0, min(MERGE_INTERVAL, next_run - time.monotonic())))

    def _bounded(self, step: Callable[[datetime.datetime], object]) -> bool:
        """Run one step within RUN_TIMEOUT; tell whether it ended without an error."""
        try:
            deadline = OperationTimedOut(f"no end in {RUN_TIMEOUT:g} s")
            with gevent.Timeout(RUN_TIMEOUT, deadline):
                step(datetime.datetime.now(datetime.timezone.utc))
        except Exception as ex:
            self._error = ex
            return False
        return True
