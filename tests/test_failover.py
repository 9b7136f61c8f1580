"""Failover with a multi-host DATABASE_URL: every host of the list is resolved cooperatively,
and when the primary dies and its synchronous standby is promoted, the flusher finds the
new primary by itself and every event answered 202 is stored there exactly once. While
the synchronous standby is down, nothing is stored (nor lost) until it is back.
"""

import datetime
import socket
import threading
import time

import psycopg2.extensions
import pytest

from storage import database, partitions
from tests.client import post_stream
from tests.fixtures.postgres import TEST_DATABASE, free_port
from tests.polling import wait_until

STREAM_EVENTS = 30_000  # a ceiling: the stream is stopped once writes resumed on the new primary
STREAM_CONNECTIONS = 10
BEFORE_KILL = 500  # answers, and at least half as many rows, before the primary is killed
DURING_OUTAGE = 500  # answers while no server takes writes
AFTER_PROMOTION = 500  # rows written to the promoted standby before the stream stops
UTC = datetime.timezone.utc


def addresses(name: str) -> list[str]:
    return list(dict.fromkeys(info[4][0] for info in
                              socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)))


def test_every_name_of_a_host_list_is_resolved_and_the_rest_kept():
    local = addresses("localhost")
    params = {"host": "localhost,127.0.0.2,/var/run/postgresql,localhost",
              "port": "5432,5433,5434,5435"}
    database._resolve_host(params)
    n = len(local)
    assert params["host"].split(",") == ["localhost"] * n + ["127.0.0.2", "/var/run/postgresql"] \
        + ["localhost"] * n
    assert params["hostaddr"].split(",") == local + ["", ""] + local
    assert params["port"].split(",") == ["5432"] * n + ["5433", "5434"] + ["5435"] * n


def test_one_port_serves_every_host_and_addresses_need_no_lookup():
    params = {"host": "localhost,localhost", "port": "6543"}
    database._resolve_host(params)
    assert params["hostaddr"].split(",") == addresses("localhost") * 2
    assert params["port"] == "6543"
    untouched = {"host": "127.0.0.1,::1,/tmp", "port": "1,2,3"}
    database._resolve_host(untouched)
    assert untouched == {"host": "127.0.0.1,::1,/tmp", "port": "1,2,3"}
    given = {"host": "localhost", "hostaddr": "127.0.0.2"}
    database._resolve_host(given)
    assert given == {"host": "localhost", "hostaddr": "127.0.0.2"}


def test_a_name_that_does_not_resolve_is_left_out_of_a_list():
    params = {"host": "no-such-host.invalid,localhost", "port": "5432,5433"}
    database._resolve_host(params)
    assert set(params["host"].split(",")) == {"localhost"}
    assert set(params["port"].split(",")) == {"5433"}
    with pytest.raises(socket.gaierror):
        database._resolve_host({"host": "no-such-host.invalid"})


def test_a_host_list_of_names_connects_past_a_dead_server(postgres):
    dead = free_port()
    dsn = f"postgresql://postgres@localhost:{dead},localhost:{postgres.port}/firehose_test"
    assert psycopg2.extensions.parse_dsn(dsn)["host"] == "localhost,localhost"
    conn = database.connect(dsn, statement_timeout=5, lock_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone() == (postgres.port,)
    finally:
        conn.close()


def commits_waiting_for_the_standby(db) -> int:
    """Count the collector's connections whose COMMIT waits for the synchronous standby."""
    return db.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                    "'firehose%%' AND wait_event = 'SyncRep'")[0][0]


def maintenance_done(db) -> bool:
    """Tell whether the collector's first partition maintenance has made its partitions and
    closed its connection (a COMMIT of DDL waiting for a stopped standby keeps its locks)."""
    wanted = [p.name for p in partitions.wanted(datetime.datetime.now(UTC), "month")]
    made = db.query("SELECT count(*) FROM unnest(%s::text[]) AS name "
                    "WHERE to_regclass(name) IS NOT NULL", (wanted,))[0][0]
    running = db.query("SELECT count(*) FROM pg_stat_activity "
                       "WHERE application_name = 'firehose-maintenance'")[0][0]
    return made == len(wanted) and running == 0


