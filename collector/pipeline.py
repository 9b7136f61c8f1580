"""One worker's ingestion pipeline: spool, queue, flusher and writer (and the maintenance
greenlet of partitions and rollup keys), wired from settings.

Built in `get_app()`, started after the fork by gunicorn's `post_worker_init` hook
(never in the master: a greenlet started there does not run in the worker), drained by `worker_exit`.
"""

import functools
import logging
import os
import time
from typing import Callable

import gevent

from collector.flusher import Flusher, Watchdog
from collector.maintenance import Maintenance
from collector.metrics import WorkerStats
from collector.queue import EventQueue
from collector.settings import Settings
from collector.spool import Spool, SpoolUnwritable
from collector.validation import Event
from storage import database
from storage.backoff import Backoff
from storage.writer import BatchWriter

logger = logging.getLogger(__name__)

ROUND_TRIP_MARGIN = 2.0  # seconds past statement_timeout before the client gives up
STALL_MARGIN = 30.0  # seconds of no flusher progress, past its own deadlines, that mean stuck
READY_SPOOL_FRACTION = 0.9  # past this share of its disk budget the worker is not ready
SHUTDOWN_POLL = 0.1  # seconds between looks at gunicorn's worker.alive
SHUTDOWN_MARGIN = 2.0  # seconds kept free before gunicorn's SIGKILL
MAINTENANCE_STATEMENT_TIMEOUT = 60.0  # seconds for one partition step (moving strays)
GAUGE_INTERVAL = 1.0  # seconds between updates of the backlog gauges of /metrics
# gunicorn's APP_LOAD_ERROR: when a booting worker exits with it, the master stops instead
# of booting another (gunicorn 27 arbiter.reap_workers), and conf/firehose.service's
# RestartPreventExitStatus keeps systemd from starting it again.
APP_LOAD_ERROR = 4


