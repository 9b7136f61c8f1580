"""Measure the insert path: rows/s of BatchWriter.write with 1000-row batches.

    DATABASE_URL=postgresql://... python scripts/bench_insert.py --reset [--batches 200]
    ... --method both   # execute_values against json_recordset, in turn

It DROPS the Firehose tables of that database first (--reset is required), applies the
schema of the code on PYTHONPATH, and writes batches of events stamped around now
(so into the current partition), from 100,000 users, with a small metadata object.
Options take parts of the schema away to show what each costs:
--without-trigger (no rollups), --without-gin (no metadata index), --rollup-keys.
"""

import argparse
import datetime
import os
import random
import statistics
import sys
import time
import uuid

import psycopg2

from storage import database
from storage.writer import INSERT_METHODS, BatchWriter

try:
    from storage import partitions
except ImportError:  # the code from before partitioning, measured for comparison
    partitions = None

BATCH_SIZE = 1000
USERS = 100_000
PAGES = 200
TABLES = ("events", "dead_letters", "event_counts", "event_counts_by_user",
          "event_counts_by_key", "rollup_keys")


def make_batch(now: float) -> list[tuple]:
    """Return one batch of rows as the flusher hands them to the writer."""
    rows = []
    for _ in range(BATCH_SIZE):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - random.uniform(0, 60)))
        metadata = '{"page": "/p/%d", "ref": "https://example.com/", "n": %d}' % (
            random.randrange(PAGES), random.randrange(1000))
        rows.append((str(uuid.uuid4()), random.randrange(USERS), stamp, metadata, now))
    return rows


def prepare(dsn: str, without_trigger: bool, without_gin: bool, keys: list[str]) -> None:
    """Drop the tables, apply the schema, make this month's partition, take parts away."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS " + ", ".join(TABLES) + " CASCADE")
    conn.commit()
    database.ensure_schema(conn)
    if hasattr(database, "ensure_metadata_index"):  # the code since the index is a setting
        database.ensure_metadata_index(conn, True)
    if partitions is not None:
        partitions.ensure_partitions(conn, datetime.datetime.now(datetime.timezone.utc), "month")
    with conn.cursor() as cur:
        if without_trigger:
            cur.execute("ALTER TABLE events DISABLE TRIGGER USER")
        if without_gin:
            cur.execute("DROP INDEX IF EXISTS events_metadata_idx")
        if keys:
            cur.execute("INSERT INTO rollup_keys (key) SELECT unnest(%s::text[])", (keys,))
    conn.commit()
    conn.close()


def measure(dsn: str, method: str, batches: list[list[tuple]]) -> None:
    """Write the batches with one INSERT form; print rows/s and the client's CPU."""
    writer = BatchWriter(lambda: database.connect(dsn, 60, 10), insert_method=method)
    writer.prepare()
    per_batch = []
    started, cpu_started = time.monotonic(), time.process_time()
    for batch in batches:
        before = time.monotonic()
        result = writer.write(batch)
        per_batch.append(time.monotonic() - before)
        assert result.inserted == BATCH_SIZE, result
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    writer.close()
    rows = len(batches) * BATCH_SIZE
    print(f"{method:14}: {rows} rows in {elapsed:.2f} s: {rows / elapsed:,.0f} rows/s; "
          f"per batch median {statistics.median(per_batch) * 1000:.1f} ms, "
          f"p95 {sorted(per_batch)[int(len(per_batch) * 0.95)] * 1000:.1f} ms; "
          f"client CPU {cpu / len(batches) * 1000:.1f} ms per batch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reset", action="store_true", help="required: drop the tables first")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--without-trigger", action="store_true")
    parser.add_argument("--without-gin", action="store_true")
    parser.add_argument("--rollup-keys", default="", help="comma-separated metadata keys")
    parser.add_argument("--method", choices=INSERT_METHODS + ("both",), default="both",
                        help="the INSERT's form (COLLECTOR_INSERT_METHOD), or both in turn "
                             "(default both)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each form this many times, interleaved")
    args = parser.parse_args()
    dsn = os.environ.get("DATABASE_URL")
    if not dsn or not args.reset:
        print("set DATABASE_URL and pass --reset: this drops the Firehose tables",
              file=sys.stderr)
        return 2
    keys = [k for k in args.rollup_keys.split(",") if k]
    batches = [make_batch(time.time()) for _ in range(args.batches)]
    methods = INSERT_METHODS if args.method == "both" else (args.method,)
    for _ in range(args.rounds):
        for method in methods:
            prepare(dsn, args.without_trigger, args.without_gin, keys)
            measure(dsn, method, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
