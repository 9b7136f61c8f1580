"""Open a PostgreSQL connection with every guard against hangs, and apply the schema.

Under gevent, psycopg2 runs in green mode (psycogreen) and libpq's own
connect_timeout is ignored (pitfall 3), so the caller bounds each operation with a
timeout of its own; here the server is told to cancel slow statements and lock
waits, and the kernel to notice a dead peer through TCP keepalives.
"""

import ipaddress
import pathlib
import socket

import psycopg2
import psycopg2.extensions

SCHEMA_PATH = pathlib.Path(__file__).with_name("schema.sql")
SCHEMA_LOCK_KEY = 0x46495245  # "FIRE": one worker at a time applies the schema
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
APPLICATION_NAME = "firehose"


def connect(dsn: str, statement_timeout: float, lock_timeout: float,
            application_name: str = APPLICATION_NAME,
            autocommit: bool = True) -> psycopg2.extensions.connection:
    """Open a connection whose statements and lock waits are bounded by the server.

    Autocommit by default: each write is one statement, atomic by itself, and
    autocommit spares the BEGIN and COMMIT round trips (under load every round trip
    waits for the worker's other greenlets to take their turn). Work of several
    statements (partition maintenance) asks for transactions instead.
    """
    params = psycopg2.extensions.parse_dsn(dsn)
    _resolve_host(params)
    options = " ".join(filter(None, [
        params.pop("options", ""),
        f"-c statement_timeout={int(statement_timeout * 1000)}",
        f"-c lock_timeout={int(lock_timeout * 1000)}",
        f"-c idle_in_transaction_session_timeout={int(statement_timeout * 2000)}",
    ]))
    user_timeout_ms = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
    params.setdefault("application_name", application_name)
    conn = psycopg2.connect(
        options=options,
        keepalives=1,
        keepalives_idle=KEEPALIVE_IDLE,
        keepalives_interval=KEEPALIVE_INTERVAL,
        keepalives_count=KEEPALIVE_COUNT,
        tcp_user_timeout=user_timeout_ms,
        **params,
    )
    conn.autocommit = autocommit
    return conn


def _resolve_host(params: dict) -> None:
    """Resolve the host name ourselves, so that under gevent the lookup is cooperative.

    libpq resolves names with a blocking getaddrinfo() that would freeze the whole
    worker (pitfall 3); socket.getaddrinfo is gevent's cooperative resolver once
    monkey-patched. An IP address, a socket directory or a hostaddr is left alone.
    """
    host = params.get("host")
    if not host or "hostaddr" in params or host.startswith("/") or "," in host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    port = int(params.get("port") or 5432)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    params["hostaddr"] = infos[0][4][0]


def ensure_schema(conn: psycopg2.extensions.connection) -> None:
    """Create the tables and indexes if missing; safe to run from many workers at once.

    One query string is one transaction, so the advisory lock is held until the end.
    """
    sql = SCHEMA_PATH.read_text().replace("%", "%%")
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s);\n" + sql, (SCHEMA_LOCK_KEY,))
    if not conn.autocommit:
        conn.commit()
