"""The maintenance greenlet: registers rollup keys, makes partitions ahead, drops expired ones.

One per worker. Every worker runs it and the schema's advisory lock makes them take
turns (storage/partitions.py), so Firehose needs no cron job and no leader. It runs
at start, then every MAINTENANCE_INTERVAL seconds, or RETRY_INTERVAL after a failed
run (PostgreSQL unavailable). Each run opens a connection of its own and closes it:
never the flusher's, and none left idle in between.
"""

import datetime
import logging
from typing import Callable, Sequence

import gevent
import gevent.event
import psycopg2.extensions

from storage import partitions
from storage.database import ensure_metadata_index, ensure_schema
from storage.errors import OperationTimedOut
from storage.rollups import register_keys

logger = logging.getLogger(__name__)

MAINTENANCE_INTERVAL = 900.0  # seconds between runs; partitions are made well ahead
RETRY_INTERVAL = 10.0  # seconds before a failed run is tried again
RUN_TIMEOUT = 120.0  # seconds one run may take (moving strays out of the default partition)


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
                ensure_schema(conn)  # the flusher may not have made the tables yet
                ensure_metadata_index(conn, self.metadata_index)
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

    def _run(self) -> None:
        while True:
            try:
                deadline = OperationTimedOut(f"no end in {RUN_TIMEOUT:g} s")
                with gevent.Timeout(RUN_TIMEOUT, deadline):
                    self.run_once(datetime.datetime.now(datetime.timezone.utc))
            except Exception as ex:
                if not self._failing:
                    logger.warning("maintenance of partitions and rollup keys failed, "
                                   "retrying every %g s: %s", RETRY_INTERVAL, ex)
                self._failing = True
                self.first_run_done.set()
                gevent.sleep(RETRY_INTERVAL)
                continue
            self.first_run_done.set()
            if self._failing:
                logger.info("maintenance of partitions and rollup keys done again")
            self._failing = False
            gevent.sleep(MAINTENANCE_INTERVAL)
