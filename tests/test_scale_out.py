"""Several collectors behind one nginx: one of them dies under load, no event answered 202 is lost.

Two gunicorn instances, each with its own port and spool directory (as on two machines),
run behind real nginx with conf/nginx.conf rendered with two `server` lines. A connection
to a collector that is down goes to the other one; a collector SIGKILLed with requests in
flight costs those requests nginx's JSON 503, never an HTML 502; what it had answered 202
waits in its spool until it starts again on the same spool directory, and is stored once.
"""

import os
import pathlib
import re
import signal
import threading

import msgspec
import pytest

from collector.spool import SEGMENT_SUFFIX, read_records
from collector.validation import Event
from tests.client import Answer, StreamResult, make_event, post_json, post_stream
from tests.fixtures.collector import Collector, stop_all
from tests.fixtures.nginx import set_rates
from tests.fixtures.postgres import free_port
from tests.polling import wait_until

WORKERS = 2  # per collector
STREAM_EVENTS = 1500  # sent through nginx in the kill test
STREAM_CONCURRENCY = 6
STREAM_DEADLINE = 90  # seconds
KILL_AT = 400  # answers before one collector is killed
AFTER_KILL = 300  # answers the stream still has to give once the collector is dead
STORE_TIMEOUT = 30  # seconds for accepted events to reach PostgreSQL
# The collector that is killed flushes nothing before it dies, so that what it answered
# 202 is provably in its spool and nowhere else.
HOLD = {"COLLECTOR_FLUSH_INTERVAL": "600", "COLLECTOR_BATCH_SIZE": "100000"}
RETRY_AFTER = "5"  # conf/nginx.conf's Retry-After on its own 503
TCP_ESTABLISHED = "01"  # a socket's state in /proc/net/tcp
# nginx's error log line for an attempt that failed after the request was sent upstream.
FAILED_AFTER_SEND = (r"\[error\].* while (?:sending request to|reading response header from) "
                     r"upstream, .*upstream: \"http://127\.0\.0\.1:{port}/")


@pytest.fixture
def start_instance(database, spool_root):
    """Start collectors that each have a spool directory of their own; stop them at the end."""
    started: list[Collector] = []

    def start(name: str, env: dict[str, str] | None = None,
              port: int | None = None) -> Collector:
        collector = Collector(database.url, spool_root / name, env or {}, WORKERS, port)
        started.append(collector)
        return collector.start()

    yield start
    stop_all(started)


def spooled_ids(spool_dir: pathlib.Path) -> set[str]:
    """Return the event_ids of every record in a (dead) collector's spool directory."""
    ids = set()
    for segment in spool_dir.glob("*/*" + SEGMENT_SUFFIX):
        payloads, _, skipped = read_records(segment, 0, 10**9)
        assert not skipped, f"{segment}: {skipped} corrupt bytes"
        ids.update(msgspec.msgpack.decode(p, type=Event).event_id for p in payloads)
    return ids


def unread_requests(port: int) -> int:
    """Count the established TCP connections to local `port` holding bytes not yet read."""
    count = 0
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state, queues = line.split()[1:5]
        if (int(local.rsplit(":", 1)[1], 16) == port and state == TCP_ESTABLISHED
                and int(queues.split(":")[1], 16) > 0):
            count += 1
    return count


def freeze(collector: Collector) -> None:
    """SIGSTOP a collector's master and workers: requests sent to it wait, unanswered."""
    for pid in [collector.process.pid, *collector.worker_pids()]:
        os.kill(pid, signal.SIGSTOP)


def failed_after_send(nginx, port: int) -> int:
    """Count the attempts nginx logged as failed after sending a request to `port`."""
    return len(re.findall(FAILED_AFTER_SEND.format(port=port), nginx.error_log()))


def assert_nginx_unavailable(answer: Answer) -> None:
    """Check that a refusal is conf/nginx.conf's JSON 503 with Retry-After (no HTML 502)."""
    assert answer.status == 503, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    assert answer.headers.get("retry-after") == RETRY_AFTER, answer
    assert isinstance(answer.body, dict), answer
    assert answer.body.get("title") == "Service unavailable", answer
    assert "same event_id" in answer.body.get("description", ""), answer


def test_a_collector_that_is_down_is_skipped(collector, database, start_nginx):
    # Two upstream servers, one of which listens nowhere: nginx's connection to it is
    # refused before anything is sent, so even a POST goes on to the live collector.
    nginx = start_nginx(free_port(), collector.port)
    events = [make_event() for _ in range(20)]
    answers = [post_json(nginx.url + "/event", event) for event in events]
    assert [a.status for a in answers] == [202] * len(events), answers
    log = nginx.error_log()
    refused = log.count("Connection refused) while connecting to upstream")
    print(f"\nrefused connections passed to the next server: {refused}; "
          f"server disabled: {'temporarily disabled' in log}")
    assert refused >= 1, log
    assert "upstream server temporarily disabled" in log, log  # after max_fails of them
    expected = {e["event_id"] for e in events}
    wait_until(lambda: sorted(database.event_ids()) == sorted(expected), STORE_TIMEOUT,
               "the 20 events, once each")


