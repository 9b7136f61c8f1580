"""Pieces with no server: settings, backoff schedule, spool records, validation's prefilter,
the worker's coalesced writes, Date header, turn order and settings."""

import random

import gevent
import gunicorn.config
import msgspec
import pytest

from collector import validation, worker
from collector.settings import SETTINGS, Settings, SettingsError
from collector.spool import Spool, encode_record, read_records
from storage.backoff import Backoff


@pytest.mark.parametrize("env,message", [
    ({"COLLECTOR_BATCH_SIZE": "ten"}, "COLLECTOR_BATCH_SIZE='ten': expected an integer >= 1"),
    ({"COLLECTOR_BATCH_SIZE": "0"}, "COLLECTOR_BATCH_SIZE='0': expected an integer >= 1"),
    ({"COLLECTOR_BATCH_SIZE": "true"}, "expected an integer"),
    ({"COLLECTOR_FLUSH_INTERVAL": "nan"}, "COLLECTOR_FLUSH_INTERVAL='nan': expected a number"),
    ({"COLLECTOR_SPOOL_FSYNC": "sometimes"}, "expected one of never, interval, always"),
    ({"COLLECTOR_PARTITION_INTERVAL": "week"}, "expected one of month, day"),
    ({"COLLECTOR_RETENTION_DAYS": "-1"}, "COLLECTOR_RETENTION_DAYS='-1': expected an integer >= 0"),
    ({"COLLECTOR_READ_POOL_SIZE": "0"}, "expected an integer >= 1"),
    ({"COLLECTOR_CORS_ORIGINS": "https://shop.example.com/"},
     "COLLECTOR_CORS_ORIGINS='https://shop.example.com/': expected `*` or origins like"),
    ({"COLLECTOR_API_KEYS": "s3cret key"}, "COLLECTOR_API_KEYS='***': expected keys of"),
    ({}, "DATABASE_URL is not set"),
])
def test_bad_settings_name_the_variable(env, message):
    environ = {"DATABASE_URL": "postgresql://db/x", **env} if env else {}
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(environ)
    assert message in str(caught.value)


def test_settings_parse_and_hide_the_password():
    settings = Settings.from_environ({"DATABASE_URL": "postgresql://u:s3cret@db:5432/x",
                                      "COLLECTOR_BATCH_SIZE": "500",
                                      "COLLECTOR_SPOOL_FSYNC": "ALWAYS"})
    assert settings.batch_size == 500 and settings.spool_fsync == "always"
    assert settings.rollup_keys == () and settings.retention_days == 0
    keys = Settings.from_environ({"DATABASE_URL": "postgresql://db/x",
                                  "COLLECTOR_ROLLUP_KEYS": " page, country ,,"})
    assert keys.rollup_keys == ("page", "country")
    assert "s3cret" not in repr(settings) and "u:***@db" in repr(settings)


def test_the_read_database_defaults_to_empty_and_hides_its_password():
    assert Settings.from_environ({"DATABASE_URL": "postgresql://db/x"}).read_database_url == ""
    settings = Settings.from_environ({
        "DATABASE_URL": "postgresql://u:s3cret@db/x",
        "COLLECTOR_READ_DATABASE_URL": "postgresql://r:s3cret2@standby1:5432,standby2:5432/x"})
    assert settings.read_database_url.endswith("@standby1:5432,standby2:5432/x")
    assert "s3cret" not in repr(settings)
    assert "read_database_url='postgresql://r:***@standby1:5432,standby2:5432/x'" in repr(settings)


def test_list_settings_parse_and_keys_stay_hidden():
    settings = Settings.from_environ({"DATABASE_URL": "postgresql://db/x",
                                      "COLLECTOR_CORS_ORIGINS": " https://a.example, *,",
                                      "COLLECTOR_API_KEYS": "k3y-one,k3y-two"})
    assert settings.cors_origins == ("https://a.example", "*")
    assert settings.api_keys == ("k3y-one", "k3y-two")
    assert "k3y" not in repr(settings) and "api_keys=('***', '***')" in repr(settings)
    assert Settings().cors_origins == () and Settings().api_keys == ()  # both off by default


def test_every_setting_has_a_field_and_help():
    fields = set(Settings.__dataclass_fields__)
    assert {s.field for s in SETTINGS} == fields
    assert all(s.help and s.env.isupper() for s in SETTINGS)


