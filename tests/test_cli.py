"""The `firehose` command line, run as the installed script against the suite's PostgreSQL."""

import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import uuid

import msgspec
import pytest

from collector.spool import Spool, encode_record
from collector.validation import Event
from storage import database as storage_database
from storage import partitions
from storage.writer import BatchWriter, WriteResult

FIREHOSE = pathlib.Path(sys.executable).with_name("firehose")
PROJECT = pathlib.Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60  # seconds one command may take
# Variables of the runner's environment that would change what the commands see.
CLEARED = ("HOST", "PORT", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")
POISON = "ALTER TABLE events ADD CONSTRAINT {0} CHECK (NOT metadata @> '{{\"{1}\": true}}')"


class Firehose:
    """Runs the installed `firehose` script with a deployment's environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.stderr = ""  # of the last command

    def __call__(self, *args: str, expect: int = 0, **env: str) -> str:
        """Run one command; check its exit status and return its standard output."""
        assert FIREHOSE.exists(), f"{FIREHOSE} missing: reinstall the package (make)"
        done = subprocess.run([str(FIREHOSE), *args], env={**self.env, **env}, cwd=PROJECT,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
        self.stderr = done.stderr
        assert done.returncode == expect, \
            f"firehose {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout


@pytest.fixture
def firehose(database, tmp_path) -> Firehose:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COLLECTOR_") and k not in CLEARED}
    env.update(DATABASE_URL=database.url, COLLECTOR_SPOOL_DIR=str(tmp_path / "spool"),
               COLLECTOR_SPOOL_MAX_BYTES="1048576")
    return Firehose(env)


@pytest.fixture
def writer(database):
    writer = BatchWriter(lambda: storage_database.connect(database.url, 10, 5))
    writer.prepare()
    yield writer
    writer.close()


def rows(count: int, poison: set[int] = frozenset(), key: str = "poison") -> list[tuple]:
    """Rows as the flusher hands them to the writer; those of `poison` carry `key`: true."""
    return [(str(uuid.uuid4()), index, f"2024-05-01T12:00:{index:02d}+00:00",
             json.dumps({"index": index, key: index in poison, "text": "é ☃"}),
             1714564800.5 + index) for index in range(count)]


def lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def columns(line: str) -> list[str]:
    """Split a line of a table the CLI prints (columns are two or more spaces apart)."""
    return re.split(r"\s{2,}", line.strip())


def test_check_passes_and_creates_a_missing_schema(firehose, database):
    output = firehose("check", WEB_CONCURRENCY="2")
    checks = output.splitlines()
    assert [c.split(":")[0] for c in checks] == [
        "ok   settings", "ok   database", "ok   schema", "ok   writes", "ok   spool",
        "ok   disk", "ok   reads"], output
    assert "2 workers" in checks[0] and "binds 127.0.0.1:8000" in checks[0]  # gunicorn.conf.py
    assert "now created" in checks[2]
    assert "2 workers × 1.0 MiB" in checks[5]
    assert "schema: present" in firehose("check")
    # The write probe was rolled back.
    assert database.count("events") == 0 and database.count("dead_letters") == 0
    assert database.query("SELECT count(*) FROM event_counts")[0][0] == 0


def test_check_fails_and_warns_with_the_reason(firehose, database, tmp_path):
    firehose("check")  # the schema
    open_reads = firehose("check", HOST="0.0.0.0")  # a warning is not a failure
    assert lines(open_reads, "warn reads:") and "0.0.0.0:8000" in open_reads
    bound = firehose("check", GUNICORN_CMD_ARGS="--bind 192.0.2.1:9000 --workers 3")
    assert "3 workers" in bound and "warn reads:" in bound and "192.0.2.1:9000" in bound
    keyed = firehose("check", "--bind", "0.0.0.0:8000", COLLECTOR_READ_KEYS="rk_1")
    assert lines(keyed, "ok   reads: need one of 1 read keys")

    assert lines(firehose("check", expect=1, COLLECTOR_BATCH_SIZE="ten"),
                 "FAIL settings: COLLECTOR_BATCH_SIZE='ten': expected an integer >= 1")
    disk = firehose("check", expect=1, WEB_CONCURRENCY="3",
                    COLLECTOR_SPOOL_MAX_BYTES=str(10**17))
    assert lines(disk, "FAIL disk:") and "3 workers ×" in disk
    (tmp_path / "a-file").write_text("")
    spool = firehose("check", expect=1, COLLECTOR_SPOOL_DIR=str(tmp_path / "a-file" / "spool"))
    assert lines(spool, "FAIL spool:") and "not writable" in spool
    url = database.url.replace(f":{database.server.port}/", ":1/")
    assert url != database.url
    assert lines(firehose("check", expect=1, DATABASE_URL=url), "FAIL database: unreachable")

    database.query("DROP ROLE IF EXISTS firehose_cli_reader")
    database.query("CREATE ROLE firehose_cli_reader LOGIN")
    try:
        database.query("GRANT SELECT ON ALL TABLES IN SCHEMA public TO firehose_cli_reader")
        reader_url = database.url.replace("://postgres@", "://firehose_cli_reader@")
        assert reader_url != database.url
        refused = firehose("check", expect=1, DATABASE_URL=reader_url)
        assert lines(refused, "ok   schema: present")
        assert lines(refused, "FAIL writes: refused: permission denied for table events")
    finally:
        database.query("DROP OWNED BY firehose_cli_reader")
        database.query("DROP ROLE firehose_cli_reader")


def test_dead_letters_list_show_retry_and_purge(firehose, database, writer):
    database.query(POISON.format("no_poison", "poison"))
    batch = rows(5, poison={1, 2, 3})
    assert writer.write(batch) == WriteResult(2, 0, 3)
    first, second, third = (batch[i][0] for i in (1, 2, 3))

    listed = firehose("dead-letters", "list")
    assert {first, second, third} <= set(listed.split())
    assert "23514" in listed and listed.splitlines()[-1] == "3 dead letters"
    assert firehose("dead-letters", "list", "--limit", "1").splitlines()[-1] == \
        "3 dead letters (the 1 oldest shown)"
    shown = firehose("dead-letters", "show", first)
    assert "error_code     23514" in shown and "no_poison" in shown
    payload = json.loads(shown.splitlines()[-1])
    assert payload["event_id"] == first and payload["metadata"]["text"] == "é ☃"
    firehose("dead-letters", "show", str(uuid.uuid4()), expect=1)

    # Still refused, now for another reason: it stays, with that reason.
    database.query("ALTER TABLE events DROP CONSTRAINT no_poison")
    database.query(POISON.format("still_poison", "poison"))
    refused = firehose("dead-letters", "retry", first, expect=1)
    assert lines(refused, f"refused  {first}: 23514") and "still_poison" in refused
    assert database.query("SELECT error_message FROM dead_letters WHERE event_id = %s",
                          (first,))[0][0].count("still_poison") == 1
    assert database.count("dead_letters") == 3

    # Cause fixed: stored once, gone from dead_letters.
    database.query("ALTER TABLE events DROP CONSTRAINT still_poison")
    assert lines(firehose("dead-letters", "retry", first), f"stored   {first}")
    # A retry that stored an event and died before clearing its dead letter: run again.
    database.query('INSERT INTO events (event_id, user_id, "timestamp", metadata, received_at) '
                   "VALUES (%s, %s, %s, %s, now())", batch[2][:4])
    unknown = str(uuid.uuid4())
    again = firehose("dead-letters", "retry", first, second, third, unknown, expect=1)
    assert lines(again, f"missing  {unknown}") and lines(again, f"missing  {first}")  # done
    assert again.splitlines()[-1] == "2 retried: 2 stored, 0 still refused, 2 not found"
    assert database.count("dead_letters") == 0
    assert sorted(database.event_ids()) == sorted(r[0] for r in batch)  # each once
    assert firehose("dead-letters", "retry", "--all").splitlines()[-1] == \
        "0 retried: 0 stored, 0 still refused"

    # Purge: only those that failed long enough ago.
    database.query(POISON.format("no_late", "late"))
    late = rows(3, poison={0, 1, 2}, key="late")
    assert writer.write(late) == WriteResult(0, 0, 3)
    database.query("UPDATE dead_letters SET failed_at = now() - interval '40 days' "
                   "WHERE event_id = %s", (late[0][0],))
    assert firehose("dead-letters", "purge", "--older-than", "30").strip() == \
        "1 dead letter purged (failed more than 30 days ago)"
    assert sorted(database.event_ids("dead_letters")) == sorted(r[0] for r in late[1:])
    retried = firehose("dead-letters", "retry", "--all", expect=1)
    assert retried.splitlines()[-1] == "2 retried: 0 stored, 2 still refused"


def orphan_spool(root: pathlib.Path, events: list[Event]) -> pathlib.Path:
    """Write a dead worker's spool directory whose last record is torn."""
    records = [encode_record(msgspec.msgpack.encode(e)) for e in events]
    dead = root / "12345-deadbeef0000"
    dead.mkdir(parents=True)
    (dead / "00000001.seg").write_bytes(b"".join(records[:-1]) + records[-1][:10])
    (dead / "lock").touch()
    return dead


def test_spool_status_and_replay(firehose, database, tmp_path):
    root = tmp_path / "spool"
    received = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc).timestamp()
    events = [Event(str(uuid.uuid4()), i, "2024-05-01T12:00:00+00:00", '{"i": %d}' % i,
                    received + i) for i in range(10)]
    dead = orphan_spool(root, events)
    live = Spool(str(root), 4096, 1 << 20, fsync="never")  # held by this test's process
    live.open()
    try:
        live.append([msgspec.msgpack.encode(e) for e in events[:3]])
        status = firehose("spool", "status")  # COLLECTOR_SPOOL_DIR
        assert status.splitlines()[0] == f"spool {root}: 2 worker directories"
        table = {cells[0]: cells for cells in map(columns, status.splitlines()[2:4])}
        segment = dead / "00000001.seg"
        _, owner, segments, size, records, oldest, corrupt = table[dead.name]
        assert (owner, segments, records) == ("dead", "1", "9"), status
        assert segment.stat().st_size < 1024  # shown in bytes
        assert size == f"{segment.stat().st_size} B" and corrupt == "10 B"
        assert oldest.endswith(" h") and " d " in oldest  # since May 2024
        _, owner, segments, size, records, oldest, corrupt = table[live.directory.name]
        assert (owner, segments, records, corrupt) == ("live", "1", "3", "0 B"), status

        held = firehose("spool", "replay", str(live.directory), expect=1)
        assert "held by a live worker, left alone" in held and live.directory.exists()
        replayed = firehose("spool", "replay", str(root))
        assert f"{dead.name}: 9 events written (9 stored, 0 already stored, 0 dead-lettered)" \
            in replayed
        assert "skipped 10 corrupt bytes" in firehose.stderr  # the torn record, as logged
        assert not dead.exists() and live.directory.exists()
        assert sorted(database.event_ids()) == sorted(e.event_id for e in events[:9])

        orphan_spool(root, events)  # the same spool once more: stored once
        again = firehose("spool", "replay", str(root / dead.name))
        assert "9 events written (0 stored, 9 already stored, 0 dead-lettered)" in again
        assert database.count() == 9
        live.release(1, 3)  # flushed: the worker's close removes its directory
    finally:
        live.close()
    assert firehose("spool", "status", str(root)).strip() == f"spool {root}: 0 worker directories"
    firehose("spool", "status", str(tmp_path / "nowhere"), expect=1)


