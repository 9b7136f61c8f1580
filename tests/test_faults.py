"""Faults injected into the real processes: every event answered 202 ends up stored once.

Each test sends a known set of events, injects the fault, then checks that rows in
events plus dead_letters equal the events answered 202, with no event_id twice.
The figures of each run are printed as one line of the "Faults survived" table of docs/operations.md.
"""

import json
import os
import signal
import threading

import msgspec
import pytest

from collector.spool import encode_record
from collector.validation import Event
from tests.client import make_event, post_json, post_stream
from tests.polling import wait_until

# Nothing is flushed before the fault unless the test says so.
HOLD = {"COLLECTOR_FLUSH_INTERVAL": "600", "COLLECTOR_BATCH_SIZE": "100000"}


def report(fault: str, result, database) -> None:
    """Check the invariant and print the table row: rows + dead letters = 202s, lost = 0."""
    accepted = set(result.accepted)
    wait_until(lambda: database.count() + database.count("dead_letters") >= len(accepted), 60,
               f"{len(accepted)} stored events")
    stored = database.event_ids()
    dead = database.event_ids("dead_letters")
    assert len(stored) == len(set(stored)) and len(dead) == len(set(dead)), "a duplicate"
    assert not set(stored) & set(dead), "an event both stored and dead-lettered"
    lost = accepted - set(stored) - set(dead)
    print(f"\nFAULT | {fault} | {len(result.sent)} | {len(accepted)} | {len(stored)} | "
          f"{len(dead)} | {len(lost)}")
    assert not lost, f"{len(lost)} accepted events lost"
    assert set(stored) | set(dead) <= set(result.sent), "a row nobody sent"


def stream_in_background(url: str, count: int, connections: int = 10):
    """Start a bounded stream of POSTs in a thread; return (thread, results, answered)."""
    results, answered = [], [0]

    def on_sent(n):
        answered[0] = n

    thread = threading.Thread(target=lambda: results.append(
        post_stream(url, count, connections, deadline_s=90, on_sent=on_sent)))
    thread.start()
    return thread, results, answered


@pytest.mark.slow
def test_sigkill_one_worker_after_a_burst(start_collector, database):
    collector = start_collector(HOLD)
    result = post_stream(collector.url, 600, 10)
    assert result.statuses == {202: 600}
    assert database.count() == 0
    victim = collector.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # gunicorn starts a new worker, which finds the dead one's spool and replays it.
    wait_until(lambda: database.count() > 0, 30, "the replay of the killed worker's spool")
    assert "replayed" in collector.output()
    assert collector.terminate() == 0  # the surviving worker drains its own
    report("SIGKILL one worker after a burst", result, database)


@pytest.mark.slow
def test_sigkill_master_and_workers_then_restart(start_collector, database):
    collector = start_collector(HOLD)
    result = post_stream(collector.url, 600, 10)
    assert result.statuses == {202: 600}
    collector.kill_all()
    assert database.count() == 0
    start_collector()  # same spool directory: the new workers adopt both dead spools
    report("SIGKILL master and all workers, restart", result, database)


@pytest.mark.slow
def test_sigterm_during_a_stream(start_collector, database):
    collector = start_collector()
    thread, results, answered = stream_in_background(collector.url, 20_000)
    wait_until(lambda: answered[0] >= 1000, 30, "1000 answers")
    collector.process.send_signal(signal.SIGTERM)
    assert collector.process.wait(timeout=45) == 0
    thread.join(timeout=120)
    result = results[0]
    assert set(result.statuses) <= {202, 0}, result.statuses  # refused connections once stopped
    report("SIGTERM during a stream", result, database)


