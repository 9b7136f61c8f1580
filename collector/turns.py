"""Make each request of a gevent worker wait its turn behind the others.

A gevent greenlet yields only when a socket would block. On a fast client (loopback,
a load balancer's keep-alive connection), the next request is often already in the
socket when a response is written, so one connection's greenlet can serve request
after request without ever yielding, while the worker's other connections wait:
measured here, p50 under 1 ms beside p99 near a second (pitfall 11). Waiting for the
next turn of the event loop before each request serves connections in rotation.
"""

import gevent

# gevent.sleep(0) may resume before the loop polls sockets again (see its docs); any
# positive delay resumes only on the next iteration, after the other ready sockets.
TURN = 1e-6


class TakeTurns:
    """Falcon middleware: yield to the event loop once before each request is handled."""

    def process_request(self, req, resp) -> None:
        gevent.sleep(TURN)
