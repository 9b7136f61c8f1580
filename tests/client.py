"""A small HTTP client for the tests: single requests, and bounded concurrent streams of events."""

import concurrent.futures
import http.client
import json
import random
import threading
import time
import urllib.parse
import uuid
from typing import NamedTuple

REQUEST_TIMEOUT = 30


class Answer(NamedTuple):
    """One response: status, parsed JSON body (or text), latency in seconds, headers."""

    status: int
    body: object
    latency: float
    headers: dict


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT)


def connection_from(url: str, source: str) -> http.client.HTTPConnection:
    """Open a connection to url's host from the local address source (e.g. 127.0.0.2)."""
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT,
                                      source_address=(source, 0))


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None) -> Answer:
    """Send one request (on `conn` if given, else a new connection) and return the answer."""
    own = conn is None
    conn = conn or _connection(url)
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        latency = time.monotonic() - started
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Answer(resp.status, parsed, latency, {k.lower(): v for k, v in resp.getheaders()})
    finally:
        if own:
            conn.close()


def get_json(url: str) -> tuple[int, object]:
    """GET a URL and return (status, JSON body)."""
    answer = request(url)
    return answer.status, answer.body


def post_json(url: str, document: object, headers: dict | None = None,
              conn: http.client.HTTPConnection | None = None) -> Answer:
    """POST a JSON document."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return request(url, "POST", body, {"Content-Type": "application/json", **(headers or {})},
                   conn)


def make_event(user_id: int | None = None, **extra) -> dict:
    """Return a valid event with a client-chosen event_id."""
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": user_id if user_id is not None else random.randrange(1, 1_000_000),
        "timestamp": "2024-05-01T12:00:00Z",
        "metadata": {"page": "/home", "n": random.randrange(1000)},
    }
    event.update(extra)
    return event


class StreamResult(NamedTuple):
    """What a stream of POSTs got back."""

    sent: list[str]  # event_ids sent
    accepted: list[str]  # event_ids answered 202
    statuses: dict[int, int]  # status -> count (0: connection error)
    latencies: list[float]  # of the 202s
    refused: list[Answer]  # every answer other than 202 (connection errors have none)

    def percentile(self, p: float) -> float:
        """Return the p-th percentile latency of the 202s, in seconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


def post_stream(url: str, count: int, concurrency: int, deadline_s: float = 120,
                stop: threading.Event | None = None, on_sent=None,
                factory=make_event) -> StreamResult:
    """POST `count` events over `concurrency` keep-alive connections; bounded in count and time.

    `stop` ends the stream early; `on_sent(n)` is called with the running count of answers;
    `factory()` makes each event.
    """
    events = [factory() for _ in range(count)]
    lock = threading.Lock()
    sent, accepted, latencies, refused = [], [], [], []
    statuses: dict[int, int] = {}
    next_index = iter(range(count))
    deadline = time.monotonic() + deadline_s

    def worker() -> None:
        conn = None
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            event = events[index]
            conn = conn or _connection(url + "/event")
            try:
                answer = post_json(url + "/event", event, conn=conn)
                status = answer.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                status, answer = 0, None
            with lock:
                sent.append(event["event_id"])
                statuses[status] = statuses.get(status, 0) + 1
                if status == 202:
                    accepted.append(answer.body["event_id"])
                    latencies.append(answer.latency)
                elif answer is not None:
                    refused.append(answer)
                if on_sent:
                    on_sent(len(sent))
        if conn:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return StreamResult(sent, accepted, statuses, latencies, refused)