def test_backoff_is_capped_full_jitter():
    backoff = Backoff(max_delay=2.0, initial_delay=0.1, rng=random.Random(7))
    delays = [backoff.next_delay(now=100.0 + i) for i in range(2000)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert max(delays[:3]) <= 0.4  # 0.1, 0.2, 0.4 ceilings
    assert max(delays[100:]) > 1.5  # capped at 2.0 but jittered up to it
    assert backoff.reset(now=2200.0) == pytest.approx(2100.0)
    assert backoff.next_delay(now=3000.0) <= 0.1


def test_records_survive_a_corrupt_and_a_torn_record(tmp_path):
    payloads = [msgspec.msgpack.encode({"n": i}) for i in range(6)]
    records = [encode_record(p) for p in payloads]
    corrupt = bytearray(records[2])
    corrupt[-1] ^= 0x01
    path = tmp_path / "00000001.seg"
    path.write_bytes(records[0] + records[1] + bytes(corrupt) + records[3] + records[4]
                     + records[5][:-3])
    found, end, skipped = read_records(path, 0, 100)
    assert found == [payloads[0], payloads[1], payloads[3], payloads[4]]
    assert skipped > 0 and end == path.stat().st_size


def test_spool_reads_back_in_order_and_frees_released_segments(tmp_path):
    spool = Spool(str(tmp_path), segment_bytes=4096, max_bytes=1 << 20, fsync="never")
    spool.open()
    try:
        payloads = [b"x" * 100 + str(i).encode() for i in range(100)]
        positions = [spool.append([p])[0] for p in payloads]
        assert len({p.segment for p in positions}) > 1  # rotated at 4 KiB
        records, end = spool.read(positions[0], 1000)
        assert [r.payload for r in records] == payloads and end == spool.end
        used = spool.bytes
        for segment in sorted({p.segment for p in positions})[:-1]:
            spool.release(segment, sum(1 for p in positions if p.segment == segment))
        assert spool.bytes < used
    finally:
        spool.close()


@pytest.mark.parametrize("metadata, risky", [
    (b'{"x": 1e400}', True), (b'{"x": -2.5E+308}', True), (b'{"x": 1e-999}', True),
    (b'{"x": 1234567890123456789}', True), (b'{"id": "9999999999999999999"}', True),
    (b'{"x": 1e99, "w": 1920}', False), (b'{"x": 123456789012345678}', False),
    (b'{"page": "/e/123", "price": 49.99}', False),
])
def test_numbers_past_a_double_are_found_before_decoding(metadata, risky):
    assert validation._may_overflow(metadata) is risky


class RecordingSocket:
    """A socket stand-in that records what is sent and which other calls are made."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def fileno(self) -> int:
        self.sent.append(b"<fileno>")
        return 99


def test_a_response_head_goes_out_with_its_body_in_order():
    sock = RecordingSocket()
    coalescing = worker.CoalescingSocket(sock)
    coalescing.sendall(b"HTTP/1.1 202 Accepted\r\n\r\n")
    assert sock.sent == []  # held for the body
    coalescing.sendall(b'{"status": "accepted"}')
    coalescing.sendall(b"more")
    coalescing.flush()
    assert sock.sent == [b'HTTP/1.1 202 Accepted\r\n\r\n{"status": "accepted"}', b"more"]


def test_a_held_head_is_sent_before_any_other_use_of_the_socket():
    sock = RecordingSocket()
    coalescing = worker.CoalescingSocket(sock)
    coalescing.sendall(b"head")
    assert coalescing.fileno() == 99  # sendfile writes through the descriptor
    coalescing.flush()
    assert sock.sent == [b"head", b"<fileno>"]
    alone = RecordingSocket()
    headers_only = worker.CoalescingSocket(alone)
    headers_only.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    headers_only.flush()
    assert alone.sent == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_the_date_header_is_formatted_once_a_second():
    calls = []

    def format_date(timestamp=None):
        calls.append(timestamp)
        return f"date {timestamp}"

    date = worker.DateHeader(format_date)
    dates = [date() for _ in range(5)]
    # Formatted per call, it would be 5 times; at most twice if a second ended meanwhile.
    assert len(calls) <= 2 and len(set(dates)) == len(calls)
    assert isinstance(calls[0], int)
    assert date(0) == "date 0"  # an explicit time is formatted as asked


def test_requests_woken_in_one_turn_go_oldest_answered_first():
    order = worker.AnswerOrder()
    answered_at = [5.0, 1.0, 4.0, 0.0, 3.0, 2.0]  # woken in this order, within one turn
    released = []

    def request(when):
        order.wait(when)
        released.append(when)

    greenlets = [gevent.spawn(request, when) for when in answered_at]
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert released == sorted(answered_at)


def test_a_settled_config_reads_each_setting_once():
    cfg = gunicorn.config.Config()
    cfg.set("keepalive", 7)
    settled = worker.SettledConfig(cfg)
    assert settled.keepalive == 7 and settled.forwarded_allow_ips == cfg.forwarded_allow_ips
    cfg.set("keepalive", 9)  # a worker's settings never change; were they read again, 9
    assert settled.keepalive == 7
    assert settled.forwarded_allow_networks() == cfg.forwarded_allow_networks()
