"""The spool on a full disk (refuse with 503, lose nothing, recover alone) and on a spool
directory that cannot be written at start (stop once, with one line, no restart loop).

The full disks are small tmpfs filesystems mounted by the test, so those tests need root
(and a kernel that lets the test mount); they are skipped, with the reason, otherwise.
"""

import contextlib
import os
import pathlib
import re
import signal
import subprocess

import psycopg2
import pytest

from collector.pipeline import APP_LOAD_ERROR
from collector.spool import (Spool, SpoolDiskFull, SpoolPosition, SpoolUnwritable,
                             encode_record)
from tests.client import get_json, make_event, post_json, post_stream
from tests.fixtures.collector import GUNICORN, PROJECT_DIR, Collector
from tests.polling import wait_until

SMALL_DISK = 64 * 1024  # the tmpfs under a collector's spool: a few hundred events
TINY_DISK = 16 * 1024  # the tmpfs under a spool used in-process
MAX_APPENDS = 2000  # bound of the loops that fill a disk
STREAM_EVENTS = 3000  # far more than SMALL_DISK holds
STREAM_CONNECTIONS = 8
EXIT_TIMEOUT = 30  # seconds for gunicorn to give up on an unwritable spool directory
UNIT_FILE = PROJECT_DIR / "conf" / "firehose.service"


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
    """Mount a tmpfs at `path` for the block; skip the test when this machine can't."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "firehose-test", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach it


def fill(spool: Spool) -> tuple[list[bytes], SpoolDiskFull]:
    """Append events of varied sizes until the disk refuses one; return those taken and why."""
    taken = []
    for n in range(MAX_APPENDS):
        payload = b"e" * (200 + n % 7 * 61) + str(n).encode()
        try:
            spool.append([payload])
        except SpoolDiskFull as ex:
            return taken, ex
        taken.append(payload)
    raise AssertionError(f"{MAX_APPENDS} appends and the disk is still not full")


def exhaust_inodes(disk: pathlib.Path) -> list[pathlib.Path]:
    """Create empty files until the filesystem has no inode left; return them."""
    fillers = []
    with pytest.raises(OSError):
        for n in range(MAX_APPENDS):
            path = disk / f"filler-{n}"
            path.touch()
            fillers.append(path)
    return fillers


def on_disk(spool: Spool) -> int:
    """Return the bytes of the spool's segment files, as the filesystem sees them."""
    return sum(p.stat().st_size for p in spool.directory.glob("*.seg"))


@pytest.mark.parametrize("segment_bytes", [4096, 16 << 20], ids=["small-segments", "default"])
def test_a_full_disk_refuses_whole_events_and_gives_the_space_back(tmp_path, segment_bytes):
    with tmpfs(tmp_path / "disk", f"size={TINY_DISK}") as disk:
        spool = Spool(str(disk / "spool"), segment_bytes, max_bytes=1 << 30, fsync="never")
        spool.open()
        try:
            taken, refused = fill(spool)
            assert refused.limit == "spool_disk" and "full" in str(refused)
            assert taken, "the disk took nothing"
            assert spool.disk_problem() == "spool disk is full"
            # Nothing of the refused record stays: the files hold exactly the records taken.
            whole = sum(len(encode_record(p)) for p in taken)
            assert on_disk(spool) == spool.bytes == whole
            with pytest.raises(SpoolDiskFull):  # a batch is refused whole, too
                spool.append([b"b" * 300] * 3)
            assert on_disk(spool) == whole
            records, end = spool.read(SpoolPosition(1, 0), MAX_APPENDS)
            assert [r.payload for r in records] == taken and end == spool.end

            counts: dict[int, int] = {}
            for record in records:
                counts[record.segment] = counts.get(record.segment, 0) + 1
            for segment, count in counts.items():  # all of it is in PostgreSQL now
                spool.release(segment, count)
            assert spool.bytes == 0 and on_disk(spool) == 0, "drained, but the space is kept"
            assert spool.disk_problem() is None  # room again, without a write having passed
            position = spool.append([b"after"])[0]
            records, _ = spool.read(position, 10)
            assert [r.payload for r in records] == [b"after"]
            taken_again, _ = fill(spool)
            assert len(taken_again) >= len(taken) - 1  # the whole disk is usable again
        finally:
            spool.close()


