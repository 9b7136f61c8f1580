"""The flusher greenlet: take a batch from the queue, hand it to the writer, until durable.

One per worker. It waits for `batch_size` events or `flush_interval` seconds,
whichever comes first, and writes the batch in one INSERT. While PostgreSQL is
unavailable it keeps the batch and retries with capped, jittered backoff; the
requests go on being answered from memory and the spool meanwhile. Between its own
batches it replays the spools of dead workers, so neither starves the other.
"""

import logging
import time

import gevent
import gevent.event

from collector import spool as spool_module
from collector.metrics import WorkerStats
from collector.queue import EventQueue
from collector.validation import Event
from storage.backoff import Backoff
from storage.errors import OperationTimedOut, WriteFailure
from storage.writer import BatchWriter, WriteDeferred, WriteResult

logger = logging.getLogger(__name__)

ORPHAN_SCAN_INTERVAL = 10.0  # seconds between looks for dead workers' spools
LOUD_REPEAT = 30.0  # seconds between repeated error logs of a broken deployment
RESTART_DELAY = 1.0  # seconds before a crashed flusher is started again
HURRY_INTERVAL = 0.01  # flush interval once the worker is stopping
PARTITIONS_WAIT = 10.0  # longest wait at start for the first partition maintenance


class Watchdog:
    """The flusher's heartbeat: beaten before every wait and every database round trip.

    Every round trip also gets a deadline of its own: in green mode libpq's
    connect_timeout is ignored and a black-holed socket would wait forever
    (docs/gevent-and-psycopg2.md), while gunicorn keeps seeing a healthy worker.
    """

    def __init__(self, operation_timeout: float, stall_after: float) -> None:
        self.operation_timeout = operation_timeout
        self.stall_after = stall_after
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        """Record that the flusher is making progress."""
        self.last_beat = time.monotonic()

    def stalled(self, now: float) -> bool:
        """Tell whether the flusher has shown no progress for too long."""
        return now - self.last_beat > self.stall_after

    def operation(self) -> gevent.Timeout:
        """Return a deadline for one round trip to PostgreSQL (a context manager)."""
        self.beat()
        seconds = self.operation_timeout
        return gevent.Timeout(seconds, OperationTimedOut(f"no answer in {seconds:g} s"))


class DrainAbandoned(Exception):
    """The drain deadline passed before the batch was durable; the spool keeps it."""


