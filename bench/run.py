"""Benchmark Firehose on this machine and print one table: `make bench` (BENCH_ARGS=...).

    .venv/bin/python bench/run.py                      # every scenario, 20 s, 3 runs each
    .venv/bin/python bench/run.py --duration 60        # the 60 s sustained runs
    .venv/bin/python bench/run.py --quick              # smoke test: 3 s, 1 run
    .venv/bin/python bench/run.py --scenario lock-100  # one scenario (--list names them)
    .venv/bin/python bench/run.py --locust             # also how fast locust can drive
    .venv/bin/python bench/run.py --profile            # py-spy a worker during direct-100
    .venv/bin/python bench/run.py --scenario growth    # fill events to 20 M rows, measuring

It installs what is missing (wrk and nginx-light with apt-get, py-spy and the peer's
packages with pip, each announced), then starts everything it measures on 127.0.0.1 in
a temporary directory: a PostgreSQL of its own (storage.localdb, default durability),
Firehose under real gunicorn with gevent workers (gunicorn.conf.py; COLLECTOR_*
variables in the environment pass through), nginx answering 202 by itself as the
reference, nginx proxying to Firehose (conf/nginx.conf when it works here), and the
peer: the conventional collector a Python user would build instead (bench/peers/:
FastAPI on uvicorn, asyncpg COPY, no spool), from a virtualenv of its own
(var/bench-peer-venv, built once from bench/peers/requirements.txt), with as many
workers, into a table of its own in the same database; the report gives Firehose's
figures as ratios of the peer's from the same run. wrk drives the load with
bench/events.lua: realistic events, each with its own event_id, so that every request
becomes a row. Every run is bounded in time, and everything started is stopped at the
end, on failure and on Ctrl-C; on failure the logs are kept and their path printed.

Run it on an otherwise idle machine: the load generator, the collector and PostgreSQL
share its cores, and anything else running skews the figures.
"""

import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import sys
import tempfile

PROJECT = pathlib.Path(__file__).resolve().parent.parent
sys.path[0] = str(PROJECT)  # import bench.* and storage.* from the project, not from bench/

from bench import growth, install, report  # noqa: E402
from bench.database import BenchDatabase  # noqa: E402
from bench.locust_load import (SPAWN_RATE as LOCUST_SPAWN_RATE,  # noqa: E402
                               STOP_TIMEOUT as LOCUST_STOP_TIMEOUT, USERS as LOCUST_USERS)
from bench.firehose import Firehose  # noqa: E402
from bench.measure import Measurement, ScenarioRunner, Tools  # noqa: E402
from bench.nginx import Nginx  # noqa: E402
from bench.peer import Peer, PeerTable  # noqa: E402
from bench.processes import BenchError, free_port, raise_open_files_limit  # noqa: E402
from bench.profiler import FORMATS  # noqa: E402
from bench.scenarios import ALL, BATCH_EVENTS, SCENARIOS, LOCUST_SCENARIOS, Scenario  # noqa: E402
from bench.wrk import REQUEST_TIMEOUT  # noqa: E402