def test_a_torn_write_that_cannot_be_cut_off_is_skipped(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "disk", f"size={TINY_DISK}") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"f" * 4096)  # freed later, to write after the torn bytes
        spool = Spool(str(disk / "spool"), 16 << 20, max_bytes=1 << 30, fsync="never")
        spool.open()
        try:
            def refuse(fd, length):
                raise OSError(5, "Input/output error")

            with monkeypatch.context() as patch:
                patch.setattr(os, "ftruncate", refuse)  # the torn write stays on disk
                taken, _ = fill(spool)
            whole = sum(len(encode_record(p)) for p in taken)
            assert on_disk(spool) == spool.bytes > whole, "no torn bytes to skip"
            filler.unlink()
            position = spool.append([b"after the torn bytes"])[0]
            assert position.offset == on_disk(spool) - len(encode_record(b"after the torn bytes"))
            records, _ = spool.read(SpoolPosition(1, 0), MAX_APPENDS)
            assert [r.payload for r in records] == taken + [b"after the torn bytes"]
        finally:
            spool.close()


def test_a_disk_full_at_start_is_not_fatal(tmp_path):
    # tmpfs directories and empty files take no space, but inodes: exhaust those.
    with tmpfs(tmp_path / "disk", f"size={TINY_DISK},nr_inodes=8") as disk:
        fillers = exhaust_inodes(disk)
        spool = Spool(str(disk), 4096, max_bytes=1 << 20, fsync="never")
        spool.open()  # does not raise: the worker serves 503s and its flusher drains others
        try:
            assert spool.disk_problem() == "spool disk is full"
            with pytest.raises(SpoolDiskFull):
                spool.append([b"early"])
            for path in fillers:
                path.unlink()
            position = spool.append([b"later"])[0]
            assert spool.disk_problem() is None
            assert [r.payload for r in spool.read(position, 10)[0]] == [b"later"]
        finally:
            spool.close()


def test_an_unwritable_spool_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    spool = Spool(str(tmp_path / "file" / "spool"), 4096, 1 << 20, fsync="never")
    with pytest.raises(SpoolUnwritable, match=re.escape(str(tmp_path / "file" / "spool"))):
        spool.open()


def wait_for_table(database) -> None:
    wait_until(lambda: database.query("SELECT to_regclass('events') IS NOT NULL")[0][0], 30,
               "the flusher to create the events table")


@pytest.fixture
def small_disk(spool_root):
    """A SMALL_DISK tmpfs where the collector's spool goes (spool_root/spool)."""
    with tmpfs(spool_root / "spool", f"size={SMALL_DISK}") as path:
        yield path


def test_a_full_disk_answers_503_and_recovers_without_a_restart(small_disk, start_collector,
                                                                database):
    collector = start_collector(workers=1)  # default 16 MiB segments: far above the disk
    wait_for_table(database)
    lock = psycopg2.connect(database.url)
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # held until rollback
        stream = post_stream(collector.url, STREAM_EVENTS, STREAM_CONNECTIONS, deadline_s=90)
        # No 500, no dropped connection (0): accepted, or refused for the disk.
        assert set(stream.statuses) == {202, 503}, stream.statuses
        refused = post_json(collector.url + "/event", make_event())
        assert refused.status == 503, refused
        assert refused.body["limit"] == "spool_disk", refused.body
        assert "disk" in refused.body["description"] and "full" in refused.body["description"]
        assert refused.headers["retry-after"].isdigit()
        status, ready = get_json(collector.url + "/ready")
        assert status == 503 and ready["problems"] == ["spool disk is full"], ready
        # (events cannot be counted here: the lock holds any reader of it back too)
        assert collector.health()["pending"] == len(stream.accepted), "flushed through a lock"
    finally:
        lock.rollback()
        lock.close()

    accepted = stream.accepted
    wait_until(lambda: database.count() >= len(accepted), 60, f"{len(accepted)} rows")
    stored = database.event_ids()
    assert len(stored) == len(set(stored)), "an event_id is stored twice"
    assert set(stored) == set(accepted), "an accepted event is missing, or a refused one stored"
    # The drained spool gave its space back: POSTs and /ready pass again, without a restart.
    wait_until(lambda: get_json(collector.url + "/ready")[0] == 200, 30, "/ready to be 200")
    after = post_json(collector.url + "/event", make_event())
    assert after.status == 202, after
    wait_until(lambda: after.body["event_id"] in database.event_ids(), 30, "the event after")
    free = os.statvfs(small_disk)
    assert free.f_bavail * free.f_frsize >= SMALL_DISK // 2, "the space was not given back"
    print(f"\nfull disk: {len(accepted)} of {len(stream.sent)} POSTs answered 202 on a "
          f"{SMALL_DISK // 1024} KiB spool disk, the rest 503; all stored once after")
    assert "Traceback" not in collector.output()


