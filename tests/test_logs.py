"""Logs of real gunicorn: JSON lines on stderr, combined-format access lines, nothing per event."""

import json
import re
import time

from tests.client import make_event, post_json, post_stream, request
from tests.polling import wait_until

# Apache's combined format, with the user field always "-" (gunicorn.conf.py).
COMBINED = re.compile(r'^(\S+) - - \[[^\]]+\] "(\S+) (\S+) HTTP/1\.1" (\d{3}) (\d+|-) '
                      r'"[^"]*" "[^"]*"$')
JSON_KEYS = {"time", "level", "logger", "pid", "message"}


def split_output(output: str) -> tuple[list[dict], list[str]]:
    """Return (JSON log records, access lines); fail on a line that is neither."""
    records, access = [], []
    for line in output.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            assert COMBINED.match(line), f"neither JSON nor an access line: {line!r}"
            access.append(line)
    return records, access


def test_json_logs_and_no_line_per_event(start_collector, database):
    collector = start_collector({"ACCESS_LOG": "1"}, workers=1)
    result = post_stream(collector.url, 200, 4)
    assert result.statuses == {202: 200}
    wait_until(lambda: database.count() == 200, 10, "200 rows")
    refused = request(collector.url + "/event", "POST", b"{", {"Content-Type": "application/json"})
    assert refused.status == 400
    assert collector.terminate() == 0
    records, access = split_output(collector.output())
    assert all(JSON_KEYS <= set(r) for r in records), records
    messages = [r["message"] for r in records]
    assert any("pipeline started" in m for m in messages)
    assert any(r["logger"] == "gunicorn.error" for r in records)
    # 200 events and a refusal, yet only start and stop are logged: no line per event.
    app_records = [r for r in records if r["logger"].startswith(("collector", "storage"))]
    assert len(app_records) < 10, messages
    assert not any(event_id in collector.output() for event_id in result.accepted)
    posts = [COMBINED.match(line).groups() for line in access if '"POST /event ' in line]
    assert sorted(g[3] for g in posts) == ["202"] * 200 + ["400"]


def test_log_level_comes_from_the_setting(start_collector, database):
    collector = start_collector({"COLLECTOR_LOG_LEVEL": "warning"}, workers=1)
    assert post_json(collector.url + "/event", make_event()).status == 202
    assert collector.terminate() == 0
    records, access = split_output(collector.output())
    assert not access  # ACCESS_LOG unset
    # At info, gunicorn and the pipeline log their start and stop; at warning, neither.
    assert {r["level"] for r in records} <= {"WARNING", "ERROR", "CRITICAL"}, records
    assert "pipeline started" not in collector.output()


def test_plain_logs_when_asked_and_the_address_listened_at(start_collector, database):
    collector = start_collector({"COLLECTOR_LOG_FORMAT": "plain"}, workers=1)
    assert collector.terminate() == 0
    lines = collector.output().splitlines()
    assert lines and not any(line.startswith("{") for line in lines), lines[:5]
    assert any(re.search(r" INFO \[\d+\] collector\.pipeline: pipeline started", line)
               for line in lines), lines
    assert any(f"firehose listening at {collector.url}" in line for line in lines), lines


def test_an_outage_from_the_start_is_timed_from_its_first_failure(start_collector, database,
                                                                  postgres):
    postgres.stop("fast")
    collector = start_collector({"COLLECTOR_LOG_FORMAT": "json"}, workers=1)
    assert post_json(collector.url + "/event", make_event()).status == 202
    health = wait_until(lambda: (lambda h: h if h["outage_since"] else None)(collector.health()),
                        10, "the outage to be seen")
    wait_until(lambda: time.time() - health["outage_since"] > 2, 5, "2 s of outage")
    postgres.start("firehose_test")
    wait_until(lambda: database.count() == 1, 30, "the event's row")
    records, _ = split_output(collector.output())
    back = [r for r in records if r["message"].startswith("database available again")]
    assert len(back) == 1 and back[0]["level"] == "INFO", back
    assert float(re.search(r"after ([0-9.]+) s", back[0]["message"]).group(1)) >= 2, back