DEFAULT_DURATION = 20  # seconds of load per run
DEFAULT_RUNS = 3
DEFAULT_WORKERS = 2
QUICK_DURATION = 3
MIN_DRAIN_TIMEOUT = 120.0  # seconds a backlog may take to reach PostgreSQL after the load
PROJECT_NGINX_CONF = PROJECT / "conf" / "nginx.conf"
VENV_BIN = PROJECT / ".venv" / "bin"
PEER_VENV = PROJECT / "var" / "bench-peer-venv"
PEER_REQUIREMENTS = PROJECT / "bench" / "peers" / "requirements.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION, metavar="SECONDS",
                        help=f"seconds of load per run (default {DEFAULT_DURATION})")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"runs of each scenario; the table shows the median "
                             f"(default {DEFAULT_RUNS})")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"gunicorn workers, WEB_CONCURRENCY (default {DEFAULT_WORKERS})")
    parser.add_argument("--pg-nice", type=int, default=0, metavar="N",
                        help="run PostgreSQL at this nice value, 0-19 (default 0: the same "
                             "priority as the collector and wrk)")
    parser.add_argument("--pg-set", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting for the benchmark's server (repeat for "
                             "several), e.g. --pg-set shared_buffers=512MB; default: none, "
                             "PostgreSQL's defaults")
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME",
                        help="run only this scenario (repeat or comma-separate for several)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_DURATION} s runs, 1 run each")
    parser.add_argument("--locust", action="store_true",
                        help="also run locustfile.py with 1 and 2 locust processes")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy one worker during direct-100 (bench/profile-<pid>.svg)")
    parser.add_argument("--profile-format", choices=sorted(FORMATS), default="flamegraph",
                        help="py-spy's output: flamegraph (svg) or speedscope (json)")
    parser.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                        help=f"longest wait for the backlog after the load "
                             f"(default: the larger of {MIN_DRAIN_TIMEOUT:g} s and "
                             "3 x duration)")
    parser.add_argument("--rows", type=int, default=growth.DEFAULT_ROWS, metavar="N",
                        help=f"growth: the rows to fill events to (default "
                             f"{growth.DEFAULT_ROWS:,})")
    parser.add_argument("--partition-interval", choices=(*growth.INTERVALS, "both"),
                        default="both",
                        help="growth: COLLECTOR_PARTITION_INTERVAL to measure, or both in "
                             "turn (default both)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, spool) at the end")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.runs = QUICK_DURATION, 1
    if args.duration < 1 or args.runs < 1 or args.workers < 1 or args.rows < 1:
        parser.error("--duration, --runs, --workers and --rows must be at least 1")
    if not 0 <= args.pg_nice <= 19:
        parser.error("--pg-nice must be from 0 to 19")
    if any("=" not in item for item in args.pg_set):
        parser.error("--pg-set takes NAME=VALUE")
    args.pg_settings = dict(item.split("=", 1) for item in args.pg_set)
    if args.drain_timeout is None:
        args.drain_timeout = max(MIN_DRAIN_TIMEOUT, 3.0 * args.duration)
    return args


