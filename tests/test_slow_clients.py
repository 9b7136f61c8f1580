"""Slow and idle clients straight to gunicorn: none of them stops it serving the others.

- A body that stops arriving is answered 408 after collector/body.py's BODY_READ_TIMEOUT
  and its connection closed; nothing of it is stored.
- 1,500 connections each dribbling a request head a byte a second (slowloris) are closed
  by gunicorn when its `keepalive` (15 s, gunicorn.conf.py) runs out, unanswered, and
  meanwhile other clients are answered within their usual latency.
- Clients that send requests and never read the answers hold only their own
  connections: the worker goes on serving the others.
"""

import fcntl
import runpy
import selectors
import socket
import struct
import termios
import threading
import time

import pytest

from collector.body import BODY_READ_TIMEOUT
from tests.body_server import (event_body, none_stored, post, post_chunked_head,  # noqa: F401
                               server)
from tests.client import make_event, post_json, request
from tests.fixtures.collector import PROJECT_DIR
from tests.polling import wait_until
from tests.rawhttp import RawConnection, request_head

# gunicorn.conf.py's keepalive: how long a request's head may take (15 s).
HEAD_TIMEOUT = runpy.run_path(str(PROJECT_DIR / "gunicorn.conf.py"))["keepalive"]
SLOW_CONNECTIONS = 1500
DRIBBLE_FOR = 20  # seconds the dribbling goes on at most
PROBES = 200  # requests that measure the latency of everyone else, before and during
# The probes' median latency while slow clients hang on stays under MEDIAN_FACTOR times
# the median before them (or under MEDIAN_FLOOR), and none waits anything like a timeout.
# Medians, because this 2-core machine is shared: its tail moves with other processes.
MEDIAN_FACTOR = 5
MEDIAN_FLOOR = 0.05
SLOWEST_PROBE = 2.0
PROBE_INTERVAL = 0.05  # seconds between probes during the dribble
PROBE_UNTIL = HEAD_TIMEOUT - 2  # seconds into the dribble: all 1,500 still open
STUCK_CLIENTS = 20
# Pipelined per stuck client: /openapi.json answers (13 KB each) that overflow both its
# receive buffer and the server's send buffer (at most 4 MiB, net.ipv4.tcp_wmem).
STUCK_REQUESTS = 1000
SMALL_BUFFER = 4096  # the stuck clients' receive buffer, so they fill it soon
STUCK_WAIT = 20


def probe_latencies(url: str, count: int, until: float | None = None) -> list[float]:
    """POST up to `count` events one after the other; return the latencies.

    With `until` (a time.monotonic() value), one every PROBE_INTERVAL until then instead,
    so that the probes span a whole period.
    """
    latencies = []
    pace = threading.Event()  # never set: its wait() paces the probes
    for _ in range(count):
        if until is not None and time.monotonic() >= until:
            break
        answer = post_json(url + "/event", make_event())
        assert answer.status == 202, answer
        latencies.append(answer.latency)
        if until is not None:
            pace.wait(PROBE_INTERVAL)
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def assert_usual_latency(before: list[float], during: list[float], what: str) -> None:
    """Print the probes' latencies and check that `during` is as usual as `before`."""
    print(f"\n{what}: p50/p99 before {percentile(before, 50) * 1000:.1f}/"
          f"{percentile(before, 99) * 1000:.1f} ms, during {percentile(during, 50) * 1000:.1f}/"
          f"{percentile(during, 99) * 1000:.1f} ms, slowest {max(during) * 1000:.0f} ms")
    assert percentile(during, 50) < max(MEDIAN_FLOOR, MEDIAN_FACTOR * percentile(before, 50))
    assert max(during) < SLOWEST_PROBE


@pytest.mark.slow
def test_a_stalled_body_is_408_and_closed(server):
    collector, _ = server
    length_event, length_body = event_body()
    chunked_event, chunked_body = event_body()
    started = time.monotonic()
    with RawConnection(collector.port, timeout=BODY_READ_TIMEOUT + 10) as by_length, \
            RawConnection(collector.port, timeout=BODY_READ_TIMEOUT + 10) as by_chunks:
        by_length.send(post("/event", length_body)[:-10])  # all but the last 10 bytes
        by_chunks.send(post_chunked_head("/event")
                       + b"%x\r\n%s\r\n" % (len(chunked_body), chunked_body))  # no last chunk
        answers = [by_length.read_final(), by_chunks.read_final()]
        waited = time.monotonic() - started
        assert by_length.closed_by_server() and by_chunks.closed_by_server()
    for answer in answers:
        assert answer.status == 408, answer
        assert answer.json()["limit"] == "body_timeout"
    assert BODY_READ_TIMEOUT <= waited < BODY_READ_TIMEOUT + 5
    none_stored(server, length_event, chunked_event)


