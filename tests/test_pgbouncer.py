"""Firehose behind a real PgBouncer in transaction mode, with a pool smaller than its clients.

Nothing may rely on session state there: no startup options, timeouts per transaction
(storage/database.py), transaction-scoped advisory locks. These tests run ingest, reads,
partition maintenance, a table lock, and restarts of PostgreSQL and of PgBouncer through
one, and check that every event answered 202 is stored once.
"""

import datetime
import threading
import time
import urllib.parse

import psycopg2
import pytest

from storage import partitions
from tests.client import get_json, make_event, post_json, post_stream
from tests.fixtures.postgres import TEST_DATABASE
from tests.polling import wait_until
from tests.test_outage import assert_all_stored

LOCK_SECONDS = 12
LOCK_TIMEOUT = 1.0  # COLLECTOR_LOCK_TIMEOUT of these tests
LOCK_MARGIN = 1.5  # seconds past it that a flusher's wait may be seen to last
SAMPLE_INTERVAL = 0.1
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
FLUSHER_WAITS = (
    "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0) "
    "FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO events%'"
)


@pytest.fixture
def bouncer(start_pgbouncer, postgres, database):
    """A PgBouncer in transaction mode in front of the test database's server."""
    return start_pgbouncer(postgres.port)


def through(bouncer, **env: str) -> dict[str, str]:
    """Return collector settings whose DATABASE_URL goes through the PgBouncer."""
    return {"DATABASE_URL": bouncer.url(TEST_DATABASE), **env}


def recent_event(**fields) -> dict:
    """An event of this hour, so that it lands in a partition the service made."""
    return make_event(timestamp=NOW.isoformat(), **fields)


