"""Open a PostgreSQL connection with every guard against hangs, and apply the schema.

Under gevent, psycopg2 runs in green mode (psycogreen) and libpq's own
connect_timeout is ignored, so the caller bounds each operation with a timeout of
its own; here the server is told to cancel slow
statements and lock waits, and the kernel to notice a dead peer through TCP
keepalives.

The server-side timeouts travel with each transaction, never as session state: the
connection prefixes the first statement of every transaction with `SET LOCAL ...;`
in the same query string, so they cost no extra round trip and hold behind
PgBouncer in transaction mode, where consecutive transactions of one client may run
on different server connections and startup `options` are refused ("unsupported
startup parameter: options"). Nothing here uses session-level SET, server-side
prepared statements or session advisory locks.
"""

import ipaddress
import pathlib
import re
import socket
from typing import Mapping

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

SCHEMA_PATH = pathlib.Path(__file__).with_name("schema.sql")
SCHEMA_LOCK_KEY = 0x46495245  # "FIRE": one worker at a time applies the schema
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
APPLICATION_NAME = "firehose"
IDLE_IN_TRANSACTION_FACTOR = 2  # idle_in_transaction_session_timeout = this × statement_timeout
SAFE_TEXT = re.compile(r"[A-Za-z0-9_.:/+-]+")  # setting names and values we write ourselves


def transaction_settings(statement_timeout: float, lock_timeout: float,
                         extra: Mapping[str, str] | None = None) -> str:
    """Return the `SET LOCAL` statements that open each transaction, as one string.

    The values are ours (numbers from the validated settings, constants of the
    callers), never a client's input; they are checked all the same, since SET takes
    no query parameters.
    """
    values = {
        "statement_timeout": str(int(statement_timeout * 1000)),
        "lock_timeout": str(int(lock_timeout * 1000)),
        "idle_in_transaction_session_timeout":
            str(int(statement_timeout * 1000 * IDLE_IN_TRANSACTION_FACTOR)),
        **(extra or {}),
    }
    for item in (*values, *values.values()):
        if not SAFE_TEXT.fullmatch(item):
            raise ValueError(f"transaction setting {item!r}: expected {SAFE_TEXT.pattern}")
    return "".join(f"SET LOCAL {name} = '{value}'; " for name, value in values.items())


class BoundedCursor(psycopg2.extensions.cursor):
    """A cursor whose statement opening a transaction carries the connection's SET LOCALs."""

    def execute(self, query, vars=None):  # noqa: A002 (psycopg2's own parameter name)
        conn = self.connection
        if conn.autocommit or conn.get_transaction_status() == \
                psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            if isinstance(query, sql.Composable):
                query = query.as_string(conn)
            prefix = conn.transaction_prefix
            if vars is not None:
                prefix = prefix.replace("%", "%%")
            query = (prefix.encode() + query) if isinstance(query, bytes) else prefix + query
        return super().execute(query, vars)


class BoundedConnection(psycopg2.extensions.connection):
    """A connection whose every transaction runs under its statement and lock timeouts."""

    transaction_prefix = ""  # set by connect(); BoundedCursor puts it before each transaction


def connect(dsn: str, statement_timeout: float, lock_timeout: float,
            application_name: str = APPLICATION_NAME, autocommit: bool = True,
            settings: Mapping[str, str] | None = None) -> psycopg2.extensions.connection:
    """Open a connection whose statements and lock waits are bounded by the server.

    Autocommit by default: each write is one statement, atomic by itself, and
    autocommit spares the BEGIN and COMMIT round trips (under load every round trip
    waits for the worker's other greenlets to take their turn). Work of several
    statements (partition maintenance) asks for transactions instead. `settings` are
    more SET LOCALs for every transaction (the read connections' read-only mode).
    """
    params = psycopg2.extensions.parse_dsn(dsn)
    _resolve_host(params)
    user_timeout_ms = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
    params.setdefault("application_name", application_name)
    conn = psycopg2.connect(
        connection_factory=BoundedConnection,
        cursor_factory=BoundedCursor,
        keepalives=1,
        keepalives_idle=KEEPALIVE_IDLE,
        keepalives_interval=KEEPALIVE_INTERVAL,
        keepalives_count=KEEPALIVE_COUNT,
        tcp_user_timeout=user_timeout_ms,
        **params,
    )
    conn.transaction_prefix = transaction_settings(statement_timeout, lock_timeout, settings)
    conn.autocommit = autocommit
    return conn


