"""At a few hundred thousand rows, GET /events pages come from indexes and GET /counts
from the rollups alone: checked on PostgreSQL's plans (EXPLAIN), not on timings.

The rows are made in one INSERT ... SELECT generate_series (the rollup trigger counts
them like any INSERT), then ANALYZEd. The median latency of each query through HTTP
is printed for docs/performance.md ("Reads"); it is not asserted.
"""

import datetime
import json
import statistics
import time
import urllib.parse

import psycopg2
import pytest

from collector.queries import encode_cursor
from storage.reader import EventFilter, Key, events_query
from storage.rollups import CountFilter, counts_query
from tests.client import get_json
from tests.polling import wait_until

ROWS = 300_000
SPACING = 8.64  # seconds between events: 300,000 of them span the last 30 days
USERS = 5_000
PAGES = 100
LATENCY_RUNS = 7
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
DAY_AGO = NOW - datetime.timedelta(days=1)

FILL = f"""
INSERT INTO events (event_id, user_id, "timestamp", metadata, received_at)
SELECT gen_random_uuid(), i %% {USERS}, %(now)s - make_interval(secs => i * {SPACING}),
       CASE WHEN i %% 10000 = 0
            THEN jsonb_build_object('page', '/p/' || i %% {PAGES}, 'n', i, 'campaign', 'x')
            ELSE jsonb_build_object('page', '/p/' || i %% {PAGES}, 'n', i) END,
       now()
FROM generate_series(1, {ROWS}) AS i
"""
ROLLUPS = {"event_counts", "event_counts_by_user", "event_counts_by_key", "rollup_keys"}
INDEX_NODES = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


def plan_nodes(database, query: str, params: dict) -> list[dict]:
    """Return every node of the plan of `query`, flattened."""
    conn = psycopg2.connect(database.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute("EXPLAIN (FORMAT JSON) " + query, params)
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        conn.close()
    nodes, stack = [], [plan]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("Plans", []))
    return nodes


def describe(nodes: list[dict]) -> str:
    return "; ".join(f"{n['Node Type']} {n.get('Relation Name', '')}".strip() for n in nodes)


@pytest.fixture(scope="module")
def big(postgres, tmp_path_factory):
    """A collector over 300,000 events of the last 30 days, counted by page."""
    from tests.fixtures.collector import start_module_collector
    collector, database = start_module_collector(postgres, tmp_path_factory,
                                                 {"COLLECTOR_ROLLUP_KEYS": "page,campaign"})
    try:
        wait_until(lambda: database.query("SELECT to_regclass('rollup_keys') IS NOT NULL")[0][0]
                   and database.query("SELECT count(*) FROM rollup_keys")[0][0] == 2, 30,
                   "the rollup keys")
        started = time.monotonic()
        database.query(FILL, {"now": NOW})
        database.query("ANALYZE")
        print(f"\n{ROWS} rows made and analyzed in {time.monotonic() - started:.1f} s")
        yield collector, database
    finally:
        collector.terminate()
        database.reset()


def big_partitions(database) -> set[str]:
    return {name for name, rows in database.query(
        "SELECT c.relname, c.reltuples FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass") if rows > 1000}