def test_ingest_reads_and_maintenance_through_pgbouncer(start_collector, database, bouncer):
    collector = start_collector(through(bouncer, COLLECTOR_ROLLUP_KEYS="page"), workers=2)
    result = post_stream(collector.url, 2000, 20, factory=recent_event)
    assert result.statuses == {202: 2000}, result.statuses
    batch = [recent_event(user_id=7) for _ in range(300)]
    answer = post_json(collector.url + "/events", batch)
    assert answer.status == 202, answer.body
    assert_all_stored(database, result.accepted + [e["event_id"] for e in batch])
    assert database.count() == 2300

    # Reads through the same pool, from whichever worker answers.
    for _ in range(6):
        status, body = get_json(collector.url + "/events?user_id=7&limit=500")
        assert status == 200, body
        assert sorted(e["event_id"] for e in body["events"]) == sorted(
            e["event_id"] for e in batch)
        since = (NOW - datetime.timedelta(hours=1)).isoformat()
        status, body = get_json(collector.url + "/counts?" + urllib.parse.urlencode(
            {"bucket": "day", "from": since}))
        assert status == 200, body
        assert sum(c["count"] for c in body["counts"]) == 2300, body

    # Both workers ran partition maintenance through the pool.
    wanted = {p.name for p in partitions.wanted(NOW, "month")}
    stored = dict(database.query("SELECT tableoid::regclass::text, count(*) FROM events "
                                 "GROUP BY 1"))
    assert set(stored) == {partitions.partition_of(NOW, "month").name}, stored
    attached = {r[0] for r in database.query(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass")}
    assert wanted <= attached, attached
    log = collector.output()
    assert "maintenance of partitions and rollup keys failed" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # The flusher waited for the first maintenance: no row went to the default partition.
    assert "from events_default" not in log, log[-3000:]
    # Every worker opened a connection to PgBouncer; PgBouncer used at most its pool.
    servers = database.query("SELECT count(*) FROM pg_stat_activity "
                             "WHERE application_name LIKE 'firehose%%'")[0][0]
    print(f"\npgbouncer: 2300 events stored through {servers} server connections")
    assert servers <= 3, servers


@pytest.mark.slow
def test_a_table_lock_behind_pgbouncer_is_bounded_by_the_lock_timeout(
        start_collector, database, bouncer):
    collector = start_collector(through(bouncer, COLLECTOR_LOCK_TIMEOUT=str(LOCK_TIMEOUT)),
                                workers=2)
    first = post_stream(collector.url, 200, 10, factory=recent_event)
    assert_all_stored(database, first.accepted)

    locker = psycopg2.connect(database.url)  # straight to PostgreSQL, not through the pool
    sampler = psycopg2.connect(database.url)
    sampler.autocommit = True
    longest = 0.0
    stop = threading.Event()
    answers = []
    stream = threading.Thread(target=lambda: answers.append(post_stream(
        collector.url, 100_000, 10, deadline_s=LOCK_SECONDS + 10, stop=stop,
        factory=recent_event)))
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        stream.start()
        held_until = time.monotonic() + LOCK_SECONDS
        waits_seen = 0
        while time.monotonic() < held_until:  # the lock is the scenario; we sample during it
            with sampler.cursor() as cur:
                cur.execute(FLUSHER_WAITS)
                wait = float(cur.fetchone()[0])
            waits_seen += wait > 0
            longest = max(longest, wait)
            stop.wait(SAMPLE_INTERVAL)
    finally:
        locker.rollback()
        locker.close()
        sampler.close()
        stop.set()
        stream.join(timeout=60)
    during = answers[0]
    print(f"\npgbouncer lock: {LOCK_SECONDS} s ACCESS EXCLUSIVE, {len(during.sent)} POSTs, "
          f"longest flusher lock wait seen {longest:.2f} s "
          f"(lock_timeout {LOCK_TIMEOUT:g} s), {waits_seen} samples with a waiting insert")
    assert during.statuses == {202: len(during.sent)}, during.statuses
    assert waits_seen > 0, "no flusher was seen waiting for the lock: the test proves nothing"
    assert longest <= LOCK_TIMEOUT + LOCK_MARGIN, longest
    assert_all_stored(database, first.accepted + during.accepted)


@pytest.mark.slow
def test_postgres_restart_behind_pgbouncer(start_collector, database, postgres, bouncer):
    collector = start_collector(through(bouncer))
    before = post_stream(collector.url, 300, 10, factory=recent_event)
    assert_all_stored(database, before.accepted)
    postgres.stop("fast")
    during = post_stream(collector.url, 500, 10, factory=recent_event)
    assert during.statuses == {202: 500}, during.statuses
    wait_until(lambda: collector.health()["database"] == "down", 30, "the outage to be seen")
    postgres.start(TEST_DATABASE)
    assert_all_stored(database, before.accepted + during.accepted, timeout=90)
    wait_until(lambda: collector.health()["database"] == "up", 30, "the database to be up")


@pytest.mark.slow
def test_pgbouncer_restart(start_collector, database, start_pgbouncer, postgres):
    first = start_pgbouncer(postgres.port)
    collector = start_collector(through(first))
    before = post_stream(collector.url, 300, 10, factory=recent_event)
    assert_all_stored(database, before.accepted)
    first.stop()
    during = post_stream(collector.url, 500, 10, factory=recent_event)
    assert during.statuses == {202: 500}, during.statuses
    first.start()  # the same port and configuration
    assert_all_stored(database, before.accepted + during.accepted, timeout=60)


def broken_state(collector, what: str) -> dict:
    """Wait until /health and /ready say the database is broken; return /health."""
    health = wait_until(lambda: (lambda h: h if h["database"] == "broken" else None)(
        collector.health()), 20, f"database broken ({what})")
    status, ready = get_json(collector.url + "/ready")
    assert status == 200 and ready["database"] == "broken", ready
    return health


@pytest.mark.parametrize("case", ["wrong password", "unsupported startup parameter",
                                  "no such database", "TLS demanded"])
def test_a_refusal_retrying_cannot_fix_is_broken_not_down(start_collector, database,
                                                          start_pgbouncer, postgres, case):
    if case == "TLS demanded":
        bouncer = start_pgbouncer(postgres.port, require_tls=True)
        url = bouncer.url(TEST_DATABASE, query="sslmode=disable")
        expected = "SSL required"
    elif case == "wrong password":
        bouncer = start_pgbouncer(postgres.port, auth_type="md5", password="right")
        url = bouncer.url(TEST_DATABASE, password="wrong")
        expected = "password authentication failed"
    elif case == "unsupported startup parameter":
        bouncer = start_pgbouncer(postgres.port)
        url = bouncer.url(TEST_DATABASE, query="options=-c%20work_mem%3D8MB")
        expected = "unsupported startup parameter"
    else:
        url = postgres.url("no_such_database")
        expected = 'database "no_such_database" does not exist'
    collector = start_collector({"DATABASE_URL": url}, workers=1)
    events = [make_event() for _ in range(20)]
    assert all(post_json(collector.url + "/event", e).status == 202 for e in events)
    health = broken_state(collector, case)
    assert expected in health["last_flush_error"], health
    assert health["last_flush_error_kind"] == "systemic", health
    assert health["pending"] == 20, health  # kept in the spool, as during an outage
    errors = [line for line in collector.output().splitlines() if '"ERROR"' in line]
    assert any(expected.split('"')[0] in line and "systemic" in line for line in errors), errors
