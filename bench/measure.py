"""Run one scenario once and measure it: the client's view (wrk or locust) and PostgreSQL's.

For a scenario that reaches a collector (Firehose, or the peer of bench/peer.py,
whose /health has the same counters and whose rows go to a table of its own):

1. wait until the workers of both hold nothing unflushed, then TRUNCATE both tables;
2. note each worker's `accepted` counter (from /health);
3. run the load (and the table lock, and py-spy, if the scenario has them);
4. once the counters stop moving, the events accepted are the sum of their growth,
   which counts the requests in flight when the client stopped too;
5. poll the workers' `pending` counters (/health) until none holds an unflushed event,
   then count the rows once (and again until they reach that number, should they
   not): the drain time is measured from the end of the load, and events committed/s
   is rows / (load + drain time). Polling `count(*)` instead would itself load the
   database being measured: a sequential scan of millions of rows every poll, which
   also pushes the indexes the inserts need out of PostgreSQL's buffers.

Any disagreement (rows ≠ events accepted, fewer rows than 202s seen by the client,
dead letters, a worker restarted, errors in gunicorn's log) becomes a note.
"""

import dataclasses
import pathlib
import threading
import time

from bench.database import BenchDatabase
from bench.firehose import Firehose
from bench.locust_load import run_locust
from bench.nginx import Nginx
from bench.peer import Peer, PeerTable
from bench.processes import BenchError
from bench.profiler import Profiler
from bench.scenarios import Scenario
from bench.wrk import run_wrk

POLL_INTERVAL = 0.1  # seconds between /health snapshots (or row counts) while draining
SETTLE_INTERVAL = 0.3  # seconds between /health snapshots until the counters stop moving
SETTLE_TIMEOUT = 30.0
MAX_NOTED_LOG_LINES = 5


@dataclasses.dataclass
class Measurement:
    """The figures of one run of one scenario."""

    scenario: Scenario
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors (wrk) or failed requests (locust)
    non_2xx: int
    client_accepted: int  # events the client saw answered 202
    events_rate: float  # client_accepted per second of load
    committed_rate: float | None = None  # rows stored per second of load and drain
    drain_s: float | None = None  # None: not drained before the deadline
    rss_mb: float | None = None  # the largest worker's resident memory at the end
    rss_by_worker: dict[int, float] = dataclasses.field(default_factory=dict)
    rows: int | None = None
    accepted: int | None = None  # by the collector's own counters
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Tools:
    """The programs the runs use."""

    project: pathlib.Path
    wrk: str
    py_spy: str | None = None
    profile_format: str = "flamegraph"


