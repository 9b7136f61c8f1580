"""Firehose watched by a real Prometheus: the shipped alerts fire, the dashboard's queries work."""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from collector.metrics import WorkerStats
from storage.writer import WriteResult
from tests.client import make_event, post_json, post_stream
from tests.fixtures.postgres import TEST_DATABASE
from tests.polling import wait_until

PROJECT_DIR = pathlib.Path(__file__).resolve().parents[1]
ALERTS = PROJECT_DIR / "conf" / "prometheus" / "alerts.yml"
ALERTS_TEST = PROJECT_DIR / "conf" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = PROJECT_DIR / "conf" / "prometheus" / "prometheus.yml"
DASHBOARD = PROJECT_DIR / "conf" / "grafana" / "firehose-dashboard.json"
RUNBOOK = PROJECT_DIR / "docs" / "operations.md"
PROMTOOL = "promtool"
EVENTS = 300
OUTAGE_EVENTS = 20
SPOOL_BUDGET = 128 * 1024  # bytes per worker: the flood fills it
FLOOD_EVENTS = 1000  # about 4 spool budgets of padded events, spread over the two workers
FLOOD_PADDING = 500  # characters of metadata per event
FOR_IN_TEST = "2s"  # every rule's `for:` in the test's copy (the shipped ones are minutes)
RATE_WINDOW = "1m"  # what Grafana's $__rate_interval stands for in the dashboard's queries
DASHBOARD_TIMEOUT = 5  # seconds for a panel's query to have data: a few scrapes
ALERT_TIMEOUT = 20  # seconds: 1 s scrapes and evaluations, plus FOR_IN_TEST


def shortened_rules() -> str:
    """Return the shipped alerts with every `for:` set to FOR_IN_TEST."""
    text = ALERTS.read_text()
    shortened, count = re.subn(r"^(\s+for:\s*)\S+$", rf"\g<1>{FOR_IN_TEST}", text,
                               flags=re.MULTILINE)
    assert count >= 5, "the rules' for: durations were not found"
    return shortened


def dashboard_queries() -> list[tuple[str, str]]:
    """Return (panel title, PromQL) of every target of the dashboard, ready for Prometheus."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", RATE_WINDOW))
            for panel in dashboard["panels"] for target in panel["targets"]]


def github_anchor(heading: str) -> str:
    """Return the anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_shipped_rules_and_config_pass_promtool():
    rules = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 9 rules found" in rules.stdout, rules.stdout
    config = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_fires_in_promtools_unit_tests():
    # Made-up series against the shipped rules, with their real for: durations.
    result = subprocess.run([PROMTOOL, "test", "rules", str(ALERTS_TEST)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"^\s+alertname: (\w+)$", ALERTS_TEST.read_text(), re.MULTILINE))
    assert tested == set(re.findall(r"^\s+- alert: (\w+)$", ALERTS.read_text(), re.MULTILINE))


def test_every_alert_has_a_summary_and_a_runbook_section_that_exists():
    runbook_text = RUNBOOK.read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in runbook_text.splitlines()
               if line.startswith("#")}
    rules = re.split(r"^\s+- alert: ", ALERTS.read_text(), flags=re.MULTILINE)[1:]
    assert len(rules) == 9
    for rule in rules:
        name = rule.split()[0]
        assert re.search(r"^\s+summary: ", rule, re.MULTILINE), name
        runbook = re.search(r'^\s+runbook_url: "docs/operations\.md#([\w-]+)"', rule, re.MULTILINE)
        assert runbook and runbook.group(1) in anchors, name
        assert re.search(rf"`{name}`", runbook_text), f"{name} not described in docs/operations.md"


def test_new_gauges_and_counters():
    stats = WorkerStats()
    registry = stats.metrics.registry

    def sample(name: str, **labels) -> float | None:
        return registry.get_sample_value(name, labels)

    # The answers FirehoseServerErrors counts exist before the first of them.
    for route in ("/event", "/events"):
        for status in ("500", "503"):
            assert sample("firehose_http_requests_total", route=route, method="POST",
                          status=status) == 0
    stats.count_request("/event", "POST", 503)
    assert sample("firehose_http_requests_total", route="/event", method="POST",
                  status="503") == 1
    stats.count_start()
    assert sample("firehose_worker_starts_total") == 1
    stats.sample(3, 5, 250, 1000, 12.5)
    assert sample("firehose_spool_used_ratio") == 0.25
    assert sample("firehose_oldest_unflushed_age_seconds") == 12.5
    assert sample("firehose_worker_rss_bytes") > 1_000_000  # this Python process
    # An outage is down, not broken; a deployment error is broken until a write works.
    stats.count_retry("connection refused", "transient")
    stats.database_up = False
    assert (sample("firehose_database_up"), sample("firehose_database_broken")) == (0, 0)
    stats.count_retry('relation "events" does not exist', "systemic")
    assert (sample("firehose_database_up"), sample("firehose_database_broken")) == (0, 1)
    stats.count_flushed(WriteResult(1, 0, 0), replayed=False, now=time.time())
    stats.database_up = True
    assert (sample("firehose_database_up"), sample("firehose_database_broken")) == (1, 0)


def padded_event() -> dict:
    """Return an event of about 600 bytes."""
    return make_event(metadata={"page": "/home", "pad": "x" * FLOOD_PADDING})


