"""Classify a failed write: retry it, split it to find a poison event, or call for help.

    Exception raised while writing a batch
    ├── TRANSIENT  the database is unavailable; keep the batch and retry with backoff:
    │              a lost or closed connection (no SQLSTATE), no answer in time
    │              (OperationTimedOut), 08 connection,
    │              25006 read-only (a failover in progress), 40 rollback,
    │              53 resources, 55 lock not available, 57 operator intervention
    │              (admin shutdown, statement_timeout's query_canceled), 58 system
    ├── POISON     an event's content is refused: 22 data, 23 integrity, 54 limits,
    │              and the client-side ValueError (NUL) / UnicodeEncodeError (lone
    │              surrogate) psycopg2 raises before sending; split the batch until
    │              the event fails alone, then dead-letter it
    └── SYSTEMIC   the deployment is broken: 42 (missing table, permission denied),
                   28 authentication, 3D/3F missing database or schema, anything
                   unknown; and a connection refused for a reason retrying cannot
                   fix (REFUSED_FOR_GOOD); log loudly, report in /ready, retry with
                   backoff

The exception class alone misleads: 54xxx is an OperationalError yet permanent,
25006 is an InternalError yet transient. So classify by SQLSTATE, and by whether
the connection survived.

A refused connection carries no SQLSTATE: libpq reports the server's FATAL as text
(psycopg2 gives it no `pgcode`), so those refusals are recognised by the words of
PostgreSQL's, PgBouncer's and libpq's own messages. They are the English messages;
a server whose lc_messages is another language is seen as merely unavailable. So is
PgBouncer's "server login has been failing": it says so while PostgreSQL is down, too.
"""

import enum

import psycopg2

TRANSIENT_CLASSES = ("08", "40", "53", "55", "57", "58")
TRANSIENT_CODES = ("25006",)
POISON_CLASSES = ("22", "23", "54")
# Connection refusals that no retry can cure (lower case, as found in the message).
REFUSED_FOR_GOOD = (
    "authentication failed",  # 28P01, also ident/peer/pgbouncer's
    "no pg_hba.conf entry",  # 28000, also a server demanding TLS the URL does not offer
    "no password supplied",  # libpq: the server asks for a password the URL lacks
    "is not permitted to log in",  # 28000
    "does not exist",  # 3D000 database, 28000 role
    "permission denied for database",  # 42501
    "unsupported startup parameter",  # 08P01 from PgBouncer
    "no such database",  # PgBouncer: not in its [databases]
    "no such user",  # PgBouncer: not in its auth_file
    "ssl required",  # PgBouncer's client_tls_sslmode=require, the URL without TLS
    "ssl was required",  # libpq: sslmode=require against a server without TLS
    "server does not support ssl",
)


class OperationTimedOut(Exception):
    """PostgreSQL did not answer within the deadline the caller set (a hung or cut network)."""


class WriteFailure(enum.Enum):
    """What a failed write means for the batch."""

    TRANSIENT = "transient"
    POISON = "poison"
    SYSTEMIC = "systemic"


def classify_error(ex: BaseException, connection_closed: bool) -> WriteFailure:
    """Say whether a write that raised `ex` is retried, split, or reported as broken."""
    if isinstance(ex, OperationTimedOut):
        return WriteFailure.TRANSIENT
    if isinstance(ex, (ValueError, UnicodeEncodeError)) and not isinstance(ex, psycopg2.Error):
        return WriteFailure.POISON
    code = getattr(ex, "pgcode", None) or ""
    if code in TRANSIENT_CODES or code[:2] in TRANSIENT_CLASSES:
        return WriteFailure.TRANSIENT
    if code[:2] in POISON_CLASSES:
        return WriteFailure.POISON
    if not code and isinstance(ex, psycopg2.OperationalError) and refused_for_good(ex):
        return WriteFailure.SYSTEMIC
    if not code and isinstance(ex, psycopg2.ProgrammingError):
        return WriteFailure.SYSTEMIC  # an invalid DATABASE_URL
    if not code and (connection_closed or isinstance(ex, (psycopg2.OperationalError,
                                                           psycopg2.InterfaceError))):
        return WriteFailure.TRANSIENT
    return WriteFailure.SYSTEMIC


def refused_for_good(ex: BaseException) -> bool:
    """Tell whether a failed connection was refused for a reason retrying cannot fix."""
    message = str(ex).lower()
    return any(reason in message for reason in REFUSED_FOR_GOOD)
