"""`firehose`, the operator's command line: check a deployment; dead letters, spools, partitions.

    firehose check                      settings, database, schema, spool, disk, read access
    firehose dead-letters list|show|retry|purge
    firehose spool status [DIR] | replay DIR
    firehose partitions [--maintain]

It sits in collector/ because it sees a deployment as the workers do: the same settings
(collector/settings.py), the same spool layout and lock (collector/spool.py), the same
writer and maintenance pass. This module only parses arguments and prints; the SQL is in
storage/ (deadletters.py, partitions.py, probe.py). It is an ordinary process, not a
gevent worker: psycopg2 blocks as usual, and libpq's connect_timeout holds.

Exit status: 0 when all is well, 1 when something failed (a check, a retry left refused,
an unreachable database), 2 for a usage error.
"""

import argparse
import contextlib
import datetime
import functools
import ipaddress
import logging
import math
import os
import pathlib
import shlex
import socket
import sys
import tempfile
import time
import uuid
from typing import Iterator, Sequence

import msgspec
import psycopg2
import psycopg2.extensions

from collector import spool
from collector.settings import Settings, SettingsError
from collector.validation import Event
from storage import database, deadletters, partitions, probe
from storage.writer import BatchWriter, WriteDeferred, WriteResult

APPLICATION_NAME = "firehose-cli"
MIN_CONNECT_TIMEOUT = 2  # seconds; libpq takes whole seconds and treats 1 as 2
LIST_LIMIT = 50  # dead letters listed unless --limit says otherwise
REASON_WIDTH = 70  # characters of a refusal shown per line of a list
READ_CHUNK = 10_000  # spool records read at a time when counting them
SPOOL_PROBE_PREFIX = ".firehose-check-"  # a file, never a directory: workers skip it

FAIL = 1
# A refused connection, and a host name that does not resolve (storage/database.py resolves
# it itself, with socket.getaddrinfo).
CONNECT_ERRORS = (psycopg2.Error, OSError)