def test_partitions_list_and_maintain(firehose, database, writer):
    listed = firehose("partitions")
    assert lines(listed, "events_default") and "1 partition," in listed
    conn = storage_database.connect(database.url, 10, 5, autocommit=False)
    try:
        old = partitions.ensure_partitions(
            conn, datetime.datetime(2020, 1, 15, tzinfo=datetime.timezone.utc), "month")
    finally:
        conn.close()
    assert old == ["events_2019_12", "events_2020_01", "events_2020_02", "events_2020_03"]

    maintained = firehose("partitions", "--maintain", COLLECTOR_RETENTION_DAYS="365")
    now = datetime.datetime.now(datetime.timezone.utc)
    made = [p.name for p in partitions.wanted(now, "month")]
    first = maintained.splitlines()[0]
    assert first.startswith(f"maintenance: created {', '.join(made)}; dropped "
                            f"{', '.join(old)}; rollup keys added none"), maintained
    assert writer.write(rows(7)) == WriteResult(7, 0, 0)  # 2024: the default partition
    database.query("ANALYZE events")
    listed = firehose("partitions")
    table = {line.split()[0]: line for line in listed.splitlines()[1:-1]}
    assert sorted(table) == sorted(made + ["events_default"])
    current = partitions.partition_of(now, "month")
    assert f"{current.start:%Y-%m-%d} 00:00:00+00" in table[current.name]
    assert f"{current.end:%Y-%m-%d} 00:00:00+00" in table[current.name]
    assert columns(table["events_default"])[-2] == "7", listed
    assert listed.splitlines()[-1].startswith(f"{len(made) + 1} partitions, ~7 rows")
