"""GET /metrics of real gunicorn: every worker's counts add up, a killed worker's included."""

import glob
import os
import signal

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from tests.client import get_json, make_event, post_json, post_stream, request
from tests.polling import wait_until

EVENTS = 300
STALE = 1000.0  # what a previous run left in the metrics directory; must not count


def scrape(url: str) -> list:
    """Return the samples of /metrics."""
    answer = request(url + "/metrics")
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(answer.body) for s in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """Return the sum of the samples named `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def per_worker_accepted(collector) -> dict[int, int]:
    """Ask /health until both workers have answered; return accepted by worker pid."""
    seen: dict[int, int] = {}

    def both() -> bool:
        health = collector.health()
        seen[health["worker_pid"]] = health["accepted"]
        return len(seen) == 2

    wait_until(both, 10, "/health answers from both workers")
    return seen


def leave_stale_counter(directory) -> None:
    """Write a counter file as a worker of a previous run would have left it."""
    stale = MmapedDict(str(directory / "counter_999999.db"))
    stale.write_value(mmap_key("firehose_events_accepted", "firehose_events_accepted_total",
                               (), (), "events answered 202 (in the spool)"), STALE, 0.0)
    stale.close()


def test_counters_add_up_across_workers_and_survive_a_killed_worker(start_collector, database,
                                                                     spool_root):
    metrics_dir = spool_root / "metrics"
    metrics_dir.mkdir()
    leave_stale_counter(metrics_dir)
    collector = start_collector({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, workers=2)
    # A new connection for each event, so that the kernel spreads them over both workers.
    statuses = [post_json(collector.url + "/event", make_event()).status for _ in range(EVENTS)]
    assert statuses == [202] * EVENTS
    for bad in (make_event(user_id=-1), make_event(user_id="7"), make_event(userId=7)):
        assert post_json(collector.url + "/event", bad).status == 400
    partial = post_json(collector.url + "/events", [make_event(), make_event(metadata=[1])])
    assert partial.status == 202 and len(partial.body["accepted"]) == 1
    sent = EVENTS + 1
    wait_until(lambda: value(scrape(collector.url), "firehose_events_flushed_total") == sent,
               30, f"{sent} flushed in /metrics")
    wait_until(lambda: database.count() == sent, 10, f"{sent} rows")

    accepted = per_worker_accepted(collector)
    assert all(accepted.values()) and sum(accepted.values()) == sent, accepted
    samples = scrape(collector.url)
    assert value(samples, "firehose_events_accepted_total") == sent
    assert value(samples, "firehose_events_refused_total", reason="user_id") == 2
    assert value(samples, "firehose_events_refused_total", reason="unknown_field") == 1
    assert value(samples, "firehose_events_refused_total", reason="metadata") == 1
    assert value(samples, "firehose_http_requests_total", route="/event", method="POST",
                 status="202") == EVENTS
    assert value(samples, "firehose_http_requests_total", route="/event", status="400") == 3
    assert value(samples, "firehose_http_requests_total", route="/events", status="202") == 1
    assert value(samples, "firehose_batch_size_sum") == sent
    batches = value(samples, "firehose_batch_size_count")
    assert batches >= 2 and value(samples, "firehose_flush_seconds_count") == batches
    assert value(samples, "firehose_events_dead_lettered_total") == 0
    assert value(samples, "firehose_events_inserted_total") == sent
    assert value(samples, "firehose_database_up") == 1
    wait_until(lambda: value(scrape(collector.url), "firehose_pending_events") == 0, 10,
               "no pending events in /metrics")

    victim = collector.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in (pids := collector.worker_pids()) and len(pids) == 2
               and get_json(collector.url + "/ready")[0] == 200, 30,
               "a new worker in place of the killed one")
    # As prometheus-client documents: a dead worker's counters stay, its live gauges go.
    wait_until(lambda: not glob.glob(str(metrics_dir / f"gauge_live*_{victim}.db")), 10,
               "the killed worker's gauge files to be removed")
    assert glob.glob(str(metrics_dir / f"counter_{victim}.db"))
    samples = scrape(collector.url)
    assert value(samples, "firehose_events_accepted_total") == sent
    assert value(samples, "firehose_events_flushed_total") == sent
    # What the killed worker's spool still held is written again, as duplicates.
    wait_until(lambda: not list(collector.spool_dir.glob(f"{victim}-*")), 20,
               "the killed worker's spool replayed and removed")
    samples = scrape(collector.url)
    assert value(samples, "firehose_events_replayed_total") == value(
        samples, "firehose_events_duplicate_total")
    assert value(samples, "firehose_events_inserted_total") == database.count() == sent

    more = post_stream(collector.url, 100, 10)
    assert more.statuses == {202: 100}
    wait_until(lambda: value(scrape(collector.url), "firehose_events_flushed_total")
               == sent + 100, 30, "the later events flushed in /metrics")
    samples = scrape(collector.url)
    assert value(samples, "firehose_events_accepted_total") == sent + 100
    assert value(samples, "firehose_events_inserted_total") == database.count() == sent + 100
    assert value(samples, "firehose_database_up") == 1


def test_metrics_in_a_directory_of_their_own(collector, database):
    # No PROMETHEUS_MULTIPROC_DIR given: gunicorn.conf.py makes a fresh one for the run.
    assert post_json(collector.url + "/events", [make_event() for _ in range(5)]).status == 202
    wait_until(lambda: value(scrape(collector.url), "firehose_events_flushed_total") == 5, 10,
               "5 flushed in /metrics")
    assert value(scrape(collector.url), "firehose_events_accepted_total") == 5