def _resolve_host(params: dict) -> None:
    """Resolve the host names ourselves, so that under gevent the lookups are cooperative.

    libpq resolves names with a blocking getaddrinfo() that would freeze the whole
    worker; socket.getaddrinfo is gevent's cooperative resolver once
    monkey-patched. `host` may be a list (`host=a,b` for failover): libpq then takes a
    `hostaddr` list of as many items, an empty item meaning "use the host as it is",
    which is what an IP address or a socket directory gets. A name with several
    addresses becomes as many entries, tried in order, as libpq tries them; a name that
    does not resolve is left out of a list, as libpq would skip it. A given hostaddr is
    left alone.
    """
    host = params.get("host")
    if not host or "hostaddr" in params:
        return
    hosts = host.split(",")
    ports = (params.get("port") or "").split(",")
    per_host_ports = len(ports) > 1
    if per_host_ports and len(ports) != len(hosts):
        return  # libpq reports the mismatch itself
    entries = []  # (host, hostaddr, port) in the order libpq will try them
    unresolved = None
    for index, name in enumerate(hosts):
        port = ports[index] if per_host_ports else ports[0]
        if _taken_as_is(name):
            entries.append((name, "", port))
            continue
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as ex:
            unresolved = ex
            continue
        for address in dict.fromkeys(info[4][0] for info in infos):
            entries.append((name, address, port))
    if not entries:
        raise unresolved
    if all(not address for _, address, _ in entries):
        return
    params["host"] = ",".join(name for name, _, _ in entries)
    params["hostaddr"] = ",".join(address for _, address, _ in entries)
    if per_host_ports:
        params["port"] = ",".join(port for _, _, port in entries)


def _taken_as_is(host: str) -> bool:
    """Tell whether libpq uses a host as it is: an IP address, a socket directory, empty."""
    if not host or host.startswith(("/", "@")):  # "@": an abstract socket namespace
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# GET /events?metadata={...}: jsonb containment (@>); jsonb_path_ops is smaller and faster
# than the default opclass and serves @> alone, which is all we ask of it. It is the
# INSERT's costliest index (docs/performance.md), so a deployment that never filters by
# metadata can go without it (COLLECTOR_METADATA_INDEX=off). Both changes lock events
# while they run: building the index on a big table holds up the inserts (the spool
# takes the events meanwhile) for as long as the build takes. So only the maintenance
# greenlet makes them, under its own statement timeout, never the flusher, whose
# timeout is meant for one INSERT.
CREATE_METADATA_INDEX = """
DO $$
BEGIN
    IF to_regclass('events_metadata_idx') IS NULL THEN
        CREATE INDEX events_metadata_idx ON events USING gin (metadata jsonb_path_ops);
    END IF;
END $$;"""
DROP_METADATA_INDEX = """
DO $$
BEGIN
    IF to_regclass('events_metadata_idx') IS NOT NULL THEN
        DROP INDEX events_metadata_idx;
    END IF;
END $$;"""


def ensure_schema(conn: psycopg2.extensions.connection) -> None:
    """Create the tables and indexes if missing; safe to run from many workers at once.

    One query string is one transaction, so the advisory lock is held until the end.
    """
    _under_schema_lock(conn, SCHEMA_PATH.read_text())


def ensure_metadata_index(conn: psycopg2.extensions.connection, wanted: bool) -> None:
    """Create the metadata index if `wanted` and missing, or drop it if not wanted."""
    _under_schema_lock(conn, CREATE_METADATA_INDEX if wanted else DROP_METADATA_INDEX)


def _under_schema_lock(conn: psycopg2.extensions.connection, statements: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s);\n" + statements.replace("%", "%%"),
                    (SCHEMA_LOCK_KEY,))
    if not conn.autocommit:
        conn.commit()