@pytest.mark.slow
def test_one_collector_killed_behind_nginx_loses_no_accepted_event(start_instance, database,
                                                                    start_nginx):
    survivor = start_instance("survivor")
    victim = start_instance("victim", HOLD)
    # One test client sends as fast as it can from one address: lift that address's limit.
    nginx = start_nginx(survivor.port, victim.port, edit=lambda site: set_rates(
        site, {"firehose_client_event": ("100000r/s", 100000)}))

    answered = [0]
    result: list[StreamResult] = []
    documents: dict[str, dict] = {}  # event_id -> the event sent, to resend it as it was

    def on_sent(count: int) -> None:
        answered[0] = count

    def event() -> dict:
        document = make_event()
        documents[document["event_id"]] = document
        return document

    stream = threading.Thread(target=lambda: result.append(post_stream(
        nginx.url, STREAM_EVENTS, STREAM_CONCURRENCY, deadline_s=STREAM_DEADLINE,
        on_sent=on_sent, factory=event)), name="event-stream", daemon=True)
    stream.start()
    try:
        wait_until(lambda: answered[0] >= KILL_AT or not stream.is_alive(), STORE_TIMEOUT,
                   f"{KILL_AT} answers through nginx")
        assert stream.is_alive(), "the stream ended before the kill"
        kill_began = answered[0]
        # Frozen first, so that requests are certainly in flight on it when it dies.
        freeze(victim)
        wait_until(lambda: unread_requests(victim.port), STORE_TIMEOUT,
                   "a request sent to the frozen collector")
        victim.kill_all()  # the requests in flight on it meet a closed connection
        killed_at = answered[0]
    finally:
        stream.join(STREAM_DEADLINE + 10)
    assert not stream.is_alive() and result, "the stream did not finish"
    sent_stream = result[0]
    accepted = set(sent_stream.accepted)
    sent = set(sent_stream.sent)
    non_202 = {s: n for s, n in sent_stream.statuses.items() if s != 202}
    print(f"\nscale-out, one of two collectors SIGKILLed behind nginx: sent {len(sent)}, "
          f"202 {len(accepted)}, non-202 by status {non_202}; kill began after "
          f"{kill_began} answers, ended after {killed_at}")

    # Every refusal is nginx's JSON 503; no connection error, no HTML 502.
    assert len(sent) == len(sent_stream.sent) == STREAM_EVENTS
    assert len(accepted) == len(sent_stream.accepted)
    assert 0 not in sent_stream.statuses, sent_stream.statuses
    assert len(sent_stream.refused) == len(sent) - len(accepted)
    for answer in sent_stream.refused:
        assert_nginx_unavailable(answer)
    # The requests in flight on the victim, and only those, were refused: each attempt
    # that failed after nginx had sent it the request became one 503, none was passed
    # to the survivor (a POST re-sent there could be stored twice).
    in_flight = failed_after_send(nginx, victim.port)
    print(f"attempts failed after the request was sent to the victim: {in_flight}")
    assert in_flight >= 1, "no request was in flight on the victim when it was killed"
    assert sent_stream.statuses.get(503, 0) == in_flight, (sent_stream.statuses, in_flight)
    assert failed_after_send(nginx, survivor.port) == 0
    # After the kill the survivor took the stream on: the answers since then are
    # nearly all 202 (only those in flight on the dead one, and the few nginx sent it
    # before marking it down, were refused).
    after_kill = len(sent) - killed_at
    assert after_kill >= AFTER_KILL, f"only {after_kill} answers after the kill"
    assert len(sent) - len(accepted) < after_kill // 10, sent_stream.statuses

    # Until the victim starts again, what it answered 202 is in its spool, not in
    # PostgreSQL; everything the survivor answered 202 is stored.
    in_victim_spool = spooled_ids(victim.spool_dir)
    victim_accepted = in_victim_spool & accepted
    survivor_accepted = accepted - in_victim_spool
    assert in_victim_spool <= sent
    assert victim_accepted and survivor_accepted, "both collectors should have taken events"
    wait_until(lambda: set(database.event_ids()) >= survivor_accepted, STORE_TIMEOUT,
               f"the survivor's {len(survivor_accepted)} accepted events in PostgreSQL")
    # The victim flushed nothing, so an event of its spool already stored would be one
    # that nginx passed on to the survivor after sending it to the victim.
    assert not set(database.event_ids()) & in_victim_spool, "a POST sent to two collectors"
    spooled_refused = in_victim_spool - accepted  # spooled, then killed before its 202
    print(f"victim's spool: {len(in_victim_spool)} events, {len(victim_accepted)} answered "
          f"202 and {len(spooled_refused)} refused (503) after being spooled; "
          f"survivor: {len(survivor_accepted)} answered 202")

    # Started again on its spool directory (and port), it replays what it spooled.
    restarted = start_instance("victim", port=victim.port)
    assert restarted.spool_dir == victim.spool_dir
    wait_until(lambda: set(database.event_ids()) >= accepted, STORE_TIMEOUT,
               f"all {len(accepted)} events answered 202 in PostgreSQL")

    # The clients' rule for a 503: resend with the same event_id. Each is stored once,
    # including those the victim had spooled before it died without answering.
    resent = sorted(sent - accepted)
    answers = [post_json(nginx.url + "/event", documents[event_id]) for event_id in resent]
    assert [a.status for a in answers] == [202] * len(resent), answers
    wait_until(lambda: set(database.event_ids()) == sent, STORE_TIMEOUT,
               f"all {len(sent)} events sent in PostgreSQL")
    stored = database.event_ids()
    duplicates = len(stored) - len(set(stored))
    print(f"after the restart and {len(resent)} resends: {len(stored)} rows, "
          f"{len(set(stored))} distinct event_ids, {duplicates} duplicates")
    assert duplicates == 0
    assert set(stored) == sent