@pytest.mark.slow
def test_postgres_down_longer_than_the_memory_queue(start_collector, database, postgres):
    collector = start_collector({"COLLECTOR_QUEUE_CAPACITY": "50"})
    postgres.stop("fast")
    result = post_stream(collector.url, 3000, 10)
    assert result.statuses == {202: 3000}
    health = collector.health()
    assert health["overflowing_to_spool"] and health["spool_bytes"] > 0, health
    assert health["queue_depth"] <= 50
    postgres.start("firehose_test")
    report("PostgreSQL down past the memory queue", result, database)
    wait_until(lambda: collector.health()["last_catch_up"], 30, "a catch-up report")
    print("catch-up:", collector.health()["last_catch_up"])


@pytest.mark.slow
def test_flusher_connection_terminated_mid_stream(start_collector, database):
    collector = start_collector()
    thread, results, answered = stream_in_background(collector.url, 6000)
    for round_ in range(3):
        wait_until(lambda: answered[0] >= 1000 * (round_ + 1), 30, "more answers")
        terminated = database.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'firehose' AND pid <> pg_backend_pid()")
        assert terminated, "no flusher connection to terminate"
    thread.join(timeout=120)
    result = results[0]
    assert result.statuses == {202: len(result.sent)}
    report("pg_terminate_backend of the flusher, 3 times", result, database)


@pytest.mark.slow
@pytest.mark.usefixtures("insert_method")
def test_poison_events_are_dead_lettered(start_collector, database):
    collector = start_collector({"COLLECTOR_FLUSH_INTERVAL": "600", "COLLECTOR_BATCH_SIZE": "300"},
                                workers=1)
    wait_until(lambda: database.query("SELECT to_regclass('events') IS NOT NULL")[0][0], 30,
               "the schema")
    # Valid for the collector, refused by PostgreSQL: a constraint of the database's own.
    database.query("ALTER TABLE events ADD CONSTRAINT no_poison "
                   "CHECK (NOT metadata ? 'poison')")
    events = [make_event() for _ in range(300)]
    poison_at = {7, 8, 150, 299}
    for index in poison_at:
        events[index]["metadata"] = {"poison": True, "index": index}
    answers = [post_json(collector.url + "/event", e) for e in events]  # one batch of 300
    assert [a.status for a in answers] == [202] * 300

    class Sent:
        sent = [e["event_id"] for e in events]
        accepted = [a.body["event_id"] for a in answers]

    report("poison events in a batch", Sent, database)
    assert database.count() == 296
    dead = database.query("SELECT event_id::text, error_code, convert_from(payload, 'UTF8') "
                          "FROM dead_letters")
    assert {d[0] for d in dead} == {events[i]["event_id"] for i in poison_at}
    assert {d[1] for d in dead} == {"23514"}
    payloads = [json.loads(d[2]) for d in dead]
    assert all(p["metadata"]["poison"] is True and p["user_id"] for p in payloads)
    assert collector.health()["dead_lettered"] == 4


@pytest.mark.slow
def test_torn_spool_records_are_skipped(start_collector, database, spool_root):
    # A dead worker's spool: good records around a corrupted one, and a torn last record.
    events = [Event(make_event()["event_id"], i, "2024-05-01T12:00:00+00:00", '{"i": %d}' % i,
                    1714564800.0) for i in range(10)]
    records = [encode_record(msgspec.msgpack.encode(e)) for e in events]
    corrupt = bytearray(records[4])
    corrupt[-2] ^= 0xFF  # its checksum no longer matches
    records[4] = bytes(corrupt)
    torn = records[9][: len(records[9]) // 2]
    dead = spool_root / "spool" / "12345-deadbeef0000"
    dead.mkdir(parents=True)
    (dead / "00000001.seg").write_bytes(b"".join(records[:9]) + torn)
    (dead / "lock").touch()

    collector = start_collector()
    expected = {e.event_id for i, e in enumerate(events) if i not in (4, 9)}
    wait_until(lambda: set(database.event_ids()) == expected, 30, "the 8 whole records")
    wait_until(lambda: not dead.exists(), 10, "the replayed spool's removal")
    assert "corrupt bytes" in collector.output()

    class Sent:
        sent = [e.event_id for e in events]
        accepted = sorted(expected)

    report("torn and corrupt spool records", Sent, database)
