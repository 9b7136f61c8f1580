"""A chaos run: continuous load while a seeded schedule injects faults, then the ledger.

    make chaos                                          # 90 s, seed 1
    make chaos CHAOS_ARGS='--duration 1800 --seed 7'    # 30 minutes (docs/operations.md, "Faults survived")

Everything runs on 127.0.0.1, started here: a PostgreSQL of its own (default durability:
a fault must not lose what PostgreSQL said it committed), PgBouncer in transaction mode
in front of it, one collector (real gunicorn, gevent workers) whose DATABASE_URL goes
through PgBouncer and whose spool lives on a small tmpfs (as root), and nginx with
conf/nginx.conf in front of it. Client threads send single events and batches, each
event with its own event_id, half direct to gunicorn and half through nginx, and record
every answer. Meanwhile faults start at random moments (seeded), several of each kind,
in threads of their own, so that faults of different parts overlap:

    kill_worker         SIGKILL one worker; gunicorn starts another, which replays its spool
    kill_collector      SIGKILL the master and every worker, then start again on that spool
    restart_collector   SIGTERM (graceful stop), then start again
    postgres_immediate  pg_ctl stop -m immediate, down 1-4 s, start again
    terminate_backends  pg_terminate_backend of every Firehose connection
    lock_table          LOCK TABLE events IN ACCESS EXCLUSIVE MODE for 5 s
    disk_full           fill the spool's filesystem for 2-4 s (root only: a tmpfs)
    pgbouncer_restart   stop PgBouncer at once, down 0.5-2 s, start again

At the end every part is up again; the run waits until PostgreSQL holds every event
answered 202 (or the collector holds none), then checks, from PostgreSQL and the answers,
that each is stored exactly once or dead-lettered, and prints the ledger. The only
waits are for conditions (with deadlines) and the faults' own durations.
"""

import argparse
import dataclasses
import datetime
import http.client
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

import psycopg2

from storage.localdb import LocalPostgres
from tests.fixtures.collector import Collector
from tests.fixtures.nginx import Nginx, nginx_binary, set_rates
from tests.fixtures.pgbouncer import PgBouncer, pgbouncer_binary
from tests.fixtures.postgres import TEST_DATABASE, TestDatabase, free_port
from tests.polling import wait_until
from tests.processes import alive

DEFAULT_DURATION = 90.0
DEFAULT_SEED = 1
DATABASE = TEST_DATABASE  # a server of its own: the name is only the suite's usual one
CLIENTS = 6  # load threads: even ones direct to gunicorn, odd ones through nginx
BATCH_SHARE = 0.2  # share of requests that are a batch
BATCH_SIZES = (2, 20)  # events in a batch, at least and at most
PACE = 0.01  # mean seconds between two requests of one client: ~600 requests/s in all
REQUEST_TIMEOUT = 15.0
FAULT_GAP = (2.0, 7.0)  # seconds between the starts of two faults
QUIET_TAIL = 0.15  # share of the run at its end with no new fault, to settle
SPOOL_DISK_BYTES = 48 * 1024 * 1024
SPOOL_SEGMENT_BYTES = 1024 * 1024
WORKERS = 2
LOCK_SECONDS = 5.0
RECOVERY_TIMEOUT = 60.0  # seconds a restarted part may take to be up
SETTLE_TIMEOUT = 240.0  # seconds for every accepted event to reach PostgreSQL at the end
CHECK_EVERY = 3.0  # seconds between two exact checks while settling
COLLECTOR_ENV = {
    "COLLECTOR_SPOOL_SEGMENT_BYTES": str(SPOOL_SEGMENT_BYTES),
    "COLLECTOR_LOCK_TIMEOUT": "1",
    "COLLECTOR_STATEMENT_TIMEOUT": "5",
    "COLLECTOR_LOG_FORMAT": "json",
}
# The load comes from one address: lift the per-address limits in the test's nginx copy.
UNLIMITED = {"firehose_client_event": ("100000r/s", 100000),
             "firehose_client_batch": ("100000r/s", 100000)}
KINDS = ("kill_worker", "kill_collector", "restart_collector", "postgres_immediate",
         "terminate_backends", "lock_table", "disk_full", "pgbouncer_restart")
COMPONENT = {"kill_worker": "collector", "kill_collector": "collector",
             "restart_collector": "collector", "postgres_immediate": "postgres",
             "terminate_backends": "postgres", "lock_table": "lock", "disk_full": "disk",
             "pgbouncer_restart": "pgbouncer"}


