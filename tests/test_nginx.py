"""Firehose as deployed: real gunicorn behind real nginx running conf/nginx.conf.

Events POSTed through nginx are stored; every refusal, nginx's own included, is the
app's JSON; gzip bodies pass through; a gunicorn reload (HUP) or a full stop and start
behind nginx loses no event that was answered 202. Then the shipped deployment files
are checked against each other: the systemd unit (systemd-analyze verify), the
environment example (every setting, with its default) and the values nginx, gunicorn
and the collector must agree on.
"""

import gzip
import json
import re
import runpy
import shutil
import signal
import socket
import subprocess
import threading

import pytest

from collector.settings import SETTINGS, Settings, SettingsError
from tests.client import StreamResult, make_event, post_json, post_stream, request
from tests.fixtures.collector import GUNICORN, PROJECT_DIR
from tests.polling import wait_until

CONF = PROJECT_DIR / "conf"
JSON = {"Content-Type": "application/json"}
STORE_TIMEOUT = 30  # seconds for accepted events to reach PostgreSQL
RESTART_TIMEOUT = 40  # seconds for gunicorn's old workers to drain and exit
STREAM_EVENTS = 400  # per streaming test: enough to span a restart, small for a 2-core box
STREAM_CONCURRENCY = 4
GATE_TIMEOUT = 60  # seconds a paused stream waits for the test to let it go on
STREAM_TIMEOUT = 120
GUNICORN_ENV_VARS = ("WEB_CONCURRENCY", "HOST", "PORT", "ACCESS_LOG")


def padded_event(size: int) -> bytes:
    """Return a valid event document of exactly `size` bytes."""
    event = make_event(metadata={"pad": ""})
    base = len(json.dumps(event).encode())
    event["metadata"]["pad"] = "x" * (size - base)
    body = json.dumps(event).encode()
    assert len(body) == size
    return body


def stored_ids(database) -> set[str]:
    """Return the event_ids in the events table."""
    return set(database.event_ids())


class StreamGates:
    """Pause a post_stream after given numbers of answers, until the test lets it go on.

    post_stream calls `on_sent` under its lock, so while a gate is closed no worker
    thread sends anything: the test can put the server in the state it wants (a
    restart begun, workers replaced, gunicorn down) and then let the next events meet it.
    """

    def __init__(self, *counts: int) -> None:
        self.reached = {count: threading.Event() for count in counts}
        self.opened = {count: threading.Event() for count in counts}

    def on_sent(self, answered: int) -> None:
        if answered in self.reached:
            self.reached[answered].set()
            self.opened[answered].wait(GATE_TIMEOUT)

    def wait(self, count: int) -> None:
        """Wait until the stream stands at gate `count`."""
        assert self.reached[count].wait(GATE_TIMEOUT), f"the stream never reached {count}"

    def open(self, count: int) -> None:
        """Let the stream go on past gate `count`."""
        self.opened[count].set()

    def open_all(self) -> None:
        """Let the stream run to its end."""
        for event in self.opened.values():
            event.set()


def run_stream(url: str, count: int, gates: StreamGates) -> tuple[threading.Thread, list]:
    """Start post_stream in a thread; return the thread and a list that gets its result."""
    result: list[StreamResult] = []
    thread = threading.Thread(
        target=lambda: result.append(post_stream(url, count, STREAM_CONCURRENCY,
                                                 on_sent=gates.on_sent)),
        name="event-stream", daemon=True)
    thread.start()
    return thread, result


def finish(thread: threading.Thread, result: list, gates: StreamGates) -> StreamResult:
    """Open every gate and return the stream's result once it has ended."""
    gates.open_all()
    thread.join(STREAM_TIMEOUT)
    assert not thread.is_alive() and result, "the stream did not finish"
    return result[0]


def assert_json_error(answer, status: int, **expected) -> dict:
    """Check an error answer: its status, a JSON body in the app's shape, given keys."""
    assert answer.status == status, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    body = answer.body
    assert isinstance(body, dict) and {"title", "description"} <= body.keys(), answer
    assert set(body) <= {"title", "description", "field", "limit"}, answer
    for key, value in expected.items():
        assert body.get(key) == value, (key, answer)
    return body


# --- Through nginx: stored, refused, compressed --------------------------------------

