"""A project-local PostgreSQL for development, tests and benchmarks: initdb, start, stop.

    python -m storage.localdb start   # prints the DATABASE_URL to use
    python -m storage.localdb stop

It uses the machine's PostgreSQL binaries (PG_BIN, pg_config --bindir,
/usr/lib/postgresql/NN/bin, or PATH). PostgreSQL refuses to run as root, so as root
the server runs as the `postgres` system user, in a data directory that user owns.
With no binaries at all it installs Debian's `postgresql` package when it can
(root with apt-get), and otherwise says what to install.
"""

import argparse
import glob
import hashlib
import os
import pathlib
import pwd
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
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found.\n"
    "Install them, then run again:\n"
    "  Debian/Ubuntu: sudo apt-get install postgresql\n"
    "  Fedora:        sudo dnf install postgresql-server\n"
    "  macOS:         brew install postgresql@16\n"
    "or point PG_BIN at the directory holding initdb and pg_ctl,\n"
    "or set DATABASE_URL to a PostgreSQL you already run."
)


class LocalDatabaseError(RuntimeError):
    """The local PostgreSQL could not be set up; the message says why and what to do."""


def find_bin_dir(install: bool = True) -> pathlib.Path:
    """Return the directory of initdb and pg_ctl, installing them on Debian as root if absent."""
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
    for candidate in candidates:
        path = pathlib.Path(candidate)
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("localdb: installing Debian's postgresql package", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
        return find_bin_dir(install=False)
    raise LocalDatabaseError(INSTALL_HINT)


def default_data_dir() -> pathlib.Path:
    """Return where the local server keeps its data: var/ in the project, unless root can't.

    As root the server runs as `postgres`, which must reach the directory; when the
    project sits where it cannot (a private home), a directory in /var/tmp is used.
    """
    local = PROJECT_DIR / "var" / "postgres"
    if os.geteuid() != 0 or _user_can_reach(SERVER_USER, local.parent.parent):
        return local
    digest = hashlib.sha1(str(PROJECT_DIR).encode()).hexdigest()[:10]
    return pathlib.Path("/var/tmp") / f"firehose-postgres-{digest}"


def _user_can_reach(user: str, directory: pathlib.Path) -> bool:
    result = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(directory)],
                            capture_output=True)
    return result.returncode == 0


class LocalPostgres:
    """One PostgreSQL server with its own data directory and port on 127.0.0.1."""

    def __init__(self, data_dir: pathlib.Path, port: int = DEFAULT_PORT,
                 settings: dict[str, str] | None = None) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.port = port
        self.settings = settings or {}
        self.bin_dir = find_bin_dir()
        self.as_root = os.geteuid() == 0
        self.log_file = self.data_dir.parent / (self.data_dir.name + ".log")

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
            user = pwd.getpwnam(SERVER_USER)
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
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise LocalDatabaseError(f"{' '.join(command)} failed:\n{result.stdout}"
                                     f"{result.stderr}\n{log}")
        return result


def main(argv: list[str] | None = None) -> int:
    """Command line: start (prints DATABASE_URL), stop, or url."""
    parser = argparse.ArgumentParser(prog="python -m storage.localdb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "url"])
    parser.add_argument("--data-dir", type=pathlib.Path, default=None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("FIREHOSE_PG_PORT",
                                                                       DEFAULT_PORT)))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting for the server, e.g. --set fsync=off")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    try:
        server = LocalPostgres(args.data_dir or default_data_dir(), args.port, settings)
        if args.command == "start":
            print(server.start())
        elif args.command == "stop":
            server.stop()
        else:
            print(server.url())
    except LocalDatabaseError as ex:
        print(f"localdb: {ex}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