@dataclasses.dataclass
class Ledger:
    """What the run did and what became of every event."""

    seed: int
    duration: float
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    sent: int = 0
    accepted: int = 0
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)  # 0: no answer
    stored: int = 0  # accepted events in events
    dead_lettered: int = 0  # accepted events in dead_letters
    stored_unanswered: int = 0  # events stored whose answer was not a 202
    duplicates: int = 0  # event_ids stored more than once
    lost: int = 0  # accepted events in neither table
    lost_ids: list[str] = dataclasses.field(default_factory=list)
    fault_errors: list[str] = dataclasses.field(default_factory=list)  # faults not injected

    def lines(self) -> list[str]:
        """Return the ledger as printable lines."""
        faults = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        refused = ", ".join(f"{k or 'no answer'}: {n}" for k, n in sorted(self.statuses.items())
                            if k != 202)
        return [
            f"chaos: seed {self.seed}, {self.duration:g} s, faults: {sum(self.faults.values())} "
            f"({faults})",
            f"chaos: events sent {self.sent}, answered 202 {self.accepted}, "
            f"not 202 {self.sent - self.accepted} ({refused or 'none'})",
            f"chaos: stored {self.stored}, dead-lettered {self.dead_lettered}, stored without "
            f"a 202 {self.stored_unanswered}, duplicates {self.duplicates}, lost {self.lost}",
            *(f"chaos: a fault could not be injected: {error}" for error in self.fault_errors),
        ]