def test_events_through_nginx_are_stored(collector, database, start_nginx):
    nginx = start_nginx(collector.port)
    singles = [make_event() for _ in range(20)]
    for event in singles:
        answer = post_json(nginx.url + "/event", event)
        assert answer.status == 202, answer
        assert answer.body == {"status": "accepted", "event_id": event["event_id"]}
    batch = [make_event() for _ in range(10)]
    answer = post_json(nginx.url + "/events", batch)
    assert answer.status == 202, answer
    assert len(answer.body["accepted"]) == 10

    expected = {e["event_id"] for e in singles + batch}
    wait_until(lambda: stored_ids(database) == expected, STORE_TIMEOUT,
               "the 30 events sent through nginx in PostgreSQL")
    status, ready = request(nginx.url + "/ready")[:2]
    assert status == 200 and ready["status"] == "ready"
    assert request(nginx.url + "/health").status == 200


def test_body_limits_match_the_app_and_answer_json(collector, database, start_nginx):
    nginx = start_nginx(collector.port)
    # At the limit: nginx lets it through, the app takes it.
    at_limit = padded_event(65_536)
    assert post_json(nginx.url + "/event", at_limit).status == 202
    # One byte over: nginx refuses it itself, with the app's own answer.
    over = padded_event(65_537)
    through = post_json(nginx.url + "/event", over)
    direct = post_json(collector.url + "/event", over)
    assert_json_error(through, 413, title="Payload too large", limit="max_event_bytes")
    assert_json_error(direct, 413, title="Payload too large", limit="max_event_bytes")
    assert through.body == direct.body
    assert "client intended to send too large body" in nginx.error_log()  # not gunicorn

    # A batch over 5 MiB.
    batch = json.dumps([make_event(metadata={"pad": "y" * 1000}) for _ in range(5200)])
    assert len(batch) > 5_242_880
    through = post_json(nginx.url + "/events", batch.encode())
    assert_json_error(through, 413, title="Payload too large", limit="max_batch_bytes",
                      description="body exceeds 5242880 bytes")

    wait_until(lambda: database.count() == 1, STORE_TIMEOUT, "the event at the limit")


def test_app_refusals_pass_through_nginx_unchanged(collector, database, start_nginx):
    nginx = start_nginx(collector.port)
    bad_event = make_event(user_id="seven")
    cases = [
        ("/event", json.dumps(bad_event).encode(), JSON, 400, {"field": "user_id"}),
        ("/event", json.dumps(make_event()).encode(), {"Content-Type": "application/xml"},
         415, {"limit": "content_type"}),
        ("/events", json.dumps([]).encode(), JSON, 400, {}),
    ]
    for path, body, headers, status, expected in cases:
        through = request(nginx.url + path, "POST", body, headers)
        direct = request(collector.url + path, "POST", body, headers)
        assert_json_error(through, status, **expected)
        assert through.body == direct.body, (through, direct)
    # The collector's 405 for a wrong method, also JSON.
    assert_json_error(request(nginx.url + "/health", "DELETE"), 405)
    assert database.count() == 0


def test_nginx_own_refusals_are_json(collector, database, start_nginx):
    nginx = start_nginx(collector.port)
    assert_json_error(request(nginx.url + "/wp-login.php"), 404)
    assert_json_error(request(nginx.url + "/.firehose-errors/bad-request"), 404)
    # Not HTTP at all: nginx's 400, still JSON.
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw
    assert b"content-type: application/json" in head.lower(), raw
    assert json.loads(body)["title"] == "Bad request"


def test_gzip_body_passes_through_untouched(collector, database, start_nginx):
    nginx = start_nginx(collector.port)
    event = make_event(metadata={"text": "compressible " * 200})
    answer = request(nginx.url + "/event", "POST", gzip.compress(json.dumps(event).encode()),
                     {**JSON, "Content-Encoding": "gzip"})
    assert answer.status == 202, answer
    assert answer.body["event_id"] == event["event_id"]
    wait_until(lambda: database.event_ids() == [event["event_id"]], STORE_TIMEOUT,
               "the gzip event's row")
    stored = database.query("SELECT metadata::text FROM events")[0][0]
    assert json.loads(stored) == event["metadata"]

    # Small on the wire, too large inflated: nginx passes it, the app caps the inflated size.
    bomb = gzip.compress(padded_event(200_000))
    assert len(bomb) < 65_536
    answer = request(nginx.url + "/event", "POST", bomb, {**JSON, "Content-Encoding": "gzip"})
    assert_json_error(answer, 413, limit="max_event_bytes")
    assert "decompressed" in answer.body["description"]


# --- Restarts behind nginx ---------------------------------------------------------

