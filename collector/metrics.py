"""The worker's counters: what it accepted, refused, flushed, retried and dead-lettered.

`WorkerStats` is the one place that counts. Each of its methods updates this worker's
own view (for /health) and the Prometheus metrics (for /metrics) together.

Under gunicorn the metrics are in prometheus-client's multiprocess mode:
gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client, every worker writes its values to files of its own there, and
/metrics, answered by any worker, adds up the files of all of them, the dead ones'
counters included. The gauges are "live" modes, whose files of a dead worker the
master removes (gunicorn.conf.py `child_exit`). Without that variable (tests that
build the app in-process) each app counts in a registry of its own.
"""

import os

import falcon
import prometheus_client
from prometheus_client import multiprocess

from storage.errors import WriteFailure
from storage.writer import WriteResult

NAMESPACE = "firehose"
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)
# Label values clients cannot multiply: unknown paths and methods are counted as one.
UNMATCHED_ROUTE = "unmatched"
OTHER_METHOD = "other"
# Answers that alerts count (conf/prometheus/alerts.yml), published at 0 from the start: a
# series first seen already at 3 gives Prometheus' increase() nothing to measure.
ALERTED_ROUTES = ("/event", "/events")
ALERTED_STATUSES = (500, 503)
STATM = "/proc/self/statm"  # Linux: sizes in pages; the second is the resident set


