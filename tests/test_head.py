"""HEAD /health and HEAD /ready answer as GET does, status included, without a body."""

import falcon.testing
import pytest

from collector.app import create_app
from collector.settings import Settings
from tests.body_server import nginx, port, server  # noqa: F401
from tests.rawhttp import RawConnection, request_head


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_head_answers_like_get_without_a_body(server, port, path):
    with RawConnection(port) as conn:
        # HEAD, then GET on the same connection: had HEAD carried a body, the GET's
        # answer would not parse.
        conn.send(request_head("HEAD", path, {}) + request_head("GET", path, {}))
        head = conn.read_final(head=True)
        get = conn.read_final()
    assert head.status == get.status == 200, (head, get)
    assert head.body == b""
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert int(head.headers["content-length"]) > 0
    assert get.json()


def test_head_ready_is_503_when_not_ready(tmp_path):
    # A pipeline that was never started is not ready; the database is never reached.
    app = create_app(Settings(database_url="postgresql://unused/none", spool_dir=str(tmp_path)))
    client = falcon.testing.TestClient(app)
    get = client.simulate_get("/ready")
    head = client.simulate_head("/ready")
    assert get.status_code == head.status_code == 503
    assert get.json["problems"] == ["worker is not running"]
    assert head.content == b""
    assert client.simulate_head("/health").status_code == 200
