"""The growth scenario: fill `events` through the service, and measure it as it grows.

    .venv/bin/python bench/run.py --scenario growth                    # 20 M rows, month and day
    .venv/bin/python bench/run.py --scenario growth --rows 300000 --partition-interval day

Every other figure of the benchmark is taken on a nearly empty table, but a collector's
table only grows (a week at 5,000 events/s is 3 billion rows), and once its indexes no
longer fit in shared_buffers, then in the kernel's page cache, an index insert may wait
for a read. For each partition interval (COLLECTOR_PARTITION_INTERVAL) this starts a
PostgreSQL and a Firehose of its own, then:

1. creates the partitions of a simulated span (SPAN_DAYS days ending now), as the
   service would have made them day after day (storage.partitions);
2. loads events through the service: POST /events batches of 500 from wrk with
   bench/growth.lua (bench/events.lua's users, metadata and unique event_ids, with
   timestamps in a window that moves forward with the rows, so that the partitions fill
   one after the other, as in production), in chunks, each drained before the next;
3. at each size of the schedule (FIRST_POINT rows or --rows/8 if smaller, then every
   --rows/8), stops loading and measures: batch-500 committed events/s (wrk for
   MEASURE_SECONDS, then the drain, as bench/measure.py counts it), POST /event req/s
   and p99 at 100 connections, the median latency of each read of docs/performance.md's set,
   the sizes of the partitions and of their indexes, and the deltas of checkpoints, WAL,
   autovacuum runs and index buffer hits;
4. prints a table per interval, then the likely causes at each size and where the
   committed rate bends; writes var/bench/growth-<interval>.csv, and a PNG beside it
   when matplotlib is installed (pip install matplotlib==MATPLOTLIB_VERSION into .venv).

The rows of the measurements stay in the table: they are part of its growth. Rows are
counted from the workers' /health counters (accepted, and pending until 0), never by
count(*), whose sequential scan would load the database and evict the indexes from
shared_buffers; one count(*) at the end checks the total.
"""

import contextlib
import csv
import dataclasses
import datetime
import http.client
import json
import math
import pathlib
import shutil
import statistics
import time
import urllib.parse

from bench import install, report
from bench.database import BenchDatabase
from bench.firehose import Firehose
from bench.processes import BenchError, raise_open_files_limit, run_bounded
from bench.scenarios import BATCH_CONNECTIONS, BATCH_EVENTS
from bench.wrk import REQUEST_TIMEOUT, RUN_MARGIN, THREADS, WrkResult, parse_output
from storage.partitions import partition_of

DEFAULT_ROWS = 20_000_000
INTERVALS = ("month", "day")
FIRST_POINT = 1_000_000  # the first measurement, then every --rows / POINTS
POINTS = 8
SPAN_DAYS = 7  # the simulated days the events' timestamps cover, ending at the start
MEASURE_SECONDS = 8  # wrk seconds of each measured load
EVENT_CONNECTIONS = 100  # POST /event, as direct-100
MEASURE_WINDOW = 60.0  # seconds of simulated time the measured events' timestamps span
LOAD_CHUNK_EVENTS = 1_000_000  # events accepted per load chunk, drained before the next
LOAD_CHUNK_MAX_SECONDS = 30
FIRST_ACCEPT_RATE = 50_000.0  # events/s guessed for the first chunk's length
DRAIN_TIMEOUT = 900.0  # longest wait for the workers to hold nothing unflushed
DRAIN_POLL = 0.2
SETTLE_POLL = 0.3
SETTLE_TIMEOUT = 30.0
READ_REPEATS = 5  # requests per read; the table shows their median
READ_TIMEOUT = 30.0  # seconds for one read request (the service cancels its query sooner)
HOT_USER = 7  # one of events.lua's 50 hot users: 0.6% of the events
RARE_METADATA = {"items": [{"sku": "SKU-00042"}]}  # about 3 events in a million
COMMON_METADATA = {"type": "purchase"}  # 1 event in 8
COUNTS_DAYS = 30
BEND_SHARE = 0.8  # the curve bends where committed/s falls below this share of its best
LOW_HIT_RATIO = 0.99  # an index hit ratio below this is named as a cause
MB = 1024 * 1024
MATPLOTLIB_VERSION = "3.11.2"
OUTPUT_DIR = pathlib.Path("var") / "bench"
SCRIPT = pathlib.Path(__file__).resolve().with_name("growth.lua")
READS = ("newest", "by user", "deep", "meta rare", "meta common", "counts")
CSV_FIELDS = ("rows", "events_bytes", "index_bytes", "hot_index_bytes", "rollup_bytes",
              "shared_buffers_bytes", "batch_committed_per_s", "batch_accepted_per_s",
              "event_req_per_s", "event_p50_ms", "event_p99_ms",
              *(f"read_{name.replace(' ', '_')}_ms" for name in READS),
              "checkpoints_timed", "checkpoints_requested", "wal_bytes", "window_s",
              "autovacuum", "autoanalyze", "index_hit_ratio")