class Dribbler:
    """Many connections, each sent one more byte of a request head every second."""

    HEAD = request_head("GET", "/health", {"X-Pad": "x" * 64})[:-2]  # never ends

    def __init__(self, port: int, count: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5)
                      for _ in range(count)]
        self.opened = time.monotonic()
        self.closed_after: dict[socket.socket, float] = {}  # seconds after opening
        self.answered = 0  # connections that got any bytes back
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dribbler", daemon=True)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        sent = 0
        deadline = self.opened + DRIBBLE_FOR
        while not self.stop.is_set() and time.monotonic() < deadline and sent < len(self.HEAD):
            for sock in self.socks:
                if sock not in self.closed_after:
                    try:
                        sock.send(self.HEAD[sent:sent + 1])
                    except OSError:
                        self._closed(selector, sock)
            sent += 1
            next_byte = self.opened + sent
            while time.monotonic() < next_byte and not self.stop.is_set():
                for key, _ in selector.select(max(0.0, next_byte - time.monotonic())):
                    self._closed(selector, key.fileobj)
            if len(self.closed_after) == len(self.socks):
                break
        selector.close()

    def _closed(self, selector, sock) -> None:
        try:
            if sock.recv(4096):
                self.answered += 1
        except OSError:
            pass
        self.closed_after[sock] = time.monotonic() - self.opened
        selector.unregister(sock)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(DRIBBLE_FOR + 5)
        for sock in self.socks:
            sock.close()


@pytest.mark.slow
def test_slowloris_heads_do_not_stop_the_service(server):
    collector, _ = server
    before = probe_latencies(collector.url, PROBES)
    dribbler = Dribbler(collector.port, SLOW_CONNECTIONS)
    try:
        dribbler.thread.start()
        during = probe_latencies(collector.url, PROBES * 2, dribbler.opened + PROBE_UNTIL)
        during_ended = time.monotonic() - dribbler.opened
        still_open = SLOW_CONNECTIONS - len(dribbler.closed_after)
        dribbler.thread.join(DRIBBLE_FOR + 5)
    finally:
        dribbler.close()
    closed = sorted(dribbler.closed_after.values())
    print(f"\nslowloris: {len(during)} probes until {during_ended:.1f} s, {still_open} "
          f"connections open then; {len(closed)} closed by gunicorn, "
          f"after {closed[0] if closed else 0:.1f}-{closed[-1] if closed else 0:.1f} s")
    assert PROBE_UNTIL <= during_ended < HEAD_TIMEOUT and still_open == SLOW_CONNECTIONS
    assert_usual_latency(before, during, "slowloris")
    assert len(closed) == SLOW_CONNECTIONS, "gunicorn kept some dribbling connections open"
    assert HEAD_TIMEOUT - 1 <= closed[0] and closed[-1] < DRIBBLE_FOR
    assert dribbler.answered == 0  # closed without an answer: no request was ever complete
    assert request(collector.url + "/health").status == 200


def stuck_client(port: int) -> socket.socket:
    """Connect with a small receive buffer, pipeline many requests, never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    requests = request_head("GET", "/openapi.json", {}) * STUCK_REQUESTS
    try:
        sock.send(requests)  # what the buffers take; the server stops reading once stuck
    except BlockingIOError:
        pass
    return sock


def test_clients_that_never_read_do_not_hold_the_worker(server):
    collector, _ = server
    before = probe_latencies(collector.url, PROBES)
    stuck = [stuck_client(collector.port) for _ in range(STUCK_CLIENTS)]
    try:
        # The worker writes answers until each client's receive buffer and its own send
        # buffer are full; then its greenlet for that connection waits to write the next.
        ports = {sock.getsockname()[1] for sock in stuck}
        last: list[dict] = [{}]

        def all_stuck() -> bool:
            queues, last[0] = last[0], server_send_queues(collector.port, ports)
            return (len(last[0]) == len(ports) and queues == last[0]
                    and all(unread_bytes(sock) >= SMALL_BUFFER for sock in stuck))

        wait_until(all_stuck, STUCK_WAIT, "every stuck client's answers to stop moving")
        during = probe_latencies(collector.url, PROBES)
        queued = [unread_bytes(sock) for sock in stuck]
        held = sum(server_send_queues(collector.port, ports).values())
    finally:
        for sock in stuck:
            sock.close()
    print(f"\nnever-reading clients: {min(queued)}-{max(queued)} bytes unread each, "
          f"{held} bytes of answers waiting in the server's send buffers")
    assert held > 0
    assert_usual_latency(before, during, "never-reading clients")
    assert request(collector.url + "/health").status == 200


def server_send_queues(port: int, client_ports: set[int]) -> dict[int, int]:
    """Return the bytes waiting in the server's send queue, per connection to the clients."""
    queues = {}
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, tx_rx = fields[1], fields[2], fields[4]
            if int(local.split(":")[1], 16) == port:
                client = int(remote.split(":")[1], 16)
                if client in client_ports:
                    queues[client] = int(tx_rx.split(":")[0], 16)
    return queues


def unread_bytes(sock: socket.socket) -> int:
    """Return how many bytes of answers wait, unread, in this client's receive buffer."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