class Pipeline:
    """Accepts events into the spool and queue and moves them to PostgreSQL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self.spool = Spool(settings.spool_dir, settings.spool_segment_bytes,
                           settings.spool_max_bytes, settings.spool_fsync,
                           settings.spool_fsync_interval)
        self.queue = EventQueue(self.spool, settings.queue_capacity, settings.batch_size)
        round_trip = max(settings.statement_timeout, settings.connect_timeout) + ROUND_TRIP_MARGIN
        self.watchdog = Watchdog(round_trip, round_trip + settings.retry_max_delay + STALL_MARGIN)
        connect = functools.partial(database.connect, settings.database_url,
                                    settings.statement_timeout, settings.lock_timeout)
        self.writer = BatchWriter(connect, bound=self.watchdog.operation,
                                  insert_method=settings.insert_method)
        self.maintenance = Maintenance(
            functools.partial(database.connect, settings.database_url,
                              MAINTENANCE_STATEMENT_TIMEOUT, settings.lock_timeout,
                              application_name="firehose-maintenance", autocommit=False),
            settings.rollup_keys, settings.partition_interval, settings.retention_days,
            metadata_index=settings.wants_metadata_index)
        self.flusher = Flusher(self.queue, self.writer, Backoff(settings.retry_max_delay),
                               self.watchdog, self.stats, settings.spool_dir,
                               str(self.spool.directory), settings.batch_size,
                               settings.flush_interval, self.maintenance.first_run_done)
        self.started = False
        self.shutdown_began: float | None = None

    def start(self, worker_alive: Callable[[], bool] | None = None) -> None:
        """Open the spool and start the flusher; call once, in the worker, after the fork.

        A spool directory that cannot be written ends the worker with APP_LOAD_ERROR,
        which stops gunicorn's master too (a full disk does not: see Spool.open).

        `worker_alive` (gunicorn's `worker.alive`) lets the flusher learn of a graceful
        stop at once: the gevent worker may spend most of graceful_timeout waiting for
        keep-alive connections before worker_exit runs (gunicorn#2303), so draining
        starts here, and worker_exit only waits for it.
        """
        # psycopg2 must wait cooperatively, or every query freezes the worker.
        import psycogreen.gevent
        psycogreen.gevent.patch_psycopg()
        try:
            self.spool.open()
        except SpoolUnwritable as ex:
            # A deployment error that no restart fixes: one line, no traceback, no boot loop.
            logger.error("%s; stopping with exit status %d (not restarted by systemd)",
                         ex, APP_LOAD_ERROR)
            raise SystemExit(APP_LOAD_ERROR) from None
        self.flusher.start()
        self.maintenance.start()
        self.started = True
        self.stats.count_start()
        if worker_alive is not None:
            gevent.spawn(self._watch_for_shutdown, worker_alive)
        gevent.spawn(self._publish_gauges)
        logger.info("pipeline started: spool %s, %r", self.spool.directory, self.settings)

    def accept(self, events: list[Event]) -> None:
        """Make events durable in the spool and queue them; raise SpoolFull when out of room."""
        self.queue.put(events)
        self.stats.count_accepted(len(events))

    def stop(self, graceful_timeout: float) -> None:
        """Flush what is queued until gunicorn's graceful timeout nears; the spool keeps the rest."""
        if not self.started:
            return
        self._begin_shutdown()
        self.maintenance.stop()
        deadline = self.shutdown_began + graceful_timeout - SHUTDOWN_MARGIN
        pending = self.queue.pending
        drained = self.flusher.drain(deadline)
        removed = self.spool.close()
        if drained and removed:
            logger.info("drained %d events; spool removed", pending)
        else:
            logger.warning("stopped with %d events not flushed; they stay in spool %s "
                           "for the next worker", self.queue.pending, self.spool.directory)

    def _publish_gauges(self) -> None:
        # Any worker may answer /metrics, so each one keeps its own gauges current.
        while True:
            self.stats.sample(self.queue.depth, self.queue.pending, self.spool.bytes,
                              self.spool.max_bytes, self.queue.oldest_age(time.time()))
            gevent.sleep(GAUGE_INTERVAL)

    def _watch_for_shutdown(self, worker_alive: Callable[[], bool]) -> None:
        while worker_alive():
            gevent.sleep(SHUTDOWN_POLL)
        self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if self.shutdown_began is None:
            self.shutdown_began = time.monotonic()
            self.flusher.hurry()

    def health(self) -> dict:
        """Describe this worker's state, for /health."""
        now = time.time()
        stats = self.stats
        return {
            "status": "ok",
            "worker_pid": os.getpid(),
            "queue_depth": self.queue.depth,
            "queue_capacity": self.queue.capacity,
            "pending": self.queue.pending,
            "overflowing_to_spool": self.queue.overflowing,
            "spool_bytes": self.spool.bytes,
            "spool_max_bytes": self.spool.max_bytes,
            "oldest_unflushed_age_s": round(self.queue.oldest_age(now), 3),
            "accepted": stats.accepted,
            "refused": stats.refused,
            "flushed": stats.flushed,
            "duplicates": stats.duplicates,
            "dead_lettered": stats.dead_lettered,
            "replayed": stats.replayed,
            "retried": stats.retried,
            "batches": stats.batches,
            "last_flush_at": stats.last_flush_at,
            "last_flush_error": stats.last_error,
            "last_flush_error_kind": stats.last_error_kind,
            "database": self._database_state(),
            "outage_since": stats.outage_since,
            "last_catch_up": stats.last_catch_up,
            "flusher_alive": self.flusher.alive,
        }

    def readiness(self) -> tuple[bool, dict]:
        """Tell whether this worker can take work, and why not; the database is only reported."""
        problems = []
        if not self.started:
            problems.append("worker is not running")
        elif self.shutdown_began is not None:
            problems.append("worker is stopping")
        elif not self.flusher.alive:
            problems.append("flusher is not running")
        elif self.watchdog.stalled(time.monotonic()):
            problems.append("flusher made no progress for "
                            f"{self.watchdog.stall_after:g} s")
        disk_problem = self.spool.disk_problem()
        if disk_problem is not None:
            problems.append(disk_problem)  # the disk, not the budget
        elif self.spool.bytes >= self.spool.max_bytes * READY_SPOOL_FRACTION:
            problems.append("spool is full")
        body = {
            "status": "ready" if not problems else "not ready",
            "problems": problems,
            "database": self._database_state(),
            "last_flush_error_kind": self.stats.last_error_kind,
            "queue_depth": self.queue.depth,
            "spool_bytes": self.spool.bytes,
        }
        return not problems, body

    def _database_state(self) -> str:
        """Return up, down (unreachable or refusing), broken (a deployment error) or unknown."""
        if self.stats.database_up is None:
            return "unknown"
        if self.stats.database_up:
            return "up"
        return "broken" if self.stats.last_error_kind == "systemic" else "down"