@pytest.mark.slow
def test_gunicorn_reload_behind_nginx_loses_no_accepted_event(collector, database,
                                                              start_nginx):
    nginx = start_nginx(collector.port)
    old_workers = set(collector.worker_pids())
    # 100 events before the HUP, 100 while old workers drain and new ones boot, the
    # rest once the new workers are in place.
    gates = StreamGates(100, 200)
    thread, result = run_stream(nginx.url, STREAM_EVENTS, gates)
    try:
        gates.wait(100)
        collector.process.send_signal(signal.SIGHUP)
        wait_until(lambda: set(collector.worker_pids()) - old_workers, RESTART_TIMEOUT,
                   "gunicorn to fork new workers")
        gates.open(100)
        gates.wait(200)
        wait_until(lambda: len(collector.worker_pids()) == collector.workers
                   and not old_workers & set(collector.worker_pids())
                   and collector.health(), RESTART_TIMEOUT,
                   "the old workers to exit and the new ones to answer")
    finally:
        stream = finish(thread, result, gates)

    accepted = set(stream.accepted)
    assert len(accepted) == len(stream.accepted) > 0
    print(f"\nreload behind nginx: {stream.statuses}")
    # Whatever a client could not get in was told so in JSON: 503 with Retry-After.
    assert set(stream.statuses) <= {202, 503}, stream.statuses
    wait_until(lambda: accepted <= stored_ids(database), STORE_TIMEOUT,
               f"the {len(accepted)} accepted events in PostgreSQL")
    assert stored_ids(database) <= set(stream.sent)


@pytest.mark.slow
def test_stop_and_start_behind_nginx(start_collector, database, start_nginx):
    collector = start_collector()
    nginx = start_nginx(collector.port)
    # 100 events before SIGTERM, 100 while gunicorn stops, 200 while it is down.
    gates = StreamGates(100, 200)
    thread, result = run_stream(nginx.url, STREAM_EVENTS, gates)
    try:
        gates.wait(100)
        collector.process.send_signal(signal.SIGTERM)
        gates.open(100)
        gates.wait(200)
        assert collector.process.wait(RESTART_TIMEOUT) == 0, collector.output()
    finally:
        stream = finish(thread, result, gates)
    print(f"\nstop and start behind nginx: {stream.statuses}")
    assert set(stream.statuses) <= {202, 503}, stream.statuses
    # Every event sent while gunicorn was down (all but those in flight at gate 200).
    assert stream.statuses.get(503, 0) >= STREAM_EVENTS - 200 - STREAM_CONCURRENCY

    # While gunicorn is down, nginx answers for it: JSON 503 with Retry-After.
    down = post_json(nginx.url + "/event", make_event())
    assert_json_error(down, 503, title="Service unavailable")
    assert down.headers.get("retry-after") == "5"
    assert_json_error(request(nginx.url + "/ready"), 503)
    assert_json_error(post_json(nginx.url + "/events", [make_event()]), 503)

    # Started again on the same port (and the same spool), nginx finds it again.
    start_collector(port=collector.port)
    later = [make_event() for _ in range(20)]
    answers = [post_json(nginx.url + "/event", event) for event in later]
    assert [a.status for a in answers] == [202] * len(later)

    accepted = set(stream.accepted) | {e["event_id"] for e in later}
    wait_until(lambda: accepted <= stored_ids(database), STORE_TIMEOUT,
               f"the {len(accepted)} accepted events in PostgreSQL")
    assert stored_ids(database) <= set(stream.sent) | {e["event_id"] for e in later}


# --- The deployment files agree with each other --------------------------------------