def has_data(result: list[dict]) -> bool:
    """Tell whether a query's vector holds at least one number (not NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def wait_for_alert(prometheus, name: str, state: str | None, began: float) -> float:
    """Wait until alert `name` is in `state` (None: not active); return the seconds it took."""
    wait_until(lambda: prometheus.alerts().get(name) == state, ALERT_TIMEOUT,
               f"alert {name} {state or 'inactive'}")
    return time.monotonic() - began


@pytest.mark.slow
def test_prometheus_sees_the_outage_and_the_dashboard_has_data(start_collector, database,
                                                               postgres, start_prometheus):
    # A small spool, so that the outage fills it: 503s, and the spool alert.
    collector = start_collector({"COLLECTOR_SPOOL_MAX_BYTES": str(SPOOL_BUDGET),
                                 "COLLECTOR_SPOOL_SEGMENT_BYTES": str(SPOOL_BUDGET // 8)},
                                workers=2)
    prometheus = start_prometheus([f"127.0.0.1:{collector.port}"], shortened_rules())
    loaded = prometheus.api("rules")["groups"][0]["rules"]
    assert len(loaded) == 9 and {r["duration"] for r in loaded if r["duration"]} == {2.0}
    wait_until(lambda: prometheus.value('up{job="firehose"}') == 1, 10, "a first scrape")
    assert prometheus.value("firehose_events_accepted_total") == 0
    assert prometheus.value("firehose_worker_starts_total") == 2

    sent = post_stream(collector.url, EVENTS, 4)
    assert sent.statuses == {202: EVENTS}
    assert post_json(collector.url + "/event", make_event(user_id=-1)).status == 400
    wait_until(lambda: prometheus.value("sum(firehose_events_flushed_total)") == EVENTS, 15,
               f"{EVENTS} flushed, as Prometheus sees it")
    assert database.count() == EVENTS
    # At the time of the last scrape the 1-minute window holds every sample since the
    # first (0 events), so rate() is exactly what was sent over 60 s: no extrapolation.
    last_scrape = prometheus.value("timestamp(firehose_events_accepted_total)")
    rate = prometheus.value("rate(firehose_events_accepted_total[1m])", at=last_scrape)
    assert math.isclose(rate * 60, EVENTS), rate
    assert prometheus.value('sum(firehose_events_refused_total{reason="user_id"})') == 1
    assert len(prometheus.query("firehose_worker_rss_bytes")) == 2  # a series per worker

    # A series born with the event (refused, by reason) needs a second scrape for rate().
    for title, expr in dashboard_queries():
        wait_until(lambda: has_data(prometheus.query(expr)), DASHBOARD_TIMEOUT,
                   f"data for {expr!r} (panel {title!r})")
    assert prometheus.alerts() == {}, "an alert is active before any fault"

    began = time.monotonic()
    postgres.stop("fast")
    try:
        outage = post_stream(collector.url, OUTAGE_EVENTS, 2)
        assert outage.statuses == {202: OUTAGE_EVENTS}  # answered from the spool
        to_pending = wait_for_alert(prometheus, "FirehoseDatabaseDown", "pending", began)
        to_firing = wait_for_alert(prometheus, "FirehoseDatabaseDown", "firing", began)
        assert "FirehoseDatabaseBroken" not in prometheus.alerts()
        assert prometheus.value("firehose_pending_events") > 0
        wait_until(lambda: prometheus.value("firehose_oldest_unflushed_age_seconds") > 1, 10,
                   "the oldest unflushed event's age past 1 s")
        flood = post_stream(collector.url, FLOOD_EVENTS, 2, factory=padded_event)
        assert flood.statuses.get(503) and set(flood.statuses) == {202, 503}, flood.statuses
        filling = time.monotonic()
        to_spool_alert = wait_for_alert(prometheus, "FirehoseSpoolFilling", "firing", filling)
        to_5xx_alert = wait_for_alert(prometheus, "FirehoseServerErrors", "firing", filling)
    finally:
        postgres.start(TEST_DATABASE)
    restarted = time.monotonic()
    resolved = wait_for_alert(prometheus, "FirehoseDatabaseDown", None, restarted)
    expected = set(sent.accepted) | set(outage.accepted) | set(flood.accepted)
    wait_until(lambda: sorted(database.event_ids()) == sorted(expected), 15,
               "every accepted event stored once")
    print(f"\nFirehoseDatabaseDown (for: {FOR_IN_TEST}, 1 s scrapes and evaluations): "
          f"pending {to_pending:.1f} s and firing {to_firing:.1f} s after PostgreSQL stopped; "
          f"inactive {resolved:.1f} s after it started again")
    print(f"{flood.statuses.get(503)} of {FLOOD_EVENTS} events answered 503 with the spool "
          f"full: FirehoseSpoolFilling firing {to_spool_alert:.1f} s and FirehoseServerErrors "
          f"{to_5xx_alert:.1f} s after")

    # A deployment error: the table the flusher writes to is gone. Broken, not down.
    database.query("ALTER TABLE events RENAME TO events_moved_away")
    try:
        misplaced = post_stream(collector.url, OUTAGE_EVENTS, 2)
        assert misplaced.statuses == {202: OUTAGE_EVENTS}
        moved = time.monotonic()
        to_broken = wait_for_alert(prometheus, "FirehoseDatabaseBroken", "firing", moved)
        assert "FirehoseDatabaseDown" not in prometheus.alerts()
    finally:
        database.query("ALTER TABLE events_moved_away RENAME TO events")
    wait_for_alert(prometheus, "FirehoseDatabaseBroken", None, time.monotonic())
    expected |= set(misplaced.accepted)
    wait_until(lambda: sorted(database.event_ids()) == sorted(expected), 15,
               "every accepted event stored once, the table back")
    print(f"FirehoseDatabaseBroken firing {to_broken:.1f} s after the events table was renamed")

    victim = collector.worker_pids()[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    to_restart_alert = wait_for_alert(prometheus, "FirehoseWorkersRestarting", "firing", killed)
    assert prometheus.value("firehose_worker_starts_total") == 3
    print(f"FirehoseWorkersRestarting firing {to_restart_alert:.1f} s after a worker's SIGKILL")