def test_with_its_synchronous_standby_down_the_primary_stores_nothing_until_it_is_back(
        start_collector_on, sync_replica):
    # (Runs before the failover test, which leaves this module's pair promoted.)
    pair = sync_replica
    collector = start_collector_on(pair.primary_db.url, workers=1)
    before = post_stream(collector.url, 100, 5)
    wait_until(lambda: pair.primary_db.count() == 100, 10, "100 rows")
    wait_until(lambda: maintenance_done(pair.primary_db), 30, "the partition maintenance")
    pair.standby.stop("immediate")
    during = post_stream(collector.url, 300, 5, deadline_s=30)
    assert during.statuses == {202: 300}, during.statuses
    # The collector's COMMIT waits for the standby: committed locally, visible to no one,
    # and the events still in the spool (a batch is let go only once COMMIT returns).
    wait_until(lambda: commits_waiting_for_the_standby(pair.primary_db) >= 1, 20,
               "a commit waiting for the synchronous standby")
    assert pair.primary_db.count() == 100
    pair.standby.start(TEST_DATABASE)
    wait_until(lambda: pair.primary_db.count() == 400, 60, "the 300 rows once it is back")
    stored = pair.primary_db.event_ids()
    assert len(stored) == len(set(stored)) and set(stored) == set(before.accepted
                                                                   + during.accepted)
    wait_until(lambda: pair.replication_state() == ("streaming", "sync"), 30,
               "the standby to stream synchronously again")


@pytest.mark.slow
def test_failover_to_a_promoted_synchronous_standby_loses_nothing(start_collector_on,
                                                                   sync_replica):
    pair = sync_replica
    assert pair.replication_state() == ("streaming", "sync")
    collector = start_collector_on(pair.multi_host_url())
    answered = [0]
    results = []
    stop = threading.Event()
    stream = threading.Thread(target=lambda: results.append(post_stream(
        collector.url, STREAM_EVENTS, STREAM_CONNECTIONS, deadline_s=90, stop=stop,
        on_sent=lambda n: answered.__setitem__(0, n))))
    stream.start()
    try:
        wait_until(lambda: answered[0] >= BEFORE_KILL
                   and pair.primary_db.count() >= BEFORE_KILL // 2, 30,
                   f"{BEFORE_KILL} answers and {BEFORE_KILL // 2} rows on the primary")
        committed = pair.primary_db.count()  # committed, hence on the standby's disk too
        killed_at = time.monotonic()
        pair.stop_primary()
        at_kill = answered[0]
        pair.wait_for_replay_of_received()
        survived = pair.standby_db.count()  # no server takes writes: this is what survived
        assert survived >= committed, "a committed batch did not survive the failover"
        wait_until(lambda: answered[0] >= at_kill + DURING_OUTAGE, 30,
                   f"{DURING_OUTAGE} answers with no primary")
        pair.promote()
        promoted_at = time.monotonic()
        wait_until(lambda: pair.standby_db.count() > survived, 30,
                   "a write to the promoted standby")
        writing_at = time.monotonic()
        wait_until(lambda: pair.standby_db.count() >= survived + AFTER_PROMOTION, 60,
                   f"{AFTER_PROMOTION} rows written to the promoted standby")
    finally:
        stop.set()
        stream.join(timeout=120)
    result = results[0]
    assert result.statuses == {202: len(result.sent)}, result.statuses

    accepted = set(result.accepted)
    wait_until(lambda: pair.standby_db.count() >= len(accepted), 60,
               f"all {len(accepted)} accepted events on the promoted standby")
    stored = pair.standby_db.event_ids()
    assert len(stored) == len(set(stored)), "an event_id is stored twice"
    assert set(stored) == accepted
    print(f"\nfailover: {len(accepted)} events answered 202 and stored once; primary killed "
          f"after {at_kill} answers ({committed} rows committed), standby promoted "
          f"{promoted_at - killed_at:.2f} s later, {survived} rows on it; "
          f"{writing_at - killed_at:.2f} s without a writable database for the collector "
          f"(kill to its first write on the new primary); POST p99 "
          f"{result.percentile(99) * 1000:.1f} ms, max {max(result.latencies) * 1000:.1f} ms")
