"""HTTP/1.1 over a raw socket, for the tests of bodies as clients send them.

http.client cannot send what these tests need to send: a body in chunks of a chosen
size, a body that stops before its Content-Length, several requests in one write,
headers a smuggler would send. `RawConnection` writes bytes as given and reads the
answers back one at a time.
"""

import json
import socket
import time
from typing import NamedTuple

TIMEOUT = 10  # seconds any one read may wait


class RawResponse(NamedTuple):
    """One answer read off the socket."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class ConnectionClosed(Exception):
    """The server closed the connection before (or instead of) a whole answer."""


def request_head(method: str, path: str, headers: list[tuple[str, str]] | dict,
                 version: str = "HTTP/1.1") -> bytes:
    """Return a request line and header block, with Host first, exactly as given."""
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(body: bytes, size: int, trailers: dict[str, str] | None = None) -> bytes:
    """Return `body` in chunked transfer coding, `size` bytes a chunk, then the last chunk."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    tail = "".join(f"{name}: {value}\r\n" for name, value in (trailers or {}).items())
    return out + b"0\r\n" + tail.encode("latin-1") + b"\r\n"


class RawConnection:
    """One client connection: send bytes, read responses, close (or half-close)."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Write bytes as they are."""
        self.sock.sendall(data)

    def send_pieces(self, data: bytes, size: int) -> None:
        """Write bytes `size` at a time, each in a write of its own (TCP_NODELAY)."""
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), size):
            self.sock.sendall(data[i:i + size])

    def shut_write(self) -> None:
        """Half-close: the server reads the end of the stream, the client can still read."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionClosed(f"closed by the server; unread: {self._buf[:200]!r}")
        self._buf += data

    def read_until(self, marker: bytes) -> bytes:
        """Return the bytes up to and including `marker`."""
        while marker not in self._buf:
            self._fill()
        index = self._buf.index(marker) + len(marker)
        data, self._buf = self._buf[:index], self._buf[index:]
        return data

    def read_response(self, head: bool = False) -> RawResponse:
        """Read one answer (1xx included) whose body has a Content-Length; none to HEAD."""
        block = self.read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = block[:-4].split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        length = 0 if head or status < 200 else int(headers.get("content-length", "0"))
        while len(self._buf) < length:
            self._fill()
        body, self._buf = self._buf[:length], self._buf[length:]
        return RawResponse(status, headers, body)

    def read_final(self, head: bool = False) -> RawResponse:
        """Read answers until one is not 1xx (a 100 Continue) and return it."""
        while True:
            response = self.read_response(head)
            if response.status >= 200:
                return response

    def closed_by_server(self, timeout: float = TIMEOUT) -> bool:
        """Tell whether the server closes the connection (reads nothing more) within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
            self._buf += data
        return False

    @property
    def unread(self) -> bytes:
        """Bytes received and not yet returned by a read."""
        return self._buf