def select_scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Return the scenarios to run, in table order."""
    if not args.scenario:
        return list(SCENARIOS) + (list(LOCUST_SCENARIOS) if args.locust else [])
    names = [name.strip() for item in args.scenario for name in item.split(",") if name.strip()]
    by_name = {scenario.name: scenario for scenario in ALL}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise BenchError(f"unknown scenario(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(by_name)}")
    return [scenario for scenario in ALL if scenario.name in names]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _progress(scenario: Scenario, index: int, runs: int, m: Measurement) -> None:
    line = (f"bench: {scenario.name} run {index + 1}/{runs}: {m.rate:,.0f} req/s, "
            f"p50 {m.p50_ms:.1f} ms, p99 {m.p99_ms:.1f} ms, {m.errors} errors, "
            f"{m.non_2xx} non-2xx")
    if m.rows is not None:
        drain = "not drained" if m.drain_s is None else f"drained in {m.drain_s:.1f} s"
        rss = "/".join(f"{size:.0f}" for size in m.rss_by_worker.values())
        line += (f"; {m.rows:,} rows / {m.accepted:,} accepted, "
                 f"{m.committed_rate:,.0f} committed/s, {drain}; worker RSS {rss} MB")
    print(line, flush=True)


class Bench:
    """Everything one benchmark run starts, measures and stops."""

    def __init__(self, args: argparse.Namespace, scenarios: list[Scenario],
                 root: pathlib.Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.scenarios = scenarios
        self.root = root
        self.logs = root / "logs"
        self.stack = stack
        self.header: list[str] = []
        self.firehose: Firehose | None = None
        self.peer: Peer | None = None

    def start(self) -> ScenarioRunner:
        """Install the tools; start PostgreSQL, Firehose, and the nginx and peer asked for."""
        targets = {scenario.target for scenario in self.scenarios}
        tools = Tools(PROJECT, install.ensure_wrk(), profile_format=self.args.profile_format)
        nginx_binary = install.ensure_nginx() if targets & {"reference", "proxy"} else None
        if self.args.profile and any(s.profile for s in self.scenarios):
            tools.py_spy = install.ensure_py_spy(VENV_BIN)
        elif self.args.profile:
            print("bench: --profile samples direct-100, which is not selected", flush=True)
        if any(s.locust_processes for s in self.scenarios) and not (VENV_BIN / "locust").exists():
            raise BenchError(f"{VENV_BIN / 'locust'} is missing: pip install -e '.[dev]'")
        peer_venv = install.ensure_peer_venv(PEER_VENV, PEER_REQUIREMENTS) \
            if "peer" in targets else None
        opened = raise_open_files_limit()

        database = BenchDatabase(self.root, self.args.pg_settings)
        self.stack.callback(database.stop)
        print(f"bench: starting PostgreSQL in {database.server.data_dir}", flush=True)
        url = database.start()
        if self.args.pg_nice:
            database.lower_priority(self.args.pg_nice)
        self.firehose = Firehose(PROJECT, self.root, self.logs, url, self.args.workers)
        self.stack.callback(self.firehose.stop)
        print(f"bench: starting gunicorn ({self.args.workers} workers) on "
              f"{self.firehose.url}, log {self.firehose.log_path}", flush=True)
        self.firehose.start()
        peer_table = None
        if peer_venv is not None:
            self.peer = Peer(PROJECT, self.logs, peer_venv, url, self.args.workers)
            self.stack.callback(self.peer.stop)
            print(f"bench: starting the peer under uvicorn ({self.args.workers} workers) on "
                  f"{self.peer.url}, log {self.peer.log_path}", flush=True)
            self.peer.start()
            peer_table = PeerTable(url)
            self.stack.callback(peer_table.close)

        nginx: dict[str, Nginx] = {}
        if "reference" in targets:
            nginx["reference"] = Nginx("reference", nginx_binary, self.root / "nginx-reference",
                                       free_port())
            nginx["reference"].configure_reference()
        if "proxy" in targets:
            nginx["proxy"] = Nginx("proxy", nginx_binary, self.root / "nginx-proxy", free_port())
            for warning in nginx["proxy"].configure_proxy(self.firehose.port,
                                                          PROJECT_NGINX_CONF):
                print(f"bench: {warning}", flush=True)
        for server in nginx.values():
            self.stack.callback(server.stop)
            server.start()

        settings = " ".join(f"{k}={v}" for k, v in sorted(self.firehose.settings.items()))
        self.header = report.machine() + [
            f"software: PostgreSQL {database.version()} ("
            f"{' '.join(self.args.pg_set) or 'default settings'}"
            f"{f', nice {self.args.pg_nice}' if self.args.pg_nice else ''}), "
            f"{report.program_version([nginx_binary, '-v']) if nginx_binary else 'no nginx'}, "
            f"{report.program_version([tools.wrk, '--version'])}",
            f"firehose: gunicorn gevent, {self.args.workers} workers, "
            f"{settings or 'default COLLECTOR_* settings'}; open files limit {opened}",
        ] + [f"nginx {name}: {server.source}" for name, server in nginx.items()] + ([
            f"peer: bench/peers/fastapi_peer.py under uvicorn, {self.args.workers} workers "
            f"(uvloop, httptools, no access log), into peer_events (a primary key only: no "
            f"partitions, indexes or rollup trigger; no spool); {self.peer.versions()}"
        ] if self.peer is not None else []) + [
            f"load: {self.args.duration} s per run, {self.args.runs} run(s) per scenario, "
            f"wrk -t2 --timeout {REQUEST_TIMEOUT} with bench/events.lua (unique event_ids)",
        ]
        if any(s.locust_processes for s in self.scenarios):
            self.header.append(f"locust: locustfile.py -u {LOCUST_USERS} -r {LOCUST_SPAWN_RATE} "
                               f"--think-time 0 --stop-timeout {LOCUST_STOP_TIMEOUT}")
        return ScenarioRunner(tools, database, self.firehose, nginx, self.args.duration,
                              self.args.drain_timeout, self.logs, self.peer, peer_table)

    def measure(self, runner: ScenarioRunner) -> dict[str, list[Measurement]]:
        """Run every scenario --runs times."""
        results: dict[str, list[Measurement]] = {}
        for scenario in self.scenarios:
            print(f"bench: {scenario.name}: {scenario.title}", flush=True)
            results[scenario.name] = []
            for index in range(self.args.runs):
                measurement = runner.run(scenario, index, self.args.profile)
                results[scenario.name].append(measurement)
                _progress(scenario, index, self.args.runs, measurement)
        return results

    def print_report(self, results: dict[str, list[Measurement]],
                     runner: ScenarioRunner) -> None:
        """Print the header, the table, its footnotes and the notes."""
        print()
        print("\n".join(self.header))
        print()
        print(report.format_table(report.table_rows(results)))
        print()
        print(report.FOOTNOTES.format(timeout=REQUEST_TIMEOUT, batch=BATCH_EVENTS))
        ratios = report.peer_ratios(results)
        if ratios:
            print(f"\n{report.PEER_HEADING}")
            print("\n".join(ratios))
        lines = report.notes(results)
        if lines:
            print("\nnotes:")
            print("\n".join(lines))
        for path in runner.profiles:
            print(f"\nprofile of one worker during direct-100 written to {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    args = parse_args(argv)
    if args.list:
        for scenario in ALL:
            print(f"{scenario.name:14} {scenario.title}")
        return 0
    try:
        scenarios = select_scenarios(args)
    except BenchError as ex:
        print(f"bench: {ex}", file=sys.stderr)
        return 2
    growing = [scenario for scenario in scenarios if scenario.name == "growth"]
    if growing and len(scenarios) > 1:
        print("bench: the growth scenario runs alone (it fills its own database)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    root = pathlib.Path(tempfile.mkdtemp(prefix="firehose-bench-"))
    os.chmod(root, 0o755)  # as root, PostgreSQL runs as `postgres` and nginx's workers as www-data
    (root / "logs").mkdir()
    failed = True  # keep the logs, unless the run succeeds or is interrupted
    stack = contextlib.ExitStack()
    bench = Bench(args, scenarios, root, stack)
    try:
        with stack:
            try:
                if growing:
                    growth.run(args, PROJECT, root)
                else:
                    runner = bench.start()
                    results = bench.measure(runner)
                    bench.print_report(results, runner)
            finally:
                # Stopping (gunicorn drains, PostgreSQL shuts down) must not be cut short
                # by a second Ctrl-C.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                print("\nbench: stopping everything it started", flush=True)
        failed = False
    except BenchError as ex:
        print(f"\nbench: failed: {ex}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything it started has been stopped", file=sys.stderr)
        failed = False
        return 130
    finally:
        _clean_up(root, bench, failed, args.keep)
    return 1 if failed else 0


def _clean_up(root: pathlib.Path, bench: Bench, failed: bool, keep: bool) -> None:
    """Remove the temporary directory; on failure keep its logs and show gunicorn's last lines."""
    if keep:
        print(f"bench: kept {root}", file=sys.stderr)
        return
    if not failed:
        shutil.rmtree(root, ignore_errors=True)
        return
    logs = root / "logs"
    for log in root.glob("*.log"):  # PostgreSQL's log sits beside its data directory
        shutil.copy(log, logs / log.name)
    for item in root.iterdir():
        if item != logs:
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink()
    for collector in (bench.firehose, bench.peer):
        if collector is not None and collector.log_path.exists():
            print(collector.describe_log(), file=sys.stderr)
    print(f"bench: logs kept in {logs} (remove it when done)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
