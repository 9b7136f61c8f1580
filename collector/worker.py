"""gunicorn's gevent worker, adjusted for many fast keep-alive connections.

Six changes, each measured with `make bench` (docs/performance.md):

- Connections take turns. A greenlet yields only when a socket would block. A fast
  client (loopback, nginx's keep-alive pool) often has its next request in the socket
  before the worker looks for it, so one connection could be served again and again
  while the others waited: p50 under 1 ms beside p99 near a second. A
  request that arrives without the loop having turned since its connection's last
  answer now waits one turn; one that had to wait for its bytes has had its turn.
- Connections keep their place in the turn (AnswerOrder). At 1,000 connections a
  turn serves each of a worker's ~500 connections once and lasts 130-170 ms; libev
  ran each turn's requests in an order that changed from turn to turn, so a request
  waited from nothing to two turns (p99 twice p50). They now go in the order their
  connections were last answered, and each waits one turn.
- New connections are accepted many at a time. gunicorn's worker accepts one per turn
  when there are several workers, so that workers sharing one listening socket share
  its connections. With `reuse_port` each worker listens on a socket of its own, and
  one accept per ~150 ms turn left hundreds of connections queued for tens of seconds
  (wrk's "timeout" errors at 1,000 connections).
- Each response's head and body go out in one write: gunicorn writes them with two
  `sendall`s, each a syscall and a wakeup of the reader.
- The Date header is formatted once a second, not per response (email.utils took 3-4%
  of a worker's CPU at 6k requests/s).
- Each setting is read from gunicorn's Config once (SettledConfig), not a dozen times
  per request through its `__getattr__`.

The master imports this module to find the worker class, before gevent's patching:
it imports nothing but gevent and gunicorn, as gunicorn's own gevent worker does
(docs/gevent-and-psycopg2.md).
"""

import time

import gevent
from gevent.hub import Waiter
from gevent.server import StreamServer
from gunicorn import util as gunicorn_util
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

ACCEPT_BATCH = 100  # connections accepted per turn of the loop (gevent's own default)
# gevent.sleep(0) may resume before the loop polls sockets again (see its docs); any
# positive delay resumes only on the next turn, after the other ready sockets.
TURN = 1e-6


class CoalescingSocket:
    """A client socket whose first `sendall` waits to go out with the next one.

    Any other use of the socket (`fileno` for sendfile, `shutdown`, `close`, ...) sends
    the held bytes first, so the bytes on the wire keep their order.
    """

    def __init__(self, sock) -> None:
        self._sock = sock
        self._held = None  # the head, until the body (or the end of the request)
        self._first = True

    def sendall(self, data) -> None:
        """Send `data`, holding the request's first write back to join the second."""
        if self._first:
            self._first = False
            self._held = bytes(data)
            return
        if self._held is not None:
            data, self._held = self._held + bytes(data), None
        self._sock.sendall(data)

    def flush(self) -> None:
        """Send what is held back, if anything."""
        if self._held is not None:
            held, self._held = self._held, None
            self._sock.sendall(held)

    def __getattr__(self, name):
        self.flush()
        return getattr(self._sock, name)


class AnswerOrder:
    """Lets the requests woken in one turn of the loop go oldest-answered connection first.

    libev runs one turn's callbacks last-ready first (ev_invoke_pending takes its pending
    array from the end), and the order in which requests become ready follows the
    client's own scheduling, so a connection's place changed from turn to turn: served
    early in one turn and late in the next, a request waited between nothing and two
    turns, and p99 was twice the median. Here each request woken in a turn waits for
    the turn's end, and they go on in the order their connections were last answered:
    every connection keeps its place, and each request waits one turn.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[float, int, Waiter]] = []

    def wait(self, answered_at: float) -> None:
        """Wait for the end of this turn and for the connections answered before this one."""
        waiter = Waiter()
        if not self._waiting:
            gevent.get_hub().loop.run_callback(self._release)
        self._waiting.append((answered_at, id(waiter), waiter))
        waiter.get()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        waiting.sort()
        for _, _, waiter in waiting:
            waiter.switch(None)  # runs the request until it waits again, then returns here


class SettledConfig:
    """gunicorn's Config as one worker sees it: each setting read once, then kept.

    Parsing a request and writing its response read a dozen settings, each through
    Config.__getattr__ and the setting's get() (3% of a worker's CPU at 6k requests/s).
    A worker's settings never change (a reload starts new workers).
    """

    def __init__(self, cfg) -> None:
        self.__dict__["_cfg"] = cfg

    def __getattr__(self, name):
        value = getattr(self._cfg, name)
        self.__dict__[name] = value
        return value


class OwnSocketServer(StreamServer):
    """gevent's server for a listening socket that only this worker accepts from."""

    @property
    def max_accept(self) -> int:
        return ACCEPT_BATCH

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        pass  # gunicorn's 1 is for a socket that several workers share


class DateHeader:
    """gunicorn's `http_date`, formatting the current second once instead of per response."""

    def __init__(self, format_date) -> None:
        self._format = format_date
        self._second: int | None = None
        self._value = ""

    def __call__(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return self._format(timestamp)
        second = int(time.time())
        if second != self._second:
            self._value, self._second = self._format(second), second
        return self._value


class FirehoseWorker(GeventWorker):
    """gunicorn's gevent worker: connections take turns, many accepts, one write each."""

    def init_process(self) -> None:
        self.cfg = SettledConfig(self.cfg)
        # connection -> (the loop turn its last answer was sent in, time.monotonic() then)
        self._last_answer = {}
        self._answer_order = AnswerOrder()
        # gunicorn's Response calls util.http_date() for every Date header (gunicorn 27);
        # this process is the worker alone, so the change stays in it.
        gunicorn_util.http_date = DateHeader(gunicorn_util.http_date)
        super().init_process()

    def run(self) -> None:
        """Serve until told to stop, as gunicorn's worker does, with OwnSocketServer."""
        if self.cfg.reuse_port:
            # GeventWorker.run builds its servers from this module-level name (gunicorn
            # 27); this process is the worker alone, so the change stays in it.
            ggevent.StreamServer = OwnSocketServer
        super().run()

    def handle(self, listener, client, addr) -> None:
        """Serve one connection's requests."""
        try:
            super().handle(listener, client, addr)
        finally:
            self._last_answer.pop(client, None)

    def handle_request(self, listener_name, req, sock, addr):
        """Serve one request in its turn, its head and body in one write."""
        loop = gevent.get_hub().loop
        turn, answered_at = self._last_answer.get(sock, (None, 0.0))
        if turn == _turn(loop):
            gevent.sleep(TURN)
        self._answer_order.wait(answered_at)
        coalescing = CoalescingSocket(sock)
        try:
            return super().handle_request(listener_name, req, coalescing, addr)
        finally:
            try:
                coalescing.flush()
            finally:
                self._last_answer[sock] = (_turn(loop), time.monotonic())


def _turn(loop) -> int | None:
    """Return the number of the event loop's current turn (None if the loop can't tell)."""
    # libev's loops count their turns; gevent's libuv loop does not, and there every
    # request waits a turn.
    return getattr(loop, "iteration", None)