class Answers:
    """Every event sent and the status it got, shared by the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.status: dict[str, int] = {}

    def record(self, event_ids: list[str], status: int) -> None:
        """Note the answer given to these events."""
        with self._lock:
            for event_id in event_ids:
                self.status[event_id] = status


class Chaos:
    """The parts under test, the load, the faults, and the final check."""

    def __init__(self, root: pathlib.Path, duration: float, seed: int, log) -> None:
        self.root = root
        self.duration = duration
        self.rng = random.Random(seed)
        self.seed = seed
        self.log = log
        self.disk = os.geteuid() == 0
        self.kinds = KINDS if self.disk else tuple(k for k in KINDS if k != "disk_full")
        self.postgres = LocalPostgres(root / "pg" / "data", free_port())
        self.bouncer: PgBouncer | None = None
        self.collector: Collector | None = None
        self.nginx: Nginx | None = None
        self.spool_dir = root / "spool"
        self.answers = Answers()
        self.stop = threading.Event()
        self.locks = {name: threading.Lock() for name in set(COMPONENT.values())}
        self.faults: dict[str, int] = {}
        self.fault_errors: list[str] = []
        self.collector_port = free_port()

    # --- the parts ------------------------------------------------------------
    def start(self) -> None:
        """Start PostgreSQL, PgBouncer, the collector and nginx."""
        (self.root / "pg").mkdir()
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "pg", 0o755)
        self.postgres.start(DATABASE)
        bouncer_dir = self.root / "pgbouncer"
        bouncer_dir.mkdir()
        self.bouncer = PgBouncer(pgbouncer_binary(), bouncer_dir, self.postgres.port).start()
        self.spool_dir.mkdir()
        if self.disk:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SPOOL_DISK_BYTES}", "tmpfs",
                            str(self.spool_dir)], check=True)
        self._start_collector()
        nginx_dir = self.root / "nginx"
        nginx_dir.mkdir()
        self.nginx = Nginx(nginx_binary(), nginx_dir, (self.collector_port,))
        self.nginx.edit = lambda site: set_rates(site, UNLIMITED)
        self.nginx.start()

    def _start_collector(self) -> None:
        collector = Collector(self.bouncer.url(DATABASE), self.spool_dir / "spool",
                              COLLECTOR_ENV, WORKERS, self.collector_port)
        collector.log_path = self.root / "gunicorn.log"
        self.collector = collector.start()

    def close(self) -> None:
        """Stop everything this run started."""
        for stop in (lambda: self.nginx and self.nginx.stop(),
                     lambda: self.collector and self._stop_collector(),
                     lambda: self.bouncer and self.bouncer.stop(),
                     lambda: self.postgres.stop("immediate")):
            try:
                stop()
            except Exception as ex:  # keep stopping the rest
                self.log(f"chaos: stopping: {ex!r}")
        if self.disk and os.path.ismount(self.spool_dir):
            subprocess.run(["umount", "-l", str(self.spool_dir)], check=False)

    def _stop_collector(self) -> None:
        try:
            self.collector.terminate()
        except subprocess.TimeoutExpired:
            self.collector.kill_all()

    # --- the load ---------------------------------------------------------------
    def _client(self, index: int) -> None:
        url = self.nginx.url if index % 2 else self.collector.url
        host, port = url.removeprefix("http://").split(":")
        rng = random.Random(self.seed * 1000 + index)
        conn = None
        while not self.stop.is_set():
            batch = rng.random() < BATCH_SHARE
            events = [_event(rng) for _ in range(rng.randint(*BATCH_SIZES) if batch else 1)]
            body = json.dumps(events if batch else events[0]).encode()
            ids = [e["event_id"] for e in events]
            try:
                conn = conn or http.client.HTTPConnection(host, int(port),
                                                          timeout=REQUEST_TIMEOUT)
                conn.request("POST", "/events" if batch else "/event", body,
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
                status = response.status
                if status == 202 and batch:  # a valid batch is accepted whole
                    accepted = {a["event_id"] for a in json.loads(answer)["accepted"]}
                    assert accepted == set(ids), "a batch half accepted"
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                status = 0
            self.answers.record(ids, status)
            # A steady load, not a flood: the run is about faults, and a 30-minute run must
            # leave a database that its final check can read through.
            self.stop.wait(rng.uniform(0, 2 * PACE) if status == 202 else 0.05)
        if conn is not None:
            conn.close()

    # --- the faults ---------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str]]:
        """Return (seconds from the start, kind) of every fault: each kind in turn, shuffled."""
        moments, at, kinds = [], 0.0, []
        last_start = self.duration * (1 - QUIET_TAIL)
        while True:
            at += self.rng.uniform(*FAULT_GAP)
            if at > last_start:
                return moments
            if not kinds:
                kinds = list(self.kinds)
                self.rng.shuffle(kinds)
            moments.append((at, kinds.pop()))

    def _inject(self, kind: str, hold: float) -> None:
        with self.locks[COMPONENT[kind]]:
            if self.stop.is_set():
                return
            began = time.monotonic()
            try:
                getattr(self, "_" + kind)(hold)
            except Exception as ex:
                self.fault_errors.append(f"{kind}: {ex!r}")
                self.log(f"chaos: fault {kind} failed: {ex!r}")
                return
            self.faults[kind] = self.faults.get(kind, 0) + 1
            self.log(f"chaos: {kind} done in {time.monotonic() - began:.1f} s")

    def _kill_worker(self, hold: float) -> None:
        pids = self.collector.worker_pids()
        victim = self.rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim) and len(self.collector.worker_pids()) == WORKERS,
                   RECOVERY_TIMEOUT, "gunicorn to replace the killed worker")

    def _kill_collector(self, hold: float) -> None:
        self.collector.kill_all()
        self._start_collector()

    def _restart_collector(self, hold: float) -> None:
        self.collector.terminate()
        self._start_collector()

    def _postgres_immediate(self, hold: float) -> None:
        self.postgres.stop("immediate")
        self.stop.wait(hold)
        self.postgres.start(DATABASE)

    def _terminate_backends(self, hold: float) -> None:
        TestDatabase(self.postgres).query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'firehose%%' AND pid <> pg_backend_pid()")

    def _lock_table(self, hold: float) -> None:
        # PostgreSQL may be restarting (another fault, overlapping): lock once it is back.
        conn = wait_until(lambda: psycopg2.connect(self.postgres.url(DATABASE), connect_timeout=5),
                          RECOVERY_TIMEOUT, "PostgreSQL to accept connections")
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '5s'")
                cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                self.stop.wait(LOCK_SECONDS)
            conn.rollback()
        except psycopg2.OperationalError:
            pass  # a PostgreSQL restart (another fault, overlapping) ended the lock early
        finally:
            conn.close()

    def _disk_full(self, hold: float) -> None:
        ballast = self.spool_dir / "ballast"
        try:
            # Unbuffered: a buffered file would raise ENOSPC again when it is closed.
            with open(ballast, "wb", buffering=0) as out:
                chunk = b"\0" * (1024 * 1024)
                while True:
                    try:
                        out.write(chunk)
                    except OSError:
                        break
            self.stop.wait(hold)
        finally:
            ballast.unlink(missing_ok=True)

    def _pgbouncer_restart(self, hold: float) -> None:
        self.bouncer.stop()
        self.stop.wait(hold * 0.5)
        self.bouncer.start()

    # --- the run ------------------------------------------------------------------
    def run(self) -> Ledger:
        """Run the load and the faults for the duration, settle, and return the ledger."""
        plan = self.schedule()
        self.log(f"chaos: seed {self.seed}, {self.duration:g} s, {len(plan)} faults planned")
        clients = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        for client in clients:
            client.start()
        began = time.monotonic()
        injectors = []
        for at, kind in plan:
            if self.stop.wait(max(0.0, began + at - time.monotonic())):
                break
            hold = self.rng.uniform(1.0, 4.0)
            thread = threading.Thread(target=self._inject, args=(kind, hold), daemon=True)
            thread.start()
            injectors.append(thread)
        self.stop.wait(max(0.0, began + self.duration - time.monotonic()))
        self.stop.set()
        for thread in injectors + clients:
            thread.join(timeout=RECOVERY_TIMEOUT + 30)
        return self._settle()

    def _settle(self) -> Ledger:
        """Bring every part up, wait for the backlog to reach PostgreSQL, and count."""
        if not self.postgres.running():
            self.postgres.start(DATABASE)
        if self.bouncer.process.poll() is not None:
            self.bouncer.start()
        if self.collector.process.poll() is not None or not self.collector.worker_pids():
            self._start_collector()
        status = dict(self.answers.status)
        conn = psycopg2.connect(self.postgres.url(DATABASE))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                # The answers go into PostgreSQL, so that the ledger is a join there.
                cur.execute("CREATE TEMP TABLE answers (event_id uuid PRIMARY KEY, "
                            "status int NOT NULL)")
                rows = "".join(f"{e}\t{s}\n" for e, s in status.items())
                cur.copy_expert("COPY answers FROM STDIN", io.StringIO(rows))
                cur.execute("ANALYZE answers")
                last_check = [0.0]

                def settled() -> bool:
                    if time.monotonic() - last_check[0] < CHECK_EVERY:
                        return False
                    last_check[0] = time.monotonic()
                    cur.execute(LEDGER["lost"])
                    return cur.fetchone()[0] == 0

                try:
                    wait_until(settled, SETTLE_TIMEOUT, "every accepted event in PostgreSQL",
                               failure=TimeoutError)
                except TimeoutError as ex:
                    self.log(f"chaos: {ex}")  # the ledger below says what is missing
                figures = {}
                for name, query in LEDGER.items():
                    cur.execute(query)
                    figures[name] = cur.fetchone()[0]
                cur.execute(LOST_IDS)
                lost_ids = [r[0] for r in cur.fetchall()]
        finally:
            conn.close()
        ledger = Ledger(self.seed, self.duration, dict(self.faults), lost_ids=lost_ids,
                        sent=len(status), **figures)
        for value in status.values():
            ledger.statuses[value] = ledger.statuses.get(value, 0) + 1
        return ledger


LEDGER = {
    "accepted": "SELECT count(*) FROM answers WHERE status = 202",
    "stored": "SELECT count(*) FROM answers a WHERE status = 202 "
              "AND EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id)",
    "dead_lettered": "SELECT count(*) FROM answers a WHERE status = 202 "
                     "AND EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = a.event_id) "
                     "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id)",
    "stored_unanswered": "SELECT count(DISTINCT e.event_id) FROM events e "
                         "LEFT JOIN answers a USING (event_id) "
                         "WHERE a.status IS DISTINCT FROM 202",
    "duplicates": "SELECT count(*) FROM (SELECT event_id FROM events GROUP BY 1 "
                  "HAVING count(*) > 1) AS twice",
    "lost": "SELECT count(*) FROM answers a WHERE status = 202 "
            "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id) "
            "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = a.event_id)",
}
LOST_IDS = ("SELECT a.event_id::text FROM answers a WHERE status = 202 "
            "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id) "
            "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = a.event_id) "
            "LIMIT 20")


def _event(rng: random.Random) -> dict:
    return {"event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "user_id": rng.randrange(1, 100_000),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "metadata": {"page": f"/p/{rng.randrange(50)}", "chaos": True}}


def run_chaos(duration: float, seed: int, log: Callable[[str], None] = print,
              keep: bool = False) -> Ledger:
    """Run one chaos run in a temporary directory and return its ledger."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="firehose-chaos-"))
    chaos = Chaos(root, duration, seed, log)
    try:
        chaos.start()
        ledger = chaos.run()
        ledger.fault_errors = list(chaos.fault_errors)  # a harness failure, said with the ledger
        return ledger
    except BaseException:
        log(f"chaos: logs kept in {root}")
        keep = True
        raise
    finally:
        chaos.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the ledger, exit 1 on a lost or duplicated event."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help=f"seconds of load and faults (default {DEFAULT_DURATION:g})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the fault schedule and the load (default {DEFAULT_SEED})")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    args = parser.parse_args(argv)
    ledger = run_chaos(args.duration, args.seed, keep=args.keep)
    for line in ledger.lines():
        print(line)
    if ledger.lost or ledger.duplicates or ledger.fault_errors:
        print(f"chaos: FAILED; lost event_ids (first 20): {ledger.lost_ids}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