@dataclasses.dataclass
class GrowthPoint:
    """The figures measured at one size of the table."""

    rows: int
    events_bytes: int  # the partitions of events, with indexes and TOAST
    index_bytes: int  # their indexes alone
    hot_index_bytes: int  # the indexes of the partition the measured events went to
    rollup_bytes: int
    shared_buffers_bytes: int
    batch_committed_per_s: float
    batch_accepted_per_s: float
    event_req_per_s: float
    event_p50_ms: float
    event_p99_ms: float
    reads_ms: dict[str, float]
    window: dict[str, int]  # counter deltas over the measurement
    window_s: float
    segment: dict[str, int]  # counter deltas since the previous point (load and measurement)
    partitions: dict[str, tuple[int, int]]  # each partition's (total, indexes) bytes
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def hit_ratio(self) -> float:
        """Return the share of index blocks found in shared_buffers during the measurement."""
        hit, read = self.window["idx_blks_hit"], self.window["idx_blks_read"]
        return hit / (hit + read) if hit + read else float("nan")

    def csv_row(self) -> dict[str, object]:
        """Return the point as one row of CSV_FIELDS."""
        row = {name: round(getattr(self, name), 2) for name in CSV_FIELDS[:11]}
        row.update({f"read_{name.replace(' ', '_')}_ms": round(self.reads_ms[name], 2)
                    for name in READS})
        row.update(checkpoints_timed=self.window["checkpoints_timed"],
                   checkpoints_requested=self.window["checkpoints_requested"],
                   wal_bytes=self.window["wal_bytes"], window_s=round(self.window_s, 1),
                   autovacuum=self.segment["autovacuum"],
                   autoanalyze=self.segment["autoanalyze"],
                   index_hit_ratio=round(self.hit_ratio, 4))
        return row