class CommandFailed(Exception):
    """The command cannot go on; its message says why."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `firehose` command and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Log lines of the spool and writer (corrupt records skipped, events dead-lettered).
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="firehose: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("storage.writer").setLevel(logging.ERROR)  # retry prints its refusals
    try:
        return args.run(args)
    except CommandFailed as ex:
        print(f"firehose: {ex}", file=sys.stderr)
        return FAIL
    except BrokenPipeError:  # `firehose ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every command and its options."""
    parser = argparse.ArgumentParser(
        prog="firehose", description="Operate a Firehose collector: check it, mend what it kept.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="check settings, database, schema, spool and read access; exit 1 on FAIL",
        description="One line per check: ok, warn or FAIL. The settings are read from the "
                    "environment, gunicorn's bind and workers as gunicorn reads them "
                    "(its config file, GUNICORN_CMD_ARGS, then these options).")
    check.add_argument("-c", "--config", help="gunicorn config file "
                       "(default: ./gunicorn.conf.py, if there is one, as gunicorn does)")
    check.add_argument("-b", "--bind", action="append", metavar="ADDRESS",
                       help="a --bind given to gunicorn on its command line (repeatable)")
    check.add_argument("-w", "--workers", type=int, help="a --workers given to gunicorn")
    check.set_defaults(run=run_check)

    letters = commands.add_parser("dead-letters", help="list, show, retry or purge dead letters")
    actions = letters.add_subparsers(title="actions", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list dead letters, oldest first")
    listing.add_argument("--limit", type=_positive, default=LIST_LIMIT,
                         help=f"most shown (default {LIST_LIMIT})")
    listing.set_defaults(run=run_list)
    shown = actions.add_parser("show", help="show one dead letter with its raw payload")
    shown.add_argument("event_id", type=uuid.UUID, metavar="ID")
    shown.set_defaults(run=run_show)
    retry = actions.add_parser(
        "retry", help="write dead letters again once their cause is fixed",
        description="Each event goes through the collector's writer again: stored once, it "
                    "leaves dead_letters; still refused, it stays with the new reason. Exit 1 "
                    "if any is still refused or not found.")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("event_ids", type=uuid.UUID, nargs="*", metavar="ID", default=[])
    which.add_argument("--all", action="store_true", help="every dead letter")
    retry.set_defaults(run=run_retry)
    purge = actions.add_parser("purge", help="delete dead letters that failed long ago")
    purge.add_argument("--older-than", type=_natural, required=True, metavar="DAYS",
                       help="delete those whose last failure is more than DAYS days old")
    purge.set_defaults(run=run_purge)

    spools = commands.add_parser("spool", help="look at spools, replay an orphaned one")
    actions = spools.add_subparsers(title="actions", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="each worker directory of a spool")
    status.add_argument("directory", nargs="?", metavar="DIR",
                        help="the spool (default: COLLECTOR_SPOOL_DIR)")
    status.set_defaults(run=run_spool_status)
    replay = actions.add_parser(
        "replay", help="write an orphaned spool into PostgreSQL, then remove it",
        description="DIR is a spool (its dead workers' directories are replayed) or one "
                    "worker directory. Idempotent by event_id; a directory a live worker "
                    "holds is left alone.")
    replay.add_argument("directory", metavar="DIR")
    replay.set_defaults(run=run_spool_replay)

    parts = commands.add_parser("partitions", help="partitions of events: ranges, rows, sizes")
    parts.add_argument("--maintain", action="store_true",
                       help="first run one maintenance pass (create ahead, drop expired)")
    parts.set_defaults(run=run_partitions)
    return parser


# --- firehose check ---------------------------------------------------------------

class Report:
    """The lines of `firehose check`, printed as they come."""

    def __init__(self) -> None:
        self.failed = False

    def ok(self, what: str, why: str) -> None:
        self._line("ok", what, why)

    def warn(self, what: str, why: str) -> None:
        self._line("warn", what, why)

    def fail(self, what: str, why: str) -> None:
        self.failed = True
        self._line("FAIL", what, why)

    def _line(self, status: str, what: str, why: str) -> None:
        print(f"{status:<4} {what}: {why}", flush=True)


def run_check(args: argparse.Namespace) -> int:
    """Check that the collector can start and keep its promises here."""
    report = Report()
    try:
        settings = Settings.from_environ()
    except SettingsError as ex:
        report.fail("settings", str(ex))
        return FAIL
    try:
        gunicorn = gunicorn_config(args.config, args.bind or [], args.workers)
    except Exception as ex:  # gunicorn's own validation: a bad bind, workers, config file
        report.fail("gunicorn", f"its configuration does not load: {ex}")
        return FAIL
    try:
        dsn = psycopg2.extensions.parse_dsn(settings.database_url)
    except psycopg2.Error as ex:
        report.fail("settings", f"DATABASE_URL is not a libpq URI: {_first_line(ex)}")
        return FAIL
    target = f"{dsn.get('dbname', '(default database)')} on {dsn.get('host', 'local socket')}"
    report.ok("settings", f"valid; database {target}, {_workers(gunicorn.workers)}, "
                          f"binds {', '.join(gunicorn.bind)}")
    _check_database(report, settings)
    _check_spool(report, settings, gunicorn.workers)
    _check_reads(report, settings, gunicorn.address, gunicorn.bind)
    return FAIL if report.failed else 0


def _check_database(report: Report, settings: Settings) -> None:
    try:
        conn = connect(settings)
    except CONNECT_ERRORS as ex:
        report.fail("database", f"unreachable: {_first_line(ex)}")
        return
    try:
        version, user = probe.server(conn)
        report.ok("database", f"reachable: PostgreSQL {version}, as {user}")
        missing = probe.missing_tables(conn)
        if missing:
            try:
                database.ensure_schema(conn)
                database.ensure_metadata_index(conn, settings.wants_metadata_index)
            except psycopg2.Error as ex:
                report.fail("schema", f"missing ({', '.join(missing)}) and not creatable: "
                                      f"{_first_line(ex)}")
                return
            report.ok("schema", f"was missing ({', '.join(missing)}), now created")
        else:
            report.ok("schema", f"present ({len(probe.TABLES)} tables)")
        try:
            probe.probe_writes(conn)
        except psycopg2.Error as ex:
            report.fail("writes", f"refused: {_first_line(ex)}")
            return
        report.ok("writes", "an event and a dead letter inserted and rolled back")
    except psycopg2.Error as ex:
        report.fail("database", _first_line(ex))
    finally:
        conn.close()


def _check_spool(report: Report, settings: Settings, workers: int) -> None:
    root = pathlib.Path(settings.spool_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe_path = tempfile.mkstemp(prefix=SPOOL_PROBE_PREFIX, dir=existing)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe_path)
    except OSError as ex:
        report.fail("spool", f"{existing} is not writable: {ex}")
        return
    if existing == root:
        report.ok("spool", f"{root} writable")
    else:
        report.ok("spool", f"{root} missing; {existing} writable, the first worker creates it")
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    spooled = sum(d.bytes for d in spool_directories(root)) if root.is_dir() else 0
    budget = settings.spool_max_bytes * workers
    room = f"{_size(free)} free" + (f" and {_size(spooled)} spooled" if spooled else "")
    need = (f"a spool budget of {_workers(workers)} × {_size(settings.spool_max_bytes)} "
            f"(COLLECTOR_SPOOL_MAX_BYTES)")
    if free + spooled < budget:
        report.fail("disk", f"{room} on {existing}, less than {need}: a long outage would "
                            "fill the disk before the budget")
    else:
        report.ok("disk", f"{room} for {need}")


def _check_reads(report: Report, settings: Settings, addresses: list, binds: list[str]) -> None:
    if settings.read_keys:
        report.ok("reads", f"need one of {len(settings.read_keys)} read keys "
                           "(COLLECTOR_READ_KEYS)")
        return
    exposed = [bind for bind, address in zip(binds, addresses) if not _local_only(address)]
    if exposed:
        report.warn("reads", f"GET /events and /counts are open (no COLLECTOR_READ_KEYS) and "
                             f"gunicorn binds {', '.join(exposed)}, beyond loopback: anyone who "
                             "reaches it reads every event; set COLLECTOR_READ_KEYS, or bind "
                             "127.0.0.1 behind nginx")
    else:
        report.ok("reads", f"open (no COLLECTOR_READ_KEYS), but bound to this machine only "
                           f"({', '.join(binds)})")


def gunicorn_config(config: str | None, binds: list[str], workers: int | None):
    """Return gunicorn's Config as gunicorn itself would load it, for its bind and workers.

    The order is gunicorn's (gunicorn/app/base.py `Application.load_config`): its
    defaults (PORT, WEB_CONCURRENCY), the config file (gunicorn.conf.py reads HOST, PORT
    and WEB_CONCURRENCY itself), GUNICORN_CMD_ARGS, then the command line.
    """
    from gunicorn.app.base import Application
    from gunicorn.config import get_default_config_file

    class ConfigOnly(Application):
        """gunicorn's configuration loading, without an app to load."""

        def load_config(self) -> None:
            pass  # Application.__init__ calls it; `read` below does the work

        def init(self, parser, opts, args):
            return None

        def load(self):
            raise NotImplementedError

    argv = [item for bind in binds for item in ("--bind", bind)]
    argv += ["--workers", str(workers)] if workers is not None else []
    argv += ["--config", config] if config else []
    loader = ConfigOnly(prog="gunicorn")
    parser = loader.cfg.parser()
    given = _parse_quietly(parser, argv)
    from_env = _parse_quietly(parser, loader.cfg.get_cmd_args_from_env())
    config_file = given.config or from_env.config or get_default_config_file()
    if config_file:
        if not os.path.exists(config_file):
            raise ValueError(f"{config_file!r} doesn't exist")
        loader.load_config_from_file(config_file)
    for values in (from_env, given):
        for name, value in vars(values).items():
            if value is not None and name != "args":
                loader.cfg.set(name.lower(), value)
    return loader.cfg


def _parse_quietly(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse gunicorn arguments; raise ValueError instead of printing usage and exiting."""
    def refuse(message: str):
        raise ValueError(f"gunicorn arguments {shlex.join(argv)!r}: {message}")

    parser.exit_on_error = False
    parser.error = refuse
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as ex:
        refuse(str(ex))


def _local_only(address) -> bool:
    """Tell whether a gunicorn address (parsed) is reachable from this machine only."""
    if isinstance(address, str):
        return True  # a Unix socket
    if isinstance(address, int):
        return False  # a socket inherited from systemd: cannot tell, assume exposed
    host = address[0]
    if not host:
        return False  # every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# --- firehose dead-letters --------------------------------------------------------

def run_list(args: argparse.Namespace) -> int:
    """List dead letters, the oldest first."""
    with opened(_settings()) as conn:
        total = deadletters.count(conn)
        letters = deadletters.list_dead_letters(conn, args.limit)
    if letters:
        print(f"{'EVENT_ID':<36}  {'FAILED_AT (UTC)':<19}  {'CODE':<10}  {'BYTES':>6}  REASON")
    for letter in letters:
        reason = letter.error_message
        if len(reason) > REASON_WIDTH:
            reason = reason[:REASON_WIDTH - 1] + "…"
        print(f"{letter.event_id:<36}  {_utc(letter.failed_at):<19}  {letter.error_code:<10}  "
              f"{letter.payload_bytes:>6}  {reason}")
    shown = f" (the {len(letters)} oldest shown)" if len(letters) < total else ""
    print(f"{total} dead letter{'s' if total != 1 else ''}{shown}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Show one dead letter: why it was refused, when, and its payload as stored."""
    with opened(_settings()) as conn:
        found = deadletters.show(conn, args.event_id)
    if found is None:
        raise CommandFailed(f"no dead letter {args.event_id}")
    letter, payload = found
    print(f"event_id       {letter.event_id}")
    print(f"failed_at      {letter.failed_at.astimezone(datetime.timezone.utc).isoformat()}")
    print(f"error_code     {letter.error_code}")
    print(f"error_message  {letter.error_message}")
    print(f"payload        {letter.payload_bytes} bytes, as the writer had the event:")
    # The bytes as stored; a lone surrogate (not UTF-8) is shown escaped.
    print(payload.decode("utf-8", "backslashreplace"))
    return 0


def run_retry(args: argparse.Namespace) -> int:
    """Write dead letters again through the collector's writer."""
    settings = _settings()
    wanted = None if args.all else list(dict.fromkeys(args.event_ids))
    stored = refused = 0
    seen: set[str] = set()
    writer = _writer(settings)
    try:
        with opened(settings) as conn:
            for outcome in deadletters.retry(conn, writer, wanted):
                seen.add(outcome.event_id)
                if outcome.stored:
                    stored += 1
                    if wanted is not None:
                        print(f"stored   {outcome.event_id}")
                else:
                    refused += 1
                    print(f"refused  {outcome.event_id}: {outcome.reason}")
    except WriteDeferred as ex:
        raise CommandFailed(f"PostgreSQL cannot take them now, nothing lost: {ex}") from None
    finally:
        writer.close()
    missing = [str(i) for i in wanted or [] if str(i) not in seen]
    for event_id in missing:
        print(f"missing  {event_id}: no such dead letter")
    print(f"{stored + refused} retried: {stored} stored, {refused} still refused"
          + (f", {len(missing)} not found" if missing else ""))
    return FAIL if refused or missing else 0


def run_purge(args: argparse.Namespace) -> int:
    """Delete the dead letters whose last failure is older than the given days."""
    with opened(_settings()) as conn:
        purged = deadletters.purge(conn, args.older_than)
    print(f"{purged} dead letter{'s' if purged != 1 else ''} purged "
          f"(failed more than {args.older_than} days ago)")
    return 0


# --- firehose spool ---------------------------------------------------------------

class SpoolDirectory:
    """What `spool status` tells of one worker directory."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.setting_up = path.name.startswith(".")
        # A directory being set up is not probed: our shared lock, taken for an instant,
        # could make its worker's exclusive one fail.
        self.live = None if self.setting_up else spool.owner_alive(path)
        self.segments = sorted(path.glob("*" + spool.SEGMENT_SUFFIX))
        self.bytes = sum(_file_size(p) for p in self.segments)

    def read_records(self) -> tuple[int, int, float | None]:
        """Count the records; return (records, corrupt bytes, received_at of the first)."""
        decode = msgspec.msgpack.Decoder(Event).decode
        records = corrupt = 0
        first: float | None = None
        for path in self.segments:
            offset = 0
            while True:
                try:
                    payloads, offset, skipped = spool.read_records(path, offset, READ_CHUNK)
                except (FileNotFoundError, ValueError):
                    break  # released by its worker meanwhile
                corrupt += skipped
                if first is None and payloads:
                    first = decode(payloads[0]).received_at
                records += len(payloads)
                if len(payloads) < READ_CHUNK:
                    break
        return records, corrupt, first


def spool_directories(root: pathlib.Path) -> list[SpoolDirectory]:
    """Return the worker directories of a spool, by name."""
    return [SpoolDirectory(p) for p in sorted(root.iterdir()) if p.is_dir()]


def run_spool_status(args: argparse.Namespace) -> int:
    """Print each worker directory of a spool: owner, segments, bytes, records, age."""
    root = pathlib.Path(args.directory or _settings(require_database=False).spool_dir)
    if not root.is_dir():
        raise CommandFailed(f"{root}: no spool there (no worker has started with it)")
    directories = spool_directories(root)
    print(f"spool {root}: {len(directories)} worker "
          f"director{'ies' if len(directories) != 1 else 'y'}")
    if not directories:
        return 0
    print(f"{'DIRECTORY':<24}  {'OWNER':<8}  {'SEGMENTS':>8}  {'BYTES':>10}  {'RECORDS':>8}  "
          f"{'OLDEST':>10}  CORRUPT")
    now = time.time()
    for directory in directories:
        records, corrupt, first = directory.read_records()
        owner = "starting" if directory.setting_up else "live" if directory.live else "dead"
        age = _age(now - first) if first is not None else "-"
        print(f"{directory.path.name:<24}  {owner:<8}  {len(directory.segments):>8}  "
              f"{_size(directory.bytes):>10}  {records:>8}  {age:>10}  {_size(corrupt)}")
    if any(d.live for d in directories):
        print("live: a worker holds it; its records include some already in PostgreSQL "
              "(its /health has the exact pending count)")
    if any(d.live is False for d in directories):
        print("dead: no worker holds it; a live worker of this spool replays it, "
              "or `firehose spool replay`")
    return 0


def run_spool_replay(args: argparse.Namespace) -> int:
    """Write the dead workers' directories of a spool (or one such directory) into PostgreSQL."""
    settings = _settings()
    target = pathlib.Path(args.directory)
    if not target.is_dir():
        raise CommandFailed(f"{target}: not a directory")
    one = (target / spool.LOCK_NAME).exists() or any(target.glob("*" + spool.SEGMENT_SUFFIX))
    root = target.parent if one else target
    candidates = [d.path for d in spool_directories(root) if not d.setting_up]
    if one:
        candidates = [p for p in candidates if p.resolve() == target.resolve()]
    writer = _writer(settings)
    replayed = []
    try:
        for orphan in spool.orphans(str(root)):
            if one and orphan.directory.resolve() != target.resolve():
                orphan.release()
                continue
            replayed.append(orphan.directory)
            _replay(orphan, writer, settings.batch_size)
    finally:
        writer.close()
    held = [p for p in candidates if p not in replayed]
    for path in held:
        print(f"{path.name}: held by a live worker, left alone")
    if not replayed and not held:
        print(f"{target}: no worker directory to replay")
    return FAIL if one and held else 0


def _replay(orphan: spool.OrphanSpool, writer: BatchWriter, batch_size: int) -> None:
    """Write one dead worker's directory, batch by batch, then remove it."""
    decode = msgspec.msgpack.Decoder(Event).decode
    name = orphan.directory.name
    print(f"{name}: replaying {len(orphan.segments)} segments, {_size(orphan.bytes)}",
          flush=True)
    total = WriteResult(0, 0, 0)
    try:
        while not orphan.finished:
            payloads, position = orphan.read(batch_size)
            if payloads:
                result = writer.write([decode(p) for p in payloads])
                total = WriteResult(*(a + b for a, b in zip(total, result)))
            orphan.advance(position)
    except WriteDeferred as ex:
        orphan.release()
        raise CommandFailed(f"{name}: PostgreSQL cannot take it now, the directory is kept "
                            f"(replaying again is safe): {ex}") from None
    except BaseException:
        orphan.release()
        raise
    orphan.remove()
    print(f"{name}: {sum(total)} events written ({total.inserted} stored, "
          f"{total.duplicates} already stored, {total.dead_lettered} dead-lettered); removed")


# --- firehose partitions ----------------------------------------------------------

def run_partitions(args: argparse.Namespace) -> int:
    """List the partitions of events; with --maintain, run one maintenance pass first."""
    settings = _settings()
    if args.maintain:
        # Imported here: the pipeline brings falcon and prometheus along.
        from collector.maintenance import Maintenance
        from collector.pipeline import MAINTENANCE_STATEMENT_TIMEOUT
        maintenance = Maintenance(
            functools.partial(connect, settings, autocommit=False,
                              statement_timeout=MAINTENANCE_STATEMENT_TIMEOUT),
            settings.rollup_keys, settings.partition_interval, settings.retention_days,
            metadata_index=settings.wants_metadata_index)
        try:
            done = maintenance.run_once(datetime.datetime.now(datetime.timezone.utc))
        except psycopg2.Error as ex:
            raise CommandFailed(f"maintenance failed: {_first_line(ex)}") from None
        print(f"maintenance: created {_names(done['partitions_created'])}; "
              f"dropped {_names(done['partitions_dropped'])}; "
              f"rollup keys added {_names(done['keys_added'])}")
    with opened(settings) as conn:
        found = partitions.sizes(conn)
    if not found:
        print("no partitions: events does not exist yet (the first worker creates it)")
        return 0
    print(f"{'PARTITION':<20}  {'FROM (UTC)':<22}  {'TO (UTC)':<22}  {'ROWS (EST.)':>11}  "
          f"{'SIZE':>10}")
    for part in found:
        start = part.start or ("(every other time)" if part.name == partitions.DEFAULT_PARTITION
                               else "?")
        rows = "?" if part.rows is None else str(part.rows)
        print(f"{part.name:<20}  {start:<22}  {part.end or '':<22}  {rows:>11}  "
              f"{_size(part.bytes):>10}")
    known = [p.rows for p in found if p.rows is not None]
    print(f"{len(found)} partition{'s' if len(found) != 1 else ''}, ~{sum(known)} rows, "
          f"{_size(sum(p.bytes for p in found))}"
          + ("; ?: not analyzed yet (ANALYZE events, or wait for autovacuum)"
             if len(known) < len(found) else ""))
    return 0


# --- Connections and formatting ---------------------------------------------------

def connect(settings: Settings, autocommit: bool = True,
            statement_timeout: float | None = None) -> psycopg2.extensions.connection:
    """Open a connection as the collector's writer does, bounded by its timeouts."""
    dsn = settings.database_url
    if "connect_timeout" not in psycopg2.extensions.parse_dsn(dsn):
        seconds = max(MIN_CONNECT_TIMEOUT, math.ceil(settings.connect_timeout))
        dsn = psycopg2.extensions.make_dsn(dsn, connect_timeout=seconds)
    try:
        return database.connect(dsn, statement_timeout or settings.statement_timeout,
                                settings.lock_timeout, application_name=APPLICATION_NAME,
                                autocommit=autocommit)
    except OSError as ex:
        host = psycopg2.extensions.parse_dsn(dsn).get("host")
        raise OSError(f"host {host!r} not found: {ex}") from ex


@contextlib.contextmanager
def opened(settings: Settings) -> Iterator[psycopg2.extensions.connection]:
    """Yield a connection for one command and close it; database errors fail the command."""
    try:
        conn = connect(settings)
    except CONNECT_ERRORS as ex:
        raise CommandFailed(f"database unreachable: {_first_line(ex)}") from None
    try:
        yield conn
    except psycopg2.Error as ex:
        raise CommandFailed(_first_line(ex)) from None
    finally:
        conn.close()


def _writer(settings: Settings) -> BatchWriter:
    return BatchWriter(functools.partial(connect, settings),
                       insert_method=settings.insert_method)


def _settings(require_database: bool = True) -> Settings:
    try:
        return Settings.from_environ(require_database=require_database)
    except SettingsError as ex:
        raise CommandFailed(str(ex)) from None


def _positive(text: str) -> int:
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return int(text)


def _first_line(ex: BaseException) -> str:
    lines = str(ex).strip().splitlines()
    return lines[0] if lines else type(ex).__name__


def _workers(count: int) -> str:
    return f"{count} worker{'s' if count != 1 else ''}"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _file_size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0  # released by its worker meanwhile


def _size(count: int) -> str:
    """Return a byte count for people: 512 B, 1.5 KiB, 20.0 GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    """Return a duration for people: 4 s, 12 min, 3 h 5 min, 2 d 1 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