def nginx_size(value: str) -> int:
    """Return the bytes of an nginx size such as 64k or 5m."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[
        match.group(2).lower()]


def nginx_location(text: str, location: str) -> str:
    """Return the body of `location <location> { ... }` in conf/nginx.conf."""
    match = re.search(r"^\s*location\s+" + re.escape(location) + r"\s*\{([^}]*)\}", text,
                      re.MULTILINE)
    assert match, f"no `location {location}` in conf/nginx.conf"
    return match.group(1)


def directive(text: str, name: str) -> list[str]:
    """Return the values of every (uncommented) `name value;` directive in text."""
    return re.findall(r"^\s*" + re.escape(name) + r"\s+([^;#]*);", text, re.MULTILINE)


def test_nginx_conf_agrees_with_gunicorn_and_the_collector():
    text = (CONF / "nginx.conf").read_text()
    gunicorn = runpy.run_path(str(PROJECT_DIR / "gunicorn.conf.py"))
    defaults = Settings()

    upstream = re.search(r"upstream firehose\s*\{([^}]*)\}", text).group(1)
    assert directive(upstream, "keepalive")
    (upstream_idle,) = directive(upstream, "keepalive_timeout")
    # gunicorn must outlast nginx on an idle connection, or a POST meets a closed one.
    assert int(upstream_idle.rstrip("s")) < gunicorn["keepalive"]
    assert directive(text, "proxy_http_version") == ["1.1"]
    assert directive(text, "proxy_set_header Connection") == ['""']
    assert directive(text, "proxy_request_buffering") == ["on"]
    (next_upstream,) = directive(text, "proxy_next_upstream")
    assert next_upstream.split() == ["error", "timeout"]  # never non_idempotent

    event_limit = directive(nginx_location(text, "= /event"), "client_max_body_size")
    batch_limit = directive(nginx_location(text, "= /events"), "client_max_body_size")
    assert [nginx_size(v) for v in event_limit] == [defaults.max_event_bytes]
    assert [nginx_size(v) for v in batch_limit] == [defaults.max_batch_bytes]
    for limit in (defaults.max_event_bytes, defaults.max_batch_bytes):
        assert re.search(rf"^\s*\S+\s+{limit};", text, re.MULTILINE), limit  # the maps
    # A read timeout under gunicorn's worker timeout would answer 504 to slow successes.
    (read_timeout,) = directive(text, "proxy_read_timeout")
    assert int(read_timeout.rstrip("s")) >= gunicorn["timeout"]


def test_systemd_unit_agrees_with_gunicorn():
    unit = (CONF / "firehose.service").read_text()
    gunicorn = runpy.run_path(str(PROJECT_DIR / "gunicorn.conf.py"))
    values = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    assert values["KillMode"] == "mixed"
    assert values["KillSignal"] == "SIGTERM"
    assert int(values["TimeoutStopSec"]) > gunicorn["graceful_timeout"]
    assert values["ExecStart"].endswith("/.venv/bin/gunicorn -c gunicorn.conf.py")
    assert values["EnvironmentFile"] == "/etc/firehose/firehose.env"
    assert values["LimitNOFILE"] == "65536"
    # The spool is in the unit's StateDirectory, the one place it may write.
    spool = re.search(r"^Environment=COLLECTOR_SPOOL_DIR=(\S+)$", unit, re.MULTILINE).group(1)
    assert spool.startswith(f"/var/lib/{values['StateDirectory']}/")
    example = (CONF / "firehose.env.example").read_text()
    assert f"\nCOLLECTOR_SPOOL_DIR={spool}\n" in example


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (CONF / "firehose.service").read_text()
    # verify insists that ExecStart's binary exists: point it at this venv's gunicorn.
    copy = tmp_path / "firehose.service"
    copy.write_text(unit.replace("/opt/firehose/.venv/bin/gunicorn", str(GUNICORN)))
    assert copy.read_text() != unit, "ExecStart no longer names /opt/firehose/.venv/bin/gunicorn"
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    output = result.stdout + result.stderr
    # Warnings about the unit (an unknown key, a bad value) do not change the exit code.
    about_unit = [line for line in output.splitlines() if "firehose.service" in line]
    assert result.returncode == 0 and not about_unit, output


def comments_above(text: str, line_start: str) -> list[str]:
    """Return the comment lines (without '# ') just above the line starting line_start."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(line_start))
    comments = []
    for line in reversed(lines[:index]):
        if not line.startswith("# "):
            break
        comments.insert(0, line[2:])
    return comments


def test_env_example_lists_every_setting_with_its_default():
    text = (CONF / "firehose.env.example").read_text()
    assignments = re.findall(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE)
    by_name = {name: (commented == "#", value) for commented, name, value in assignments}
    assert len(by_name) == len(assignments), "a variable is listed twice"
    defaults = Settings()
    for setting in SETTINGS:
        assert setting.env in by_name, f"{setting.env} is missing from firehose.env.example"
        commented, value = by_name[setting.env]
        try:
            parsed = Settings.from_environ({setting.env: value}, require_database=False)
        except SettingsError as ex:
            pytest.fail(f"firehose.env.example: {ex}")
        if commented:  # a commented-out line shows the default
            assert getattr(parsed, setting.field) == getattr(defaults, setting.field), (
                f"{setting.env}={value} is not the default {setting.default!r}")
        comment = " ".join(comments_above(text, f"{'#' if commented else ''}{setting.env}="))
        assert " ".join(setting.help.split()).lower() in comment.lower(), (
            f"{setting.env}: its help text is not the comment above it")
    known = {s.env for s in SETTINGS} | set(GUNICORN_ENV_VARS)
    assert set(by_name) <= known, f"unknown variables: {set(by_name) - known}"
    assert set(GUNICORN_ENV_VARS) <= set(by_name)