class Flusher:
    """Moves batches from the worker's queue (and dead workers' spools) into PostgreSQL."""

    def __init__(self, queue: EventQueue, writer: BatchWriter, backoff: Backoff,
                 watchdog: Watchdog, stats: WorkerStats, spool_dir: str, own_spool: str,
                 batch_size: int, flush_interval: float,
                 partitions_ready: gevent.event.Event | None = None) -> None:
        self._queue = queue
        self._partitions_ready = partitions_ready
        self._writer = writer
        self._backoff = backoff
        self._stats = stats
        self._spool_dir = spool_dir
        self._own_spool = own_spool
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.watchdog = watchdog
        self._greenlet: gevent.Greenlet | None = None
        self._orphan: spool_module.OrphanSpool | None = None
        self._next_orphan_scan = 0.0
        self._orphan_turn = False
        self._deadline: float | None = None  # set when draining
        self._last_loud_log = 0.0
        self._catch_up: tuple[float, int] | None = None  # (began, backlog) after an outage
        self._in_flight: list | None = None  # the batch being written

    @property
    def alive(self) -> bool:
        """Tell whether the flusher greenlet is running."""
        return self._greenlet is not None and not self._greenlet.dead

    def start(self) -> None:
        """Start the greenlet."""
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(self._crashed)

    def hurry(self) -> None:
        """Write what is queued at once, without waiting for batches to fill (shutdown)."""
        self.flush_interval = HURRY_INTERVAL
        self._queue.wake()

    def drain(self, deadline: float) -> bool:
        """Flush what is queued until `deadline` (monotonic); tell whether all is durable."""
        self._deadline = deadline
        self._queue.wake()
        if self._greenlet is not None:
            self._greenlet.join(timeout=max(0.0, deadline - time.monotonic()))
            self._greenlet.kill(block=True, timeout=1)
        if self._orphan is not None:
            self._orphan.release()
            self._orphan = None
        self._writer.close()
        return self._queue.pending == 0

    def _crashed(self, greenlet: gevent.Greenlet) -> None:
        # A bug, not an outage: log it and start again; the batch is still in the spool.
        logger.error("flusher crashed, restarting it: %r", greenlet.exception)
        if self._deadline is None:
            gevent.spawn_later(RESTART_DELAY, self.start)

    def _run(self) -> None:
        try:
            self._writer.prepare()  # the schema exists as soon as the service runs
            self._stats.database_up = True
        except WriteDeferred as ex:
            self._stats.last_error, self._stats.last_error_kind = str(ex), ex.failure.value
            self._outage_began(ex, "database not ready at start, will retry")
        if self._partitions_ready is not None:
            self._partitions_ready.wait(PARTITIONS_WAIT)
        try:
            while True:
                self.watchdog.beat()
                draining = self._deadline is not None
                if draining and self._queue.pending == 0:
                    return
                if not draining and self._replay_orphan_batch():
                    continue
                self._flush_own_batch(wait=0.0 if draining else self.flush_interval)
        except DrainAbandoned:
            logger.warning("drain deadline passed with %d events pending; the spool keeps them",
                           self._queue.pending)

    def _flush_own_batch(self, wait: float) -> None:
        # A batch taken but not written (the greenlet crashed) is written first on restart.
        batch = self._in_flight or self._queue.take(self.batch_size, wait)
        if batch:
            self._in_flight = batch
            result = self._write([q.event for q in batch])
            self._in_flight = None
            self._queue.done(batch)
            self._count(result, replayed=False)
            gevent.sleep(0)  # let the requests that waited during the write run first

    def _replay_orphan_batch(self) -> bool:
        """Write one batch of a dead worker's spool when it is its turn; tell if one was."""
        now = time.monotonic()
        if self._orphan is None and now >= self._next_orphan_scan:
            self._next_orphan_scan = now + ORPHAN_SCAN_INTERVAL
            self._orphan = next(spool_module.orphans(self._spool_dir, self._own_spool), None)
            if self._orphan is not None:
                logger.info("replaying spool %s of a dead worker (%d bytes)",
                            self._orphan.directory, self._orphan.bytes)
        if self._orphan is None:
            return False
        # Alternate with this worker's own events, so that neither waits for the other.
        self._orphan_turn = not self._orphan_turn
        if not self._orphan_turn and self._queue.pending:
            return False
        try:
            payloads, position = self._orphan.read(self.batch_size)
        except OSError as ex:
            logger.error("spool %s unreadable, left for later: %s", self._orphan.directory, ex)
            self._orphan.release()
            self._orphan = None
            return False
        if payloads:
            result = self._write([self._queue.decode(p) for p in payloads])
            self._count(result, replayed=True)
        self._orphan.advance(position)
        if self._orphan.finished:
            logger.info("spool %s replayed", self._orphan.directory)
            self._orphan.remove()
            self._orphan = None
            self._next_orphan_scan = 0.0  # there may be more
        return True

    def _write(self, events: list[Event]) -> WriteResult:
        """Write a batch, retrying with backoff until it is durable (or the drain ends)."""
        while True:
            started = time.monotonic()
            try:
                result = self._writer.write(events)
            except WriteDeferred as ex:
                self._deferred(ex, len(events))
                continue
            now = time.monotonic()
            self._stats.count_write(len(events), now - started)
            self._backoff.reset(now)
            if self._stats.database_up is False:
                # From the first failure, the start-up one included.
                lasted = time.time() - (self._stats.outage_since or time.time())
                logger.info("database available again after %.1f s; backlog %d events",
                            lasted, self._queue.pending)
                self._catch_up = (now, self._queue.pending)
            self._stats.database_up = True
            self._stats.outage_since = None
            return result

    def _deferred(self, ex: WriteDeferred, size: int) -> None:
        """Note a failed attempt, log state changes, and wait before the next one."""
        now = time.monotonic()
        stats = self._stats
        stats.count_retry(str(ex), ex.failure.value)
        systemic = ex.failure is WriteFailure.SYSTEMIC
        if stats.database_up is not False:
            self._outage_began(ex, f"batch of {size} deferred, database unavailable")
        elif systemic and now - self._last_loud_log > LOUD_REPEAT:
            self._last_loud_log = now
            logger.error("batch of %d still deferred, the deployment needs fixing: %s", size, ex)
        if self._deadline is not None:
            # Stopping with the database unavailable: waiting out the graceful timeout
            # would flush nothing more, and the spool already keeps every event for the
            # worker that comes next.
            raise DrainAbandoned()
        delay = self._backoff.next_delay(now)
        self.watchdog.beat()
        gevent.sleep(delay)
        self.watchdog.beat()

    def _outage_began(self, ex: WriteDeferred, what: str) -> None:
        """Note that the database became unavailable; a broken deployment is an error."""
        self._stats.database_up = False
        self._stats.outage_since = time.time()
        self._last_loud_log = time.monotonic()
        log = logger.error if ex.failure is WriteFailure.SYSTEMIC else logger.warning
        log("%s: %s", what, ex)

    def _count(self, result: WriteResult, replayed: bool) -> None:
        stats = self._stats
        if self._catch_up is not None and self._queue.pending == 0:
            began, backlog = self._catch_up
            seconds = max(time.monotonic() - began, 1e-6)
            stats.last_catch_up = {"events": backlog, "seconds": round(seconds, 3),
                                   "events_per_s": round(backlog / seconds)}
            logger.info("backlog of %d events caught up in %.1f s (%d events/s)",
                           backlog, seconds, backlog / seconds)
            self._catch_up = None
        stats.count_flushed(result, replayed, time.time())
