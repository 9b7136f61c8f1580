"""The peer under test: the conventional FastAPI collector (bench/peers/), under uvicorn.

It runs from a virtualenv of its own (bench/install.py `ensure_peer_venv`), with the
same number of workers as Firehose and the benchmark's database, into a table of
its own (`peer_events`, which it creates). Its workers answer /health with the same
`worker_pid`, `accepted` and `pending` counters as Firehose's, so the benchmark
polls and sums them the same way (bench/firehose.py) to wait for its drain.
"""

import os
import pathlib
import random
import re
import subprocess
import time

import psycopg2

from bench.firehose import HEALTH_DEADLINE, Firehose
from bench.processes import BenchError, Child, free_port, wait_until
from tests.processes import children

START_TIMEOUT = 60.0
QUERY_TIMEOUT_MS = 60_000
TABLE = "peer_events"  # as bench/peers/fastapi_peer.py names it
APP_DIR = pathlib.Path("bench") / "peers"
APP = "fastapi_peer:app"
PACKAGES = ("fastapi", "uvicorn", "uvloop", "httptools", "pydantic", "asyncpg")
# uvicorn's workers are multiprocessing's spawned children; the master's other child
# is multiprocessing's resource tracker, which answers no /health.
WORKER_COMMAND = "spawn_main"
# Lines of uvicorn's log that mean something went wrong: the peer's own errors (a batch
# dropped or retried, events lost at exit), a traceback, a worker replaced.
# uvicorn's workers share one listening socket: back-to-back connections are all accepted
# by whichever worker is awake, so /health is asked at random moments until each answers.
PROBE_PAUSE = 0.02  # at most, seconds between two /health connections
PROBLEM = re.compile(r"Traceback|^(ERROR|CRITICAL|WARNING):|died|Started server process",
                     re.MULTILINE)


class Peer(Firehose):
    """The uvicorn master and its workers; their /health is read as Firehose's is."""

    problem = PROBLEM
    log_name = "peer log"

    def __init__(self, project: pathlib.Path, logs: pathlib.Path, venv: pathlib.Path,
                 database_url: str, workers: int) -> None:
        self.project = project
        self.venv = venv
        self.port = free_port()
        self.workers = workers
        self.log_path = logs / "peer.log"
        self.settings: dict[str, str] = {}
        env = dict(os.environ, PEER_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
        self.child = Child("uvicorn", [
            str(venv / "bin" / "uvicorn"), "--app-dir", str(APP_DIR), APP,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools",
            # on: a failed startup (no database) stops the worker instead of being ignored
            "--lifespan", "on",
            "--no-access-log",  # gunicorn keeps none for Firehose either
        ], self.log_path, env, project)
        self._log_mark = 0

    def _all_workers_up(self) -> bool:
        if not self.child.running():
            raise BenchError("uvicorn exited during start")
        pids = self.worker_pids()
        if len(pids) != self.workers:
            return False
        health = self.health_by_worker()
        return all(h.get("writer_alive") for h in health.values())

    def start(self) -> "Peer":
        """Start uvicorn and wait until every worker answers /health with its writer alive."""
        self.child.start()
        wait_until(self._all_workers_up, START_TIMEOUT,
                   f"{self.workers} uvicorn workers on port {self.port}")
        self._log_mark = self._log_size()
        return self

    def health_by_worker(self) -> dict[int, dict]:
        """Return /health of every live worker, by pid."""
        wanted = set(self.worker_pids())
        seen: dict[int, dict] = {}
        deadline = time.monotonic() + HEALTH_DEADLINE
        while time.monotonic() < deadline:
            health = self._health_once()
            seen[health["worker_pid"]] = health
            if wanted <= seen.keys():
                return {pid: seen[pid] for pid in sorted(wanted)}
            time.sleep(random.uniform(0, PROBE_PAUSE))
        raise BenchError(f"/health never came from workers {sorted(wanted - seen.keys())} "
                         f"in {HEALTH_DEADLINE:g} s")

    def worker_pids(self) -> list[int]:
        """Return the pids of the master's live worker processes."""
        if not self.child.running():
            return []
        pids = []
        for pid in children(self.child.pid):
            try:
                command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if WORKER_COMMAND.encode() in command:
                pids.append(pid)
        return pids

    def versions(self) -> str:
        """Return the versions of the peer's packages, e.g. 'fastapi 0.163.2, uvicorn 0.54.0'."""
        script = ("import importlib.metadata as m, sys; "
                  "print(', '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))")
        result = subprocess.run([str(self.venv / "bin" / "python"), "-c", script, *PACKAGES],
                                capture_output=True, text=True, timeout=30)
        return result.stdout.strip() or "?"


class PeerTable:
    """The peer's table in the benchmark's database: counted and emptied as `events` is."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn = None

    def _query(self, sql: str) -> list[tuple]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.url,
                                          options=f"-c statement_timeout={QUERY_TIMEOUT_MS}")
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []

    def count(self) -> int:
        """Return the number of rows in the peer's table."""
        return self._query(f"SELECT count(*) FROM {TABLE}")[0][0]

    def dead_letters(self) -> int:
        """Return 0: the peer keeps no dead letters (what it drops shows as LOST)."""
        return 0

    def truncate(self) -> None:
        """Empty the peer's table."""
        self._query(f"TRUNCATE {TABLE}")

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