class Metrics:
    """The Prometheus metrics of one worker, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()):
            return prometheus_client.Counter(name, text, labels, namespace=NAMESPACE,
                                             registry=self.registry)

        def gauge(name: str, text: str, mode: str):
            return prometheus_client.Gauge(name, text, namespace=NAMESPACE,
                                           registry=self.registry, multiprocess_mode=mode)

        self.requests = counter("http_requests", "HTTP requests answered, by route, method "
                                "and status", ("route", "method", "status"))
        self.accepted = counter("events_accepted", "events answered 202 (in the spool)")
        self.refused = counter("events_refused", "events refused, by the field or limit at "
                               "fault", ("reason",))
        self.flushed = counter("events_flushed", "accepted events made durable in the "
                               "events table (inserted, or already there)")
        self.replayed = counter("events_replayed", "events of dead workers' spools made "
                                "durable again by their successors")
        self.inserted = counter("events_inserted", "rows inserted into the events table "
                                "(flushed or replayed; a repeated event_id is not inserted)")
        self.duplicates = counter("events_duplicate", "events written whose event_id was "
                                  "already stored")
        self.dead_lettered = counter("events_dead_lettered", "events PostgreSQL refused for "
                                     "their content, stored in dead_letters")
        self.retried = counter("write_retries", "batch writes that failed and were retried")
        # Summed over the live workers: the collector's backlog as a whole.
        self.queue_depth = gauge("queue_depth", "events held in memory", "livesum")
        self.pending = gauge("pending_events", "events accepted and not yet durable in "
                             "PostgreSQL", "livesum")
        self.spool_bytes = gauge("spool_bytes", "bytes of the workers' own spools on disk",
                                 "livesum")
        # The minimum over the live workers: 0 as soon as any worker cannot write, since
        # that worker's events pile up in its spool even if the others are fine; a dead
        # worker's last word does not count.
        self.database_up = gauge("database_up", "1 when every live worker can write to "
                                 "PostgreSQL, 0 when any cannot", "livemin")
        # The maximum over the live workers: the worst of them is what needs a look.
        self.database_broken = gauge("database_broken", "1 when a live worker cannot write "
                                     "because of a deployment error (a missing table, a "
                                     "refused password), not an outage", "livemax")
        self.spool_used_ratio = gauge("spool_used_ratio", "the fullest live worker's spool, "
                                      "as a fraction of its COLLECTOR_SPOOL_MAX_BYTES", "livemax")
        self.oldest_unflushed = gauge("oldest_unflushed_age_seconds", "age of the oldest "
                                      "event accepted and not yet durable, over the live "
                                      "workers (0 when none)", "livemax")
        # One series per live worker (label pid): a leak shows in one worker, not the sum.
        self.rss_bytes = gauge("worker_rss_bytes", "resident memory of each live worker",
                               "liveall")
        self.worker_starts = counter("worker_starts", "workers that started their pipeline; "
                                     "more than the configured count means restarts")
        self.flush_seconds = prometheus_client.Histogram(
            "flush_seconds", "seconds a successful batch write to PostgreSQL took",
            namespace=NAMESPACE, registry=self.registry, buckets=FLUSH_SECONDS_BUCKETS)
        self.batch_size = prometheus_client.Histogram(
            "batch_size", "events per batch written to PostgreSQL", namespace=NAMESPACE,
            registry=self.registry, buckets=BATCH_SIZE_BUCKETS)

    def exposition(self) -> bytes:
        """Return the metrics of every worker (multiprocess mode) or this app, as text."""
        if multiprocess_dir() is None:
            return prometheus_client.generate_latest(self.registry)
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry)


def multiprocess_dir() -> str | None:
    """Return PROMETHEUS_MULTIPROC_DIR, or None when the metrics are this process's alone."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class WorkerStats:
    """Counts since this worker started: its own view for /health, and the metrics."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.accepted = 0
        self.refused = 0
        self.flushed = 0  # own events durable in events (inserted or already there)
        self.duplicates = 0  # of those written, event_ids that were already stored
        self.dead_lettered = 0
        self.replayed = 0  # events of dead workers' spools made durable by this worker
        self.retried = 0  # failed write attempts that were retried
        self.batches = 0
        self.last_flush_at: float | None = None
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self._database_up: bool | None = None  # None until the first write attempt
        self.outage_since: float | None = None
        self.last_catch_up: dict | None = None  # backlog drained after the last outage
        # The request counter's child per (route, method, status): labels() validates and
        # locks on every call, a dict lookup does not. Bounded: every part is.
        self._request_counters: dict[tuple, object] = {}
        for route in ALERTED_ROUTES:
            for status in ALERTED_STATUSES:
                self._request_counters[(route, "POST", status)] = self.metrics.requests.labels(
                    route, "POST", str(status))

    @property
    def database_up(self) -> bool | None:
        """Whether the last attempt to reach PostgreSQL worked (None before the first)."""
        return self._database_up

    @database_up.setter
    def database_up(self, up: bool) -> None:
        self._database_up = up
        self.metrics.database_up.set(1 if up else 0)
        self._publish_broken()

    def _publish_broken(self) -> None:
        broken = self._database_up is False and self.last_error_kind == WriteFailure.SYSTEMIC.value
        self.metrics.database_broken.set(1 if broken else 0)

    def count_start(self) -> None:
        """Count this worker's start (its pipeline started)."""
        self.metrics.worker_starts.inc()

    def count_request(self, route: str | None, method: str, status: int) -> None:
        """Count one answered request (`route` is None for a path with no route)."""
        if method not in falcon.COMBINED_METHODS:
            method = OTHER_METHOD
        key = (route, method, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self.metrics.requests.labels(route or UNMATCHED_ROUTE, method, str(status))
            self._request_counters[key] = counter
        counter.inc()

    def count_accepted(self, events: int) -> None:
        """Count events answered 202."""
        self.accepted += events
        self.metrics.accepted.inc(events)

    def count_refused(self, reason: str, events: int = 1) -> None:
        """Count refused events; `reason` is a field of the contract or a limit's name."""
        self.refused += events
        self.metrics.refused.labels(reason).inc(events)

    def count_retry(self, error: str, kind: str) -> None:
        """Count a failed batch write that will be retried, and remember why it failed."""
        self.retried += 1
        self.last_error = error
        self.last_error_kind = kind
        self.metrics.retried.inc()
        self._publish_broken()  # an outage can turn into a deployment error, and back

    def count_write(self, events: int, seconds: float) -> None:
        """Record the size of a batch written and how long its successful write took."""
        self.metrics.batch_size.observe(events)
        self.metrics.flush_seconds.observe(seconds)

    def count_flushed(self, result: WriteResult, replayed: bool, now: float) -> None:
        """Count what became of a batch once durable; `replayed` for a dead worker's.

        A worker's own events count as flushed and a dead worker's as replayed, never
        both. So, summed over the workers, flushed + dead-lettered reaches accepted
        once all is durable (less what a killed worker had not flushed, which its
        successor counts as replayed); and inserted equals the rows of events even
        when a successor replays what was already flushed, as duplicates.
        """
        durable = result.inserted + result.duplicates
        self.duplicates += result.duplicates
        self.dead_lettered += result.dead_lettered
        self.batches += 1
        self.last_flush_at = now
        self.metrics.inserted.inc(result.inserted)
        self.metrics.duplicates.inc(result.duplicates)
        self.metrics.dead_lettered.inc(result.dead_lettered)
        if replayed:
            self.replayed += durable + result.dead_lettered
            self.metrics.replayed.inc(durable + result.dead_lettered)
        else:
            self.flushed += durable
            self.metrics.flushed.inc(durable)

    def sample(self, queue_depth: int, pending: int, spool_bytes: int,
               spool_max_bytes: int | None = None, oldest_age: float = 0.0) -> None:
        """Publish the worker's current backlog (and its memory) to the gauges."""
        self.metrics.queue_depth.set(queue_depth)
        self.metrics.pending.set(pending)
        self.metrics.spool_bytes.set(spool_bytes)
        if spool_max_bytes:
            self.metrics.spool_used_ratio.set(spool_bytes / spool_max_bytes)
        self.metrics.oldest_unflushed.set(oldest_age)
        rss = resident_bytes()
        if rss is not None:
            self.metrics.rss_bytes.set(rss)


def resident_bytes() -> int | None:
    """Return this process's resident memory in bytes (None where /proc cannot tell)."""
    try:
        with open(STATM, "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class RequestCounter:
    """Falcon middleware: count every answer by route, method and status."""

    def __init__(self, stats: WorkerStats) -> None:
        self._stats = stats

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        self._stats.count_request(req.uri_template, req.method, resp.status_code)