def test_a_disk_full_at_start_answers_503_until_it_has_room(spool_root, database):
    with tmpfs(spool_root / "spool", f"size={SMALL_DISK},nr_inodes=8") as disk:
        fillers = exhaust_inodes(disk)  # no worker can create its spool directory
        collector = Collector(database.url, disk, {}, workers=1)
        log = open(collector.log_path, "ab")
        collector.process = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{collector.port}"],
            cwd=PROJECT_DIR, env=collector.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until(lambda: get_json(collector.url + "/ready")[0] == 503, 30,
                       "the worker to answer /ready")
            assert get_json(collector.url + "/ready")[1]["problems"] == ["spool disk is full"]
            refused = post_json(collector.url + "/event", make_event())
            assert refused.status == 503 and refused.body["limit"] == "spool_disk", refused
            for path in fillers:
                path.unlink()
            wait_until(lambda: get_json(collector.url + "/ready")[0] == 200, 30,
                       "/ready to be 200 once the disk has room")
            accepted = post_json(collector.url + "/event", make_event())
            assert accepted.status == 202, accepted
            wait_until(lambda: database.event_ids() == [accepted.body["event_id"]], 30,
                       "the event accepted once the disk had room")
        finally:
            assert collector.terminate() == 0, collector.output()
    assert "Traceback" not in collector.output()


def read_only(path: pathlib.Path):
    """A spool directory that exists but cannot be written (a read-only mount when root)."""
    if os.geteuid() == 0:
        return tmpfs(path, "ro,size=64k")  # root writes through any mode bits
    path.mkdir()
    path.chmod(0o555)
    return contextlib.nullcontext(path)


def in_a_file(path: pathlib.Path):
    """A spool directory path that runs through a regular file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "file").write_text("not a directory")
    return contextlib.nullcontext(path.parent / "file" / "spool")


def run_gunicorn(collector: Collector, log_path: pathlib.Path) -> tuple[int, str]:
    """Run gunicorn until it exits by itself; return its exit status and output."""
    with open(log_path, "wb") as log:
        process = subprocess.run(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{collector.port}"],
            cwd=PROJECT_DIR, env=collector.env, stdout=log, stderr=subprocess.STDOUT,
            timeout=EXIT_TIMEOUT)
    return process.returncode, log_path.read_text(errors="replace")


@pytest.mark.parametrize("unwritable", [read_only, in_a_file], ids=["read-only", "in-a-file"])
def test_an_unwritable_spool_directory_stops_the_service_with_one_line(spool_root, database,
                                                                       unwritable):
    with unwritable(spool_root / "spool") as spool_dir:
        # Two workers: each failing alone, the second exit would meet a halting master.
        collector = Collector(database.url, spool_dir, {}, workers=2)
        status, output = run_gunicorn(collector, spool_root / "gunicorn.log")
    assert status == APP_LOAD_ERROR, output
    lines = [line for line in output.splitlines() if "cannot be written" in line]
    assert len(lines) == 1, output
    assert str(spool_dir) in lines[0] and f"exit status {APP_LOAD_ERROR}" in lines[0]
    assert "Traceback" not in output, output
    assert output.count("Booting worker") <= 1, output  # no boot loop (the master checks)
    # And systemd is told not to restart on that status.
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", UNIT_FILE.read_text(), re.M)
    assert prevent and str(APP_LOAD_ERROR) in prevent.group(1).split()


def test_a_bad_setting_stops_the_service_with_one_line(spool_root, database):
    collector = Collector(database.url, spool_root / "spool", {"COLLECTOR_BATCH_SIZE": "ten"},
                          workers=2)
    status, output = run_gunicorn(collector, spool_root / "gunicorn.log")
    assert status == APP_LOAD_ERROR, output
    assert output.count("COLLECTOR_BATCH_SIZE='ten': expected an integer >= 1") == 1, output
    assert "Traceback" not in output and "Booting worker" not in output, output


def test_a_worker_meeting_an_unwritable_spool_directory_stops_the_service(small_disk,
                                                                          start_collector):
    collector = start_collector(workers=1)
    [worker] = collector.worker_pids()
    master = collector.process.pid
    # Hold the master so it boots no replacement before the disk is read-only (a file still
    # open for writing would make the remount fail).
    os.kill(master, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        # Refused (busy) until the dead worker's files are closed.
        wait_until(lambda: subprocess.run(["mount", "-o", "remount,ro", str(small_disk)],
                                          capture_output=True).returncode == 0, 10,
                   "the spool's disk to be remounted read-only")
    finally:
        os.kill(master, signal.SIGCONT)
    assert collector.process.wait(timeout=EXIT_TIMEOUT) == APP_LOAD_ERROR, collector.output()
    output = collector.output()
    lines = [line for line in output.splitlines() if "cannot be written" in line]
    assert len(lines) == 1 and f"exit status {APP_LOAD_ERROR}" in lines[0], output
    assert str(small_disk) in lines[0] and '"collector.pipeline"' in lines[0], output
    assert "Traceback" not in output, output
    assert output.count("Booting worker") == 2, output  # the first, one replacement, no loop