def schedule(rows: int) -> list[int]:
    """Return the sizes to measure at: FIRST_POINT (or rows/POINTS), then every rows/POINTS."""
    step = max(1, rows // POINTS)
    first = min(FIRST_POINT, step)
    return sorted({first, *(step * k for k in range(1, POINTS)), rows} - {0})


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


class GrowthRun:
    """One partition interval: its PostgreSQL and Firehose, the load and the measurements."""

    def __init__(self, args, project: pathlib.Path, root: pathlib.Path, wrk: str,
                 interval: str) -> None:
        self.args = args
        self.project = project
        self.root = root / interval
        self.logs = root / "logs" / interval
        self.wrk = wrk
        self.interval = interval
        self.target = args.rows
        self.loaded = 0  # events the workers accepted, and so (once drained) rows in events
        self.accept_rate = FIRST_ACCEPT_RATE
        self.load_seconds = 0.0
        self.load_rows = 0
        self.measure_seconds = 0.0
        self.span_end = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self.span_start = self.span_end - datetime.timedelta(days=SPAN_DAYS)
        self.database: BenchDatabase | None = None
        self.firehose: Firehose | None = None
        self.points: list[GrowthPoint] = []
        self.final_count: int | None = None
        self.versions = ""
        self._runs = 0
        self.csv_path = project / OUTPUT_DIR / f"growth-{interval}.csv"

    def simulated(self, rows: int) -> datetime.datetime:
        """Return the simulated moment the table reaches `rows` (the span's end at --rows)."""
        share = min(1.0, rows / self.target)
        return self.span_start + (self.span_end - self.span_start) * share

    def run(self) -> list[GrowthPoint]:
        """Start the servers, load and measure at each size, stop; return the points."""
        self.root.mkdir(parents=True)
        self.logs.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            self.database = BenchDatabase(self.root, self.args.pg_settings)
            stack.callback(self._keep_pg_log)
            stack.callback(self.database.stop)
            print(f"bench: growth {self.interval}: starting PostgreSQL in "
                  f"{self.database.server.data_dir}", flush=True)
            url = self.database.start()
            if self.args.pg_nice:
                self.database.lower_priority(self.args.pg_nice)
            self.firehose = Firehose(self.project, self.root, self.logs, url, self.args.workers)
            self.firehose.child.env["COLLECTOR_PARTITION_INTERVAL"] = self.interval
            self.firehose.settings["COLLECTOR_PARTITION_INTERVAL"] = self.interval
            stack.callback(self.firehose.stop)
            print(f"bench: growth {self.interval}: starting gunicorn ({self.args.workers} "
                  f"workers) on {self.firehose.url}, log {self.firehose.log_path}", flush=True)
            self.firehose.start()
            days = [self.span_start + datetime.timedelta(days=d) for d in range(SPAN_DAYS + 1)]
            created = self.database.ensure_partitions(days, self.interval)
            print(f"bench: growth {self.interval}: partitions for {_iso(self.span_start)} to "
                  f"{_iso(self.span_end)} ({len(created)} created by the bench)", flush=True)
            self.versions = f"PostgreSQL {self.database.version()}"
            previous = self.database.counters()
            points = schedule(self.target)
            for index, size in enumerate(points):
                last = index == len(points) - 1
                if self.loaded >= size and not last and self.points:
                    continue  # an earlier measurement's own rows went past this size
                self.load_to(size)
                point = self.measure(previous)
                previous = self.database.counters()
                self.points.append(point)
                self._progress(point)
                write_csv(self.points, self.csv_path)  # what a failure later would not lose
            self.final_count = self.database.count()
        shutil.rmtree(self.root, ignore_errors=True)  # gigabytes of data: free them at once
        return self.points

    def _keep_pg_log(self) -> None:
        if self.database is not None and self.database.log_path.exists():
            shutil.copy(self.database.log_path, self.logs / self.database.log_path.name)

    def _wrk(self, path: str, connections: int, seconds: int, per_request: int,
             window: tuple[datetime.datetime, datetime.datetime]) -> tuple[WrkResult, int]:
        """Run wrk with bench/growth.lua; return its result and the events the workers took."""
        self._runs += 1
        before = self.firehose.accepted_by_worker()
        command = [self.wrk, f"-t{THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency",
                   "--timeout", REQUEST_TIMEOUT, "-s", str(SCRIPT), self.firehose.url + path,
                   "--", str(per_request), f"{window[0].timestamp():.0f}",
                   f"{window[1].timestamp():.0f}"]
        log = self.logs / f"wrk-{self._runs:03d}-{path.strip('/')}.log"
        result = parse_output(run_bounded("wrk", command, seconds + RUN_MARGIN, log))
        after = self._settled_counters()
        if set(after) != set(before):
            raise BenchError(f"a worker restarted during the load (see "
                             f"{self.firehose.log_path}): the rows cannot be counted")
        return result, sum(count - before[pid] for pid, count in after.items())

    def _settled_counters(self) -> dict[int, int]:
        """Return the accepted counters once two snapshots agree (requests in flight landed)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last = self.firehose.accepted_by_worker()
        while time.monotonic() < deadline:
            time.sleep(SETTLE_POLL)
            now = self.firehose.accepted_by_worker()
            if now == last:
                break
            last = now
        return last

    def _drain(self, timeout: float = DRAIN_TIMEOUT) -> float | None:
        """Wait until the workers hold nothing unflushed; return when, or None past timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.firehose.unflushed() == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                return None
            time.sleep(DRAIN_POLL)

    def _drained(self) -> None:
        if self._drain() is None:
            raise BenchError(f"the workers still hold {self.firehose.unflushed()} unflushed "
                             f"events after {DRAIN_TIMEOUT:g} s")

    def load_to(self, size: int) -> None:
        """Load batches until the table holds `size` rows, in chunks, each drained."""
        while self.loaded < size:
            chunk = min(size - self.loaded, LOAD_CHUNK_EVENTS)
            seconds = max(1, min(LOAD_CHUNK_MAX_SECONDS, round(chunk / self.accept_rate)))
            window = (self.simulated(self.loaded), self.simulated(self.loaded + chunk))
            started = time.monotonic()
            result, accepted = self._wrk("/events", BATCH_CONNECTIONS, seconds, BATCH_EVENTS,
                                         window)
            self._drained()
            if accepted == 0:
                raise BenchError(f"a load chunk stored no event: wrk saw {result.statuses}")
            self.accept_rate = max(1000.0, accepted / result.seconds)
            self.load_seconds += time.monotonic() - started
            self.load_rows += accepted
            self.loaded += accepted
            print(f"bench: growth {self.interval}: {self.loaded:,} rows (load "
                  f"{self.load_rows / self.load_seconds:,.0f} rows/s)", flush=True)

    def measure(self, previous: dict[str, int]) -> GrowthPoint:
        """Measure writes and reads at the table's present size."""
        started = time.monotonic()
        before = self.database.counters()
        now = self.simulated(self.loaded)
        window = (now - datetime.timedelta(seconds=MEASURE_WINDOW), now)
        notes = []
        batch_started = time.monotonic()
        batch, accepted = self._wrk("/events", BATCH_CONNECTIONS, MEASURE_SECONDS, BATCH_EVENTS,
                                    window)
        batch_rate = batch.accepted * BATCH_EVENTS / batch.seconds
        drained = self._drain()
        if drained is None:
            pending = self.firehose.unflushed()
            notes.append(f"batch-{BATCH_EVENTS} not drained after {DRAIN_TIMEOUT:g} s: "
                         f"{pending:,} of {accepted:,} events pending")
            committed = (accepted - pending) / (time.monotonic() - batch_started)
            self._drained()
        else:
            committed = accepted / (drained - batch_started)
        notes += self._wrk_notes(f"batch-{BATCH_EVENTS}", batch)
        self.loaded += accepted
        single, accepted = self._wrk("/event", EVENT_CONNECTIONS, MEASURE_SECONDS, 1, window)
        notes += self._wrk_notes(f"POST /event -c{EVENT_CONNECTIONS}", single)
        self._drained()
        self.loaded += accepted
        reads = self.reads(now, notes)
        after = self.database.counters()
        elapsed = time.monotonic() - started
        self.measure_seconds += elapsed
        sizes = self.database.partition_sizes()
        hot = sizes.get(partition_of(now, self.interval).name, (0, 0))[1]
        dead = self.database.dead_letters()
        if dead:
            notes.append(f"{dead} events dead-lettered")
        problems = self.firehose.new_problems()
        if problems:
            notes.append(f"{len(problems)} problem line(s) in {self.firehose.log_path}: "
                         f"{problems[0][:200]}")
        return GrowthPoint(
            rows=self.loaded, events_bytes=sum(total for total, _ in sizes.values()),
            index_bytes=sum(indexes for _, indexes in sizes.values()), hot_index_bytes=hot,
            rollup_bytes=self.database.rollup_bytes(),
            shared_buffers_bytes=self.database.shared_buffers_bytes(),
            batch_committed_per_s=committed,
            batch_accepted_per_s=batch_rate,
            event_req_per_s=single.rate, event_p50_ms=single.p50_ms,
            event_p99_ms=single.p99_ms, reads_ms=reads, window=_delta(after, before),
            window_s=elapsed, segment=_delta(after, previous), partitions=sizes, notes=notes)

    @staticmethod
    def _wrk_notes(label: str, result: WrkResult) -> list[str]:
        notes = []
        if result.errors:
            notes.append(f"{label}: socket errors " + ", ".join(
                f"{k} {v}" for k, v in result.socket_errors.items() if v))
        others = {s: n for s, n in result.statuses.items() if s != 202}
        if others:
            notes.append(f"{label}: responses other than 202: " +
                         ", ".join(f"{n} × {s}" for s, n in sorted(others.items())))
        return notes

    def reads(self, now: datetime.datetime, notes: list[str]) -> dict[str, float]:
        """Time each read of docs/performance.md's set READ_REPEATS times; return medians, ms."""
        middle = self.simulated(self.loaded // 2)
        first = self._get("/events?" + urllib.parse.urlencode({"limit": 100,
                                                                "to": _iso(middle)}))[1]
        cursor = json.loads(first).get("next") or ""
        metadata = "/events?limit=100&metadata="
        paths = {
            "newest": "/events?limit=100",
            "by user": f"/events?limit=100&user_id={HOT_USER}",
            "deep": "/events?limit=100&cursor=" + urllib.parse.quote(cursor),
            "meta rare": metadata + urllib.parse.quote(json.dumps(RARE_METADATA)),
            "meta common": metadata + urllib.parse.quote(json.dumps(COMMON_METADATA)),
            "counts": "/counts?" + urllib.parse.urlencode({
                "bucket": "hour", "from": _iso(now - datetime.timedelta(days=COUNTS_DAYS)),
                "to": _iso(now)}),
        }
        medians = {}
        for name, path in paths.items():
            timings, statuses = [], set()
            for _ in range(READ_REPEATS):
                began = time.perf_counter()
                status, _ = self._get(path)
                timings.append((time.perf_counter() - began) * 1000)
                statuses.add(status)
            medians[name] = statistics.median(timings)
            if statuses != {200}:
                notes.append(f"read {name}: statuses {sorted(statuses)}")
        return medians

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.firehose.port, timeout=READ_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _progress(self, point: GrowthPoint) -> None:
        print(f"bench: growth {self.interval} at {point.rows:,} rows: batch "
              f"{point.batch_committed_per_s:,.0f} committed/s, POST /event "
              f"{point.event_req_per_s:,.0f} req/s p99 {point.event_p99_ms:.1f} ms, indexes "
              f"{point.index_bytes / MB:,.0f} MB", flush=True)


COLUMNS = ("rows", "events MB", "index MB", "hot idx MB", "rollup MB", "sb MB", "batch ev/s",
           "event req/s", "p99 ms", *READS, "ckpt t/r", "WAL MB", "autovac v/a", "idx hit %")
FOOTNOTES = f"""\
events MB: pg_total_relation_size of events' partitions (heap, TOAST, indexes); index MB:
  pg_indexes_size of the partitions; hot idx MB: the indexes of the partition the measured
  events went to; rollup MB: the tables GET /counts reads; sb MB: shared_buffers.
batch ev/s: batch-{BATCH_EVENTS} ({BATCH_CONNECTIONS} connections, {MEASURE_SECONDS} s), rows \
committed / (load + drain time);
  event req/s, p99: POST /event, {EVENT_CONNECTIONS} connections, {MEASURE_SECONDS} s.
reads, ms, median of {READ_REPEATS}: newest = GET /events?limit=100; by user = user_id \
{HOT_USER} (a hot user);
  deep = the cursor page after the first page older than half the rows;
  meta rare = metadata {json.dumps(RARE_METADATA)}; meta common = metadata \
{json.dumps(COMMON_METADATA)};
  counts = GET /counts per hour over {COUNTS_DAYS} days.
ckpt t/r, WAL MB, idx hit %: over the measurement (both loads and the reads): checkpoints
  timed / requested (pg_stat_checkpointer or pg_stat_bgwriter), pg_stat_wal wal_bytes, and
  the share of the partitions' index blocks found in shared_buffers (pg_statio_user_indexes;
  a miss may still come from the kernel's page cache). autovac v/a: autovacuum / autoanalyze
  runs on the partitions (pg_stat_user_tables) since the previous row, its load included."""


def _mb(value: int) -> str:
    return f"{value / MB:,.0f}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def table_rows(points: list[GrowthPoint]) -> list[tuple[str, ...]]:
    """Turn each point into one row of COLUMNS."""
    return [(
        f"{p.rows:,}", _mb(p.events_bytes), _mb(p.index_bytes), _mb(p.hot_index_bytes),
        _mb(p.rollup_bytes), _mb(p.shared_buffers_bytes), f"{p.batch_committed_per_s:,.0f}",
        f"{p.event_req_per_s:,.0f}",
        _ms(p.event_p99_ms), *(_ms(p.reads_ms[name]) for name in READS),
        f"{p.window['checkpoints_timed']}/{p.window['checkpoints_requested']}",
        _mb(p.window["wal_bytes"]),
        f"{p.segment['autovacuum']}/{p.segment['autoanalyze']}",
        "-" if math.isnan(p.hit_ratio) else f"{p.hit_ratio * 100:.1f}",
    ) for p in points]


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Align rows under COLUMNS, figures to the right."""
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths))
             for row in [COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def causes(point: GrowthPoint) -> list[str]:
    """Return what the counters show at this point that may slow inserts and reads."""
    found = []
    buffers = point.shared_buffers_bytes
    if point.index_bytes > buffers:
        found.append(f"indexes {point.index_bytes / buffers:.1f}× shared_buffers")
    if point.hot_index_bytes > buffers:
        found.append(f"the written partition's indexes alone "
                     f"{point.hot_index_bytes / buffers:.1f}× shared_buffers")
    if point.hit_ratio < LOW_HIT_RATIO:
        found.append(f"index hit ratio {point.hit_ratio * 100:.1f}%")
    if point.window["checkpoints_requested"]:
        found.append(f"{point.window['checkpoints_requested']} checkpoint(s) requested by WAL "
                     "volume during the measurement")
    if point.window["checkpoints_timed"]:
        found.append(f"{point.window['checkpoints_timed']} timed checkpoint(s) during the "
                     "measurement")
    found.append(f"WAL {point.window['wal_bytes'] / MB / point.window_s:,.1f} MB/s")
    if point.segment["autovacuum"] or point.segment["autoanalyze"]:
        found.append(f"{point.segment['autovacuum']} autovacuum and "
                     f"{point.segment['autoanalyze']} autoanalyze run(s) on the partitions "
                     "since the previous size")
    return found


def bend(points: list[GrowthPoint]) -> str:
    """Say where batch committed/s first falls below BEND_SHARE of its best so far."""
    best = None
    for before, point in zip(points, points[1:]):
        best = before if best is None or before.batch_committed_per_s > \
            best.batch_committed_per_s else best
        if point.batch_committed_per_s < BEND_SHARE * best.batch_committed_per_s:
            return (f"the committed rate bends between {before.rows:,} and {point.rows:,} "
                    f"rows: {best.batch_committed_per_s:,.0f} (best, at {best.rows:,}) to "
                    f"{point.batch_committed_per_s:,.0f} events/s; there: "
                    f"{'; '.join(causes(point))}")
    return (f"no bend: batch committed/s stayed above {BEND_SHARE:.0%} of its best up to "
            f"{points[-1].rows:,} rows" if points else "no point measured")


def write_csv(points: list[GrowthPoint], path: pathlib.Path) -> None:
    """Write the points, one row each, under CSV_FIELDS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(point.csv_row() for point in points)


def plot(points: list[GrowthPoint], interval: str, path: pathlib.Path) -> bool:
    """Draw committed events/s and p99 against rows into a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display: write files only
        from matplotlib import pyplot
    except ImportError:
        return False
    rows = [p.rows / 1e6 for p in points]
    figure, (rates, tail) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 6))
    rates.plot(rows, [p.batch_committed_per_s for p in points], "o-",
               label=f"batch-{BATCH_EVENTS} committed events/s")
    rates.plot(rows, [p.event_req_per_s for p in points], "s-", label="POST /event req/s")
    rates.set_ylabel("per second")
    rates.legend()
    tail.plot(rows, [p.event_p99_ms for p in points], "o-", label="POST /event p99 ms")
    tail.set_ylabel("ms")
    tail.set_xlabel("rows in events (millions)")
    tail.legend()
    figure.suptitle(f"Firehose as events grows (COLLECTOR_PARTITION_INTERVAL={interval})")
    figure.savefig(path)
    pyplot.close(figure)
    return True


def print_interval(run: GrowthRun, project: pathlib.Path) -> None:
    """Print one interval's table, causes and bend; write its CSV (and PNG)."""
    points = run.points
    print(f"\ngrowth, COLLECTOR_PARTITION_INTERVAL={run.interval}: {run.versions}, "
          f"shared_buffers {_mb(points[0].shared_buffers_bytes) if points else '?'} MB; "
          f"timestamps over {SPAN_DAYS} days ({_iso(run.span_start)} to {_iso(run.span_end)})")
    print(format_table(table_rows(points)))
    print("\nlikely causes at each size:")
    for point in points:
        print(f"  {point.rows:,}: {'; '.join(causes(point))}")
        for note in point.notes:
            print(f"    note: {note}")
    print(f"\n{bend(points)}")
    if points:
        sizes = sorted(points[-1].partitions.items())
        filled = [f"{name} {_mb(total)} ({_mb(indexes)})"
                  for name, (total, indexes) in sizes if total >= MB]
        print(f"partitions at the end, MB (of which indexes): {', '.join(filled)}; and "
              f"{len(sizes) - len(filled)} under 1 MB")
    load_rate = run.load_rows / run.load_seconds if run.load_seconds else float("nan")
    print(f"load: {run.load_rows:,} rows in {run.load_seconds:,.0f} s ({load_rate:,.0f} rows/s, "
          f"drains included); measurements {run.measure_seconds:,.0f} s")
    if run.final_count is not None and run.final_count != run.loaded:
        print(f"CHECK: count(*) gives {run.final_count:,} rows, the workers accepted "
              f"{run.loaded:,}")
    elif run.final_count is not None:
        print(f"count(*) at the end: {run.final_count:,} rows, as the workers accepted")
    csv_path = run.csv_path
    write_csv(points, csv_path)
    print(f"written: {csv_path}")
    png = csv_path.with_suffix(".png")
    if plot(points, run.interval, png):
        print(f"written: {png}")
    else:
        print(f"no PNG: matplotlib is not installed (.venv/bin/pip install "
              f"matplotlib=={MATPLOTLIB_VERSION} to get one)")


def run(args, project: pathlib.Path, root: pathlib.Path) -> None:
    """Run the growth scenario for each interval asked for and print its report."""
    wrk = install.ensure_wrk()
    # Bench-only: the curve as a picture; never part of the service's dependencies.
    install.ensure_python_package(project / ".venv" / "bin", "matplotlib",
                                  f"matplotlib=={MATPLOTLIB_VERSION}")
    opened = raise_open_files_limit()
    intervals = INTERVALS if args.partition_interval == "both" else (args.partition_interval,)
    runs = []
    for interval in intervals:
        growth = GrowthRun(args, project, root, wrk, interval)
        runs.append(growth)
        growth.run()
    print()
    print("\n".join(report.machine()))
    print(f"firehose: gunicorn gevent, {args.workers} workers; open files limit {opened}; "
          f"--rows {args.rows:,}; {report.program_version([wrk, '--version'])} with "
          f"bench/growth.lua; PostgreSQL settings: {' '.join(args.pg_set) or 'defaults'}")
    for growth in runs:
        print_interval(growth, project)
    print(f"\n{FOOTNOTES}")
