"""Firehose under test: real gunicorn with gevent workers, as `make run` starts it.

It is started from the project's gunicorn.conf.py with its own port, spool directory
and log. Each worker keeps its own counters, so /health is asked of every worker (new
connections land on one worker or another, SO_REUSEPORT) and the answers are summed.
"""

import http.client
import json
import os
import pathlib
import re
import time

from bench.processes import BenchError, Child, free_port, tail, wait_until
from tests.processes import children

START_TIMEOUT = 60.0
HEALTH_TIMEOUT = 5.0  # seconds for one /health request
HEALTH_TRIES = 400  # new connections tried to reach every worker at least once
HEALTH_DEADLINE = 30.0  # seconds all those tries may take together
# Lines of gunicorn's log that mean something went wrong in the service.
# The log is JSON lines ("level": "ERROR") unless a terminal asked for plain ones.
PROBLEM = re.compile(r'Traceback|"level": "(ERROR|CRITICAL)"|\[ERROR\]|\[CRITICAL\]|WORKER TIMEOUT|'
                     r"Worker \(pid:\d+\) (was sent|exited)|Booting worker|out of memory",
                     re.IGNORECASE)
PASSED_THROUGH = re.compile(r"COLLECTOR_.*")  # settings a user may set for a bench run
NOT_PASSED = ("DATABASE_URL", "GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "PORT", "HOST")


class Firehose:
    """One gunicorn master and its workers, with the spool and log of their own."""

    problem = PROBLEM  # what a line of the log that shows a failure looks like
    log_name = "gunicorn log"

    def __init__(self, project: pathlib.Path, root: pathlib.Path, logs: pathlib.Path,
                 database_url: str, workers: int) -> None:
        self.project = project
        self.port = free_port()
        self.workers = workers
        self.log_path = logs / "gunicorn.log"
        self.settings = {k: v for k, v in os.environ.items() if PASSED_THROUGH.fullmatch(k)}
        env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
        env.update(DATABASE_URL=database_url, COLLECTOR_SPOOL_DIR=str(root / "spool"),
                   WEB_CONCURRENCY=str(workers), PYTHONUNBUFFERED="1")
        gunicorn = project / ".venv" / "bin" / "gunicorn"
        self.child = Child("gunicorn", [str(gunicorn), "-c", "gunicorn.conf.py",
                                        "--bind", f"127.0.0.1:{self.port}"],
                           self.log_path, env, project)
        self._log_mark = 0

    @property
    def url(self) -> str:
        """Return the base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Firehose":
        """Start gunicorn and wait until every worker answers /health with its flusher alive."""
        self.child.start()  # on failure, bench/run.py shows the log's last lines
        wait_until(self._all_workers_up, START_TIMEOUT,
                   f"{self.workers} gunicorn workers on port {self.port}")
        self._log_mark = self._log_size()
        return self

    def _all_workers_up(self) -> bool:
        if not self.child.running():
            raise BenchError("gunicorn exited during start")
        pids = self.worker_pids()
        if len(pids) != self.workers:
            return False
        health = self.health_by_worker()
        return all(h.get("flusher_alive") for h in health.values())

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: the workers flush what they hold), killing past a timeout."""
        self.child.stop()

    def worker_pids(self) -> list[int]:
        """Return the pids of the master's live worker processes."""
        return children(self.child.pid) if self.child.running() else []

    def _health_once(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HEALTH_TIMEOUT)
        try:
            conn.request("GET", "/health", headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise BenchError(f"GET /health answered {response.status}: {body[:300]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def health_by_worker(self) -> dict[int, dict]:
        """Return /health of every live worker, by pid."""
        wanted = set(self.worker_pids())
        seen: dict[int, dict] = {}
        deadline = time.monotonic() + HEALTH_DEADLINE
        for _ in range(HEALTH_TRIES):
            if time.monotonic() > deadline:
                break
            health = self._health_once()
            seen[health["worker_pid"]] = health
            if wanted <= seen.keys():
                return {pid: seen[pid] for pid in sorted(wanted)}
        raise BenchError(f"/health never came from workers {sorted(wanted - seen.keys())} "
                         f"in {HEALTH_TRIES} connections or {HEALTH_DEADLINE:g} s")

    def unflushed(self) -> int:
        """Return the events the workers accepted and hold, not yet durable in PostgreSQL."""
        return sum(health["pending"] for health in self.health_by_worker().values())

    def accepted_by_worker(self) -> dict[int, int]:
        """Return each worker's count of accepted events."""
        return {pid: health["accepted"] for pid, health in self.health_by_worker().items()}

    def rss_mb(self) -> dict[int, float]:
        """Return each worker's resident memory (VmRSS) in MiB."""
        sizes = {}
        for pid in self.worker_pids():
            try:
                status = pathlib.Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                sizes[pid] = int(match.group(1)) / 1024
        return sizes

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def new_problems(self) -> list[str]:
        """Return the log lines since the last call that show a failure (errors, restarts)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_mark)
            data = log.read()
        self._log_mark += len(data)
        text = data.decode(errors="replace")
        return [line for line in text.splitlines() if self.problem.search(line)]

    def describe_log(self, lines: int = 40) -> str:
        """Return the log's path and its last lines, for a failure report."""
        return f"--- {self.log_name} {self.log_path} (last {lines} lines) ---\n" \
               f"{tail(self.log_path, lines)}"