def middle_key(database) -> Key:
    timestamp, event_id = database.query(
        'SELECT "timestamp", event_id::text FROM events ORDER BY "timestamp" DESC, '
        "event_id DESC OFFSET %s LIMIT 1", (ROWS // 2,))[0]
    return Key(timestamp, event_id)


EVENT_QUERIES = {
    "newest": lambda key: EventFilter(),
    "user": lambda key: EventFilter(user_id=42),
    # A metadata value most rows of a partition share is not here: for it a sequential
    # scan of that partition is a right plan too, and the planner's pick between the two
    # changed with the statistics from run to run.
    "metadata, rare": lambda key: EventFilter(metadata='{"campaign": "x"}'),
    "one day": lambda key: EventFilter(since=DAY_AGO, until=NOW),
    "page 1500": lambda key: EventFilter(after=key),
    "user, day, page": lambda key: EventFilter(user_id=42, since=DAY_AGO - datetime.timedelta(
        days=20), until=NOW, after=key),
}


ORDERED_BY_INDEX = ("newest", "one day", "page 1500")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EVENT_QUERIES))
def test_event_pages_use_an_index(big, name):
    _, database = big
    wanted = EVENT_QUERIES[name](middle_key(database))
    nodes = plan_nodes(database, *events_query(wanted, 100))
    scanned = big_partitions(database)
    assert len(scanned) >= 1, "no partition holds the rows"
    seq = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"]
    assert not set(seq) & scanned, f"{name}: Seq Scan of a big partition: {describe(nodes)}"
    assert {n["Node Type"] for n in nodes} & INDEX_NODES, f"{name}: no index: {describe(nodes)}"
    if name in ORDERED_BY_INDEX:  # read in the index's order: nothing sorted, however deep
        sorts = [n for n in nodes if "Sort" in n["Node Type"]]
        assert not sorts, f"{name}: sorted, not read in index order: {describe(nodes)}"


COUNT_QUERIES = {
    "per minute, a day": CountFilter("minute", DAY_AGO, NOW),
    "per hour, 30 days": CountFilter("hour", NOW - datetime.timedelta(days=30), NOW),
    "per day, a year": CountFilter("day", NOW - datetime.timedelta(days=365), NOW),
    "a user per hour": CountFilter("hour", NOW - datetime.timedelta(days=30), NOW, user_id=42),
    "per page per day": CountFilter("day", NOW - datetime.timedelta(days=30), NOW, key="page"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COUNT_QUERIES))
def test_counts_read_only_the_rollups(big, name):
    _, database = big
    nodes = plan_nodes(database, *counts_query(COUNT_QUERIES[name], 10_000))
    relations = {n["Relation Name"] for n in nodes if "Relation Name" in n}
    assert relations and relations <= ROLLUPS, f"{name}: {describe(nodes)}"
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], f"{name}: {describe(nodes)}"


def median_ms(url: str) -> float:
    """Return the median latency of GET url in ms, after one request to warm up."""
    assert get_json(url)[0] == 200
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.monotonic()
        status, _ = get_json(url)
        times.append((time.monotonic() - started) * 1000)
        assert status == 200
    return statistics.median(times)


@pytest.mark.slow
def test_report_latency_at_this_size(big):
    collector, database = big
    # A cursor is opaque to clients; the test makes the one of the middle row.
    middle = encode_cursor(middle_key(database))
    day = {"from": DAY_AGO.isoformat(), "to": NOW.isoformat()}
    month = {"from": (NOW - datetime.timedelta(days=30)).isoformat(), "to": NOW.isoformat()}
    cases = {
        "GET /events (newest 100)": {},
        "GET /events?user_id": {"user_id": 42},
        "GET /events?metadata (common)": {"metadata": json.dumps({"page": "/p/7"})},
        "GET /events?metadata (rare)": {"metadata": json.dumps({"campaign": "x"})},
        "GET /events?from&to (a day)": day,
        "GET /events?cursor (row 150,000)": {"cursor": middle},
        "GET /counts?bucket=minute (a day)": {"bucket": "minute", **day},
        "GET /counts?bucket=hour (30 days)": {"bucket": "hour", **month},
        "GET /counts?bucket=hour&user_id (30 days)": {"bucket": "hour", "user_id": 42, **month},
        "GET /counts?bucket=day&key=page (30 days)": {"bucket": "day", "key": "page", **month},
    }
    print(f"\nmedian of {LATENCY_RUNS} through HTTP, {ROWS} events:")
    for name, params in cases.items():
        path = "/counts" if "counts" in name else "/events"
        url = f"{collector.url}{path}?{urllib.parse.urlencode(params)}"
        print(f"LATENCY | {name} | {median_ms(url):.1f} ms")