class ScenarioRunner:
    """Runs scenarios against the servers the benchmark started."""

    def __init__(self, tools: Tools, database: BenchDatabase, firehose: Firehose,
                 nginx: dict[str, Nginx], seconds: float, drain_timeout: float,
                 logs: pathlib.Path, peer: Peer | None = None,
                 peer_table: PeerTable | None = None) -> None:
        self.tools = tools
        self.database = database
        self.firehose = firehose
        self.nginx = nginx
        self.peer = peer
        self.peer_table = peer_table
        self.seconds = seconds
        self.drain_timeout = drain_timeout
        self.logs = logs
        self.profiles: list[pathlib.Path] = []

    def url(self, scenario: Scenario) -> str:
        """Return the base URL the scenario's load goes to."""
        if scenario.target == "direct":
            return self.firehose.url
        if scenario.target == "peer":
            return self.peer.url
        return f"http://127.0.0.1:{self.nginx[scenario.target].port}"

    def under_test(self, scenario: Scenario) -> tuple[Firehose, BenchDatabase | PeerTable]:
        """Return the collector the scenario's load reaches and what counts its rows."""
        if scenario.target == "peer":
            return self.peer, self.peer_table
        return self.firehose, self.database

    def run(self, scenario: Scenario, index: int, profile: bool = False) -> Measurement:
        """Run the scenario once and return its measurement."""
        if not scenario.reaches_collector:
            return self._load(scenario, index)
        collector, table = self.under_test(scenario)
        self.settle()
        self.database.truncate()
        if self.peer_table is not None:
            self.peer_table.truncate()
        before = collector.accepted_by_worker()
        lock = profiler = sampler = None
        started = time.monotonic()
        try:
            if scenario.lock_table:
                lock = self.database.lock_events(
                    max(0.0, (self.seconds - scenario.lock_seconds) / 2), scenario.lock_seconds)
            if scenario.rss_every:
                sampler = RssSampler(collector, scenario.rss_every).start()
            if profile and scenario.profile and index == 0:
                profiler = Profiler(self.tools.py_spy, self.firehose.worker_pids()[0],
                                    self.seconds, self.tools.project / "bench",
                                    self.logs / "py-spy.log", self.tools.profile_format).start()
            measurement = self._load(scenario, index)
            ended = time.monotonic()
            if lock is not None:
                lock.join()
                self._note_lock(measurement, lock, started)
            if sampler is not None:
                sampler.stop()
                measurement.notes.extend(sampler.report())
            if profiler is not None:
                path = profiler.finish()
                if path is None:
                    measurement.notes.append(f"py-spy failed: see {self.logs / 'py-spy.log'}")
                else:
                    self.profiles.append(path)
        finally:
            if lock is not None:
                lock.cancel()
            if profiler is not None:
                profiler.stop()
            if sampler is not None:
                sampler.stop()
        self._measure_storage(measurement, collector, table, before, started, ended)
        return measurement

    def settle(self) -> None:
        """Wait until no worker holds an event not yet in PostgreSQL (the last drain is over)."""
        deadline = time.monotonic() + self.drain_timeout
        collectors = [self.firehose] + ([self.peer] if self.peer is not None else [])
        while True:
            pending = sum(collector.unflushed() for collector in collectors)
            if pending == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the workers still hold {pending} unflushed events after "
                                 f"{self.drain_timeout:g} s")
            time.sleep(SETTLE_INTERVAL)

    def _load(self, scenario: Scenario, index: int) -> Measurement:
        """Drive the load with wrk or locust and return the client's figures."""
        url = self.url(scenario)
        tag = f"{scenario.name}-{index + 1}"
        if scenario.locust_processes:
            result = run_locust(self.tools.project, url, scenario.locust_processes,
                                self.seconds, self.logs / tag, self.logs / f"{tag}.log")
            measurement = Measurement(scenario, result.rate, result.p50_ms, result.p99_ms,
                                      result.failures, 0, result.accepted,
                                      result.accepted / result.seconds)
            if result.failures:
                measurement.notes.append(f"{result.failures} locust failures: see "
                                         f"{self.logs / tag}/locust_failures.csv")
            return measurement
        result = run_wrk(self.tools.wrk, url + scenario.path, scenario.connections, self.seconds,
                         scenario.events_per_request, self.logs / f"{tag}.log")
        accepted = result.accepted * scenario.events_per_request
        measurement = Measurement(scenario, result.rate, result.p50_ms, result.p99_ms,
                                  result.errors, result.non_2xx, accepted,
                                  accepted / result.seconds)
        if result.errors:
            kinds = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v)
            measurement.notes.append(f"socket errors: {kinds}")
        others = {s: n for s, n in result.statuses.items() if s != 202}
        if others:
            measurement.notes.append("responses other than 202: " +
                                     ", ".join(f"{n} × {s}" for s, n in sorted(others.items())))
        return measurement

    def _settled_counters(self, collector: Firehose) -> dict[int, int]:
        """Return the workers' accepted counters once two snapshots in a row agree.

        A request the client gave up on (wrk stops with requests in flight) may
        still be accepted a moment after the client has exited.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last = collector.accepted_by_worker()
        while time.monotonic() < deadline:
            time.sleep(SETTLE_INTERVAL)
            now = collector.accepted_by_worker()
            if now == last:
                return now
            last = now
        return last

    def _measure_storage(self, measurement: Measurement, collector: Firehose,
                         table: BenchDatabase | PeerTable, before: dict[int, int],
                         started: float, ended: float) -> None:
        """Wait for the rows to reach the events accepted; fill in the storage figures."""
        after = self._settled_counters(collector)
        if set(after) != set(before):
            measurement.notes.append(f"worker(s) restarted: {sorted(set(before) - set(after))} "
                                     f"replaced by {sorted(set(after) - set(before))}")
        accepted = sum(count - before.get(pid, 0) for pid, count in after.items())
        measurement.accepted = accepted
        deadline = ended + self.drain_timeout
        while time.monotonic() < deadline and collector.unflushed():
            time.sleep(POLL_INTERVAL)
        rows = table.count()
        while rows < accepted and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
            rows = table.count()
        drained = time.monotonic()
        measurement.rows = rows
        if rows >= accepted:
            measurement.drain_s = max(0.0, drained - ended)
            measurement.committed_rate = rows / (drained - started)
        else:
            measurement.committed_rate = rows / (drained - started)
            measurement.notes.append(f"not drained after {self.drain_timeout:g} s: "
                                     f"{rows} rows of {accepted} accepted")
        if rows > accepted:
            measurement.notes.append(f"rows {rows} > events accepted {accepted} "
                                     "(a worker restarted, or rows from an earlier run)")
        if rows < measurement.client_accepted:
            measurement.notes.append(f"LOST: {measurement.client_accepted} events answered 202 "
                                     f"but {rows} rows")
        dead = table.dead_letters()
        if dead:
            measurement.notes.append(f"{dead} events dead-lettered")
        measurement.rss_by_worker = collector.rss_mb()
        measurement.rss_mb = max(measurement.rss_by_worker.values(), default=None)
        problems = collector.new_problems()
        if problems:
            shown = problems[:MAX_NOTED_LOG_LINES]
            more = len(problems) - len(shown)
            measurement.notes.append(
                f"{len(problems)} problem line(s) in {collector.log_path}: " +
                " | ".join(line[:200] for line in shown) + (f" | ... {more} more" if more else ""))

    def _note_lock(self, measurement: Measurement, lock, started: float) -> None:
        if lock.error is not None:
            measurement.notes.append(f"the table lock failed: {lock.error}")
        elif lock.held is not None:
            begun, released = lock.held
            measurement.notes.append(f"events locked from {begun - started:.1f} s to "
                                     f"{released - started:.1f} s")


class RssSampler:
    """Samples each worker's resident memory every so often, in a thread, during a run."""

    def __init__(self, firehose: Firehose, every: float) -> None:
        self.firehose = firehose
        self.every = every
        self.samples: list[tuple[float, dict[int, float]]] = []  # (seconds in, pid -> MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        """Begin sampling (at once, then every `every` seconds)."""
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(10)

    def report(self) -> list[str]:
        """Return one note per worker: its RSS at each sample, and the growth over the run."""
        notes = []
        for pid in sorted({pid for _, sample in self.samples for pid in sample}):
            series = [(at, sample[pid]) for at, sample in self.samples if pid in sample]
            values = " ".join(f"{mb:.0f}" for _, mb in series)
            notes.append(f"worker {pid} RSS MB every {self.every:g} s: {values} "
                         f"(max {max(mb for _, mb in series):.0f}, last - first "
                         f"{series[-1][1] - series[0][1]:+.0f})")
        return notes

    def _sample(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._started, self.firehose.rss_mb()))
            if self._stop.wait(self.every):
                return
