"""Write errors classified by SQLSTATE, from real PostgreSQL errors, and a broken deployment;
the writer's two INSERT forms, side by side."""

import json
import uuid

import psycopg2
import pytest

from storage import database as storage_database
from storage.errors import OperationTimedOut, WriteFailure, classify_error
from storage.writer import INSERT_METHODS, BatchWriter, WriteResult
from tests.client import post_stream
from tests.polling import wait_until


def error_of(database, sql: str, setup: str | None = None):
    """Run sql on a fresh connection and return (exception, connection closed)."""
    conn = psycopg2.connect(database.url)
    try:
        with conn.cursor() as cur:
            if setup:
                cur.execute(setup)
            cur.execute(sql)
    except Exception as ex:
        return ex, bool(conn.closed)
    finally:
        conn.close()
    raise AssertionError(f"{sql} did not fail")


@pytest.mark.parametrize("sql,setup,expected", [
    ("SELECT 1 / 0", None, WriteFailure.POISON),  # 22012
    ("SELECT '{\"a\": \"\\u0000\"}'::jsonb", None, WriteFailure.POISON),  # 22P05
    ("SELECT 'nope'::uuid", None, WriteFailure.POISON),  # 22P02
    ("SELECT * FROM no_such_table", None, WriteFailure.SYSTEMIC),  # 42P01
    ("CREATE TABLE t (x int)", "SET TRANSACTION READ ONLY",
     WriteFailure.TRANSIENT),  # 25006
    ("SELECT pg_sleep(5)", "SET statement_timeout = 50", WriteFailure.TRANSIENT),  # 57014
    ("SELECT pg_terminate_backend(pg_backend_pid())", None, WriteFailure.TRANSIENT),  # 57P01
])
def test_real_errors_are_classified(database, sql, setup, expected):
    ex, closed = error_of(database, sql, setup)
    assert classify_error(ex, closed) is expected, (getattr(ex, "pgcode", None), ex)


def test_client_side_errors_are_poison(database):
    conn = psycopg2.connect(database.url)
    try:
        with pytest.raises(ValueError) as caught, conn.cursor() as cur:
            cur.execute("SELECT %s", ("a\x00b",))
    finally:
        conn.close()
    assert classify_error(caught.value, False) is WriteFailure.POISON


def test_lost_connection_and_timeout_are_transient(database):
    conn = psycopg2.connect(database.url)
    conn.close()
    with pytest.raises(psycopg2.InterfaceError) as caught:
        conn.cursor()
    assert classify_error(caught.value, True) is WriteFailure.TRANSIENT
    assert classify_error(OperationTimedOut("no answer"), True) is WriteFailure.TRANSIENT


def test_lock_timeout_is_transient(database):
    database.query("CREATE TABLE locked (x int)")
    holder = psycopg2.connect(database.url)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
            ex, closed = error_of(database, "INSERT INTO locked VALUES (1)",
                                  "SET lock_timeout = 50")
    finally:
        holder.close()
        database.query("DROP TABLE locked")
    assert ex.pgcode == "55P03"
    assert classify_error(ex, closed) is WriteFailure.TRANSIENT


@pytest.mark.slow
def test_missing_table_is_reported_and_retried(start_collector, database):
    collector = start_collector(workers=1)
    wait_until(lambda: database.query("SELECT to_regclass('events') IS NOT NULL")[0][0], 30,
               "the schema")
    database.query("ALTER TABLE events RENAME TO events_moved")
    result = post_stream(collector.url, 200, 5)
    assert result.statuses == {202: 200}
    health = wait_until(lambda: (h := collector.health())["database"] == "broken" and h, 30,
                        "the broken deployment in /health")
    assert health["last_flush_error_kind"] == "systemic"
    assert "events" in health["last_flush_error"]
    assert "deployment needs fixing" in collector.output() or "ERROR" in collector.output()
    database.query("ALTER TABLE events_moved RENAME TO events")
    wait_until(lambda: database.count() == 200, 30, "the 200 rows once the table is back")
    assert set(database.event_ids()) == set(result.accepted)


def writer_rows(count: int) -> list[tuple]:
    """Rows as the flusher hands them over, with text jsonb must keep exactly."""
    return [(str(uuid.uuid4()), index, f"2024-05-01T12:00:{index % 60:02d}+00:00",
             json.dumps({"index": index, "text": "é \\ \" ☃", "big": 12345678901234567,
                         "nested": {"a": [1, 2.5, None, True]}}), 1714564800.25 + index)
            for index in range(count)]


@pytest.mark.parametrize("method", INSERT_METHODS)
def test_both_insert_forms_store_the_same_rows_and_dead_letter_alike(database, method):
    database.query("DROP TABLE IF EXISTS events CASCADE")
    writer = BatchWriter(lambda: storage_database.connect(database.url, 10, 5),
                         insert_method=method)
    writer.prepare()
    database.query("ALTER TABLE events ADD CONSTRAINT no_poison "
                   "CHECK (NOT metadata @> '{\"index\": 7}')")
    rows = writer_rows(20)
    try:
        assert writer.write(rows) == WriteResult(19, 0, 1)
        assert writer.write(rows[:5]) == WriteResult(0, 5, 0)  # a replay is stored once
    finally:
        writer.close()
    stored = database.query(
        "SELECT event_id::text, user_id, \"timestamp\", metadata::text, received_at "
        "FROM events ORDER BY user_id")
    expected = [row for row in rows if row[1] != 7]
    assert [(r[0], r[1]) for r in stored] == [(r[0], r[1]) for r in expected]
    assert [json.loads(r[3]) for r in stored] == [json.loads(r[3]) for r in expected]
    assert [r[2].timestamp() for r in stored] == [1714564800 + i % 60 for _, i, *_ in expected]
    assert [r[4].timestamp() for r in stored] == [r[4] for r in expected]
    dead = database.query("SELECT event_id::text, error_code FROM dead_letters")
    assert dead == [(rows[7][0], "23514")]
