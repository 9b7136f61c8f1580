"""The benchmark's scenarios: what load goes where, and what is done to PostgreSQL meanwhile.

The peer scenarios send the same load to the conventional collector of bench/peers/
(FastAPI on uvicorn, asyncpg COPY, no spool), each compared in the report with the
Firehose scenario it mirrors (`peer_of`).
"""

import dataclasses

from bench.locust_load import USERS as LOCUST_USERS

BATCH_EVENTS = 500  # events in one POST /events of the batch scenario
BATCH_CONNECTIONS = 20  # enough 250 kB batches in flight to keep both workers busy
LOCK_SECONDS = 5.0  # how long the lock scenario holds ACCESS EXCLUSIVE on events
SOAK_LOCK_SECONDS = 60.0  # the soak's lock: long enough to fill every worker's memory queue
RSS_EVERY = 30.0  # seconds between the soak's samples of each worker's RSS


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One kind of load, run --runs times."""

    name: str
    title: str
    # "reference" (nginx alone), "direct" (gunicorn), "proxy" (nginx, gunicorn) or "peer"
    # (the conventional collector of bench/peers/, under uvicorn)
    target: str
    connections: int  # wrk connections, or locust users
    path: str = "/event"
    events_per_request: int = 1
    lock_table: bool = False  # hold LOCK TABLE events for lock_seconds mid-run
    lock_seconds: float = LOCK_SECONDS
    rss_every: float = 0.0  # > 0: sample the workers' RSS this often during the load
    profile: bool = False  # the scenario --profile samples
    locust_processes: int = 0  # 0: wrk drives the load; N: locust with N processes
    peer_of: str = ""  # a peer scenario: the Firehose scenario whose load it takes

    @property
    def reaches_collector(self) -> bool:
        """Tell whether the load reaches a collector, Firehose or the peer (and so PostgreSQL)."""
        return self.target != "reference"


SCENARIOS = (
    Scenario("nginx-202", "nginx answering 202 by itself: the reference", "reference", 100),
    Scenario("direct-100", "POST /event to gunicorn, 100 connections", "direct", 100,
             profile=True),
    Scenario("direct-1000", "POST /event to gunicorn, 1000 connections", "direct", 1000),
    Scenario("proxy-100", "POST /event through nginx to gunicorn, 100 connections", "proxy",
             100),
    Scenario("lock-100", f"POST /event, 100 connections, events locked {LOCK_SECONDS:g} s "
             "(LOCK TABLE ... IN ACCESS EXCLUSIVE MODE) mid-run", "direct", 100,
             lock_table=True),
    Scenario(f"batch-{BATCH_EVENTS}", f"POST /events, {BATCH_EVENTS} events a request, "
             f"{BATCH_CONNECTIONS} connections", "direct", BATCH_CONNECTIONS, path="/events",
             events_per_request=BATCH_EVENTS),
    Scenario("peer-100", "the peer (FastAPI, uvicorn, asyncpg COPY): POST /event, 100 "
             "connections", "peer", 100, peer_of="direct-100"),
    Scenario(f"peer-batch-{BATCH_EVENTS}", f"the peer: POST /events, {BATCH_EVENTS} events a "
             f"request, {BATCH_CONNECTIONS} connections", "peer", BATCH_CONNECTIONS,
             path="/events", events_per_request=BATCH_EVENTS, peer_of=f"batch-{BATCH_EVENTS}"),
)
# Not in the default set: `--scenario soak --duration 600 --runs 1` (10 minutes).
SOAK_SCENARIOS = (
    Scenario("soak", f"POST /event, 100 connections for --duration; events locked "
             f"{SOAK_LOCK_SECONDS:g} s mid-run (memory queues full); RSS every "
             f"{RSS_EVERY:g} s", "direct", 100, lock_table=True,
             lock_seconds=SOAK_LOCK_SECONDS, rss_every=RSS_EVERY),
)
# Not in the default set: `--scenario growth` (bench/growth.py), which runs alone: it
# fills events to --rows (20 million by default) and measures as the table grows.
GROWTH_SCENARIOS = (
    Scenario("growth", f"events filled to --rows; at each size, batch-{BATCH_EVENTS} "
             "committed/s, POST /event req/s and p99 at 100 connections, and the reads' "
             "latencies (bench/growth.py)", "direct", BATCH_CONNECTIONS, path="/events",
             events_per_request=BATCH_EVENTS),
)
LOCUST_SCENARIOS = (
    Scenario("locust-1p", "locustfile.py, no think time, 1 locust process", "direct",
             LOCUST_USERS, locust_processes=1),
    Scenario("locust-2p", "locustfile.py, no think time, --processes 2", "direct",
             LOCUST_USERS, locust_processes=2),
)
ALL = SCENARIOS + LOCUST_SCENARIOS + SOAK_SCENARIOS + GROWTH_SCENARIOS
