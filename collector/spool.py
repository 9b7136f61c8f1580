"""The crash-safe spool: every accepted event is appended to a file before its 202.

Each worker owns a directory `<spool_dir>/<owner>/`, holds an exclusive flock on its
`lock` file for as long as it lives, and appends records to numbered segments
(`00000001.seg`, ...). A segment is deleted once every event in it is durable in
PostgreSQL. When a worker dies (SIGKILL, OOM, gunicorn's timeout kill) the kernel
releases its lock; any worker that can then take the lock owns the directory's
leftovers and replays them (`orphans()`), idempotently since `event_id` is unique.

A record is `MAGIC | length (u32) | crc32 (u32) | payload`. A torn record (a crash
mid-write) fails its length or checksum; readers skip to the next valid record, so the
records before and after it are kept.

A full disk refuses the event, never an accepted one: a write cut short (ENOSPC) is
truncated away before the refusal (SpoolDiskFull, a 503), so no record is half
written or half counted. A fully flushed active segment is truncated to nothing, so a
drained spool gives its space back, and the spool takes events again on its own once
the disk has room.

What it survives, by COLLECTOR_SPOOL_FSYNC:
  never     a process crash (the kernel's page cache outlives the process)
  interval  a power loss too, except the last COLLECTOR_SPOOL_FSYNC_INTERVAL seconds
  always    a power loss: a 202 is sent only after an fsync covering the event
            (fsyncs are shared by all requests waiting at that moment)
"""

import errno
import fcntl
import logging
import mmap
import os
import pathlib
import struct
import time
import uuid
import zlib
from typing import Iterator, NamedTuple

import gevent
import gevent.event

logger = logging.getLogger(__name__)

MAGIC = b"\xf1\xe5"
HEADER = struct.Struct("<2sII")
SEGMENT_SUFFIX = ".seg"
LOCK_NAME = "lock"
ABANDONED_SETUP_AGE = 60.0  # seconds after which a hidden, unlocked spool directory is litter
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Free space on the spool's filesystem, beyond the write that failed, before a full disk
# counts as having room again (for /ready; a POST simply tries its write): this many
# bytes, or this share of the filesystem if it is small.
DISK_HEADROOM = 1 << 20
DISK_HEADROOM_SHARE = 1 / 8


class SpoolFull(Exception):
    """The spool's disk budget is used up; the event was not accepted."""

    limit = "spool_max_bytes"  # what was exceeded, for the 503 body


class SpoolDiskFull(SpoolFull):
    """The spool's disk is full (or failing); the event was not accepted."""

    limit = "spool_disk"


class SpoolUnwritable(Exception):
    """The spool directory cannot be created or written (permissions, read-only, not a dir)."""


class SpoolPosition(NamedTuple):
    """Where a record starts: segment number and byte offset."""

    segment: int
    offset: int


class Record(NamedTuple):
    """One record read back from a spool."""

    segment: int
    payload: bytes


def encode_record(payload: bytes) -> bytes:
    """Frame a payload as a record: magic, length, checksum, payload."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(path: pathlib.Path, offset: int, limit: int,
                 end: int | None = None) -> tuple[list[bytes], int, int]:
    """Read up to `limit` records of one segment from `offset`.

    Return (payloads, next offset, corrupt bytes skipped). Reading stops at `end`
    (default: the file's size). Bytes that do not form a valid record, such as a
    torn record, are skipped up to the next valid one.
    """
    payloads: list[bytes] = []
    skipped = 0
    with open(path, "rb") as f:
        stop = end if end is not None else os.fstat(f.fileno()).st_size
        if stop <= offset:
            return payloads, offset, 0
        with mmap.mmap(f.fileno(), stop, access=mmap.ACCESS_READ) as data:
            pos = offset
            while len(payloads) < limit and pos < stop:
                if pos + HEADER.size <= stop:
                    magic, length, crc = HEADER.unpack_from(data, pos)
                    start, finish = pos + HEADER.size, pos + HEADER.size + length
                    if magic == MAGIC and finish <= stop:
                        payload = data[start:finish]
                        if zlib.crc32(payload) == crc:
                            payloads.append(payload)
                            pos = finish
                            continue
                # Not a valid record here: resynchronise on the next magic.
                found = data.find(MAGIC, pos + 1)
                jump = (found if found >= 0 else stop) - pos
                skipped += jump
                pos += jump
    return payloads, pos, skipped


class _Segment:
    """Bookkeeping for one segment file of the worker's own spool."""

    __slots__ = ("number", "path", "size", "records", "released")

    def __init__(self, number: int, path: pathlib.Path) -> None:
        self.number = number
        self.path = path
        self.size = 0
        self.records = 0
        self.released = 0


class Spool:
    """This worker's append-only spool: append before 202, release once committed."""

    def __init__(self, spool_dir: str, segment_bytes: int, max_bytes: int,
                 fsync: str = "interval", fsync_interval: float = 1.0) -> None:
        self.root = pathlib.Path(spool_dir)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.directory = self.root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._bytes = 0
        self._appended = 0  # records appended, ever
        self._synced = 0  # records known to be on disk (fsync policies only)
        self._sync_wanted = gevent.event.Event()
        self._sync_done = gevent.event.Event()
        self._syncer: gevent.Greenlet | None = None
        self._disk_problem: str | None = None  # why the last write failed, until it passes
        self._disk_needed = 0  # bytes of the write that failed
        self._disk_problem_since = 0.0

    @property
    def bytes(self) -> int:
        """Bytes of this worker's segments that are still on disk."""
        return self._bytes

    @property
    def end(self) -> SpoolPosition:
        """The position the next record will be written at."""
        assert self._active is not None
        return SpoolPosition(self._active.number, self._active.size)

    def open(self) -> None:
        """Create this worker's directory, take its lock and start the first segment.

        Raise SpoolUnwritable if the directory cannot be written. A full disk is not
        fatal: the spool refuses events (SpoolDiskFull) and tries again on each append,
        while the flusher goes on draining what other spools hold on that disk.
        """
        try:
            self._create()
        except OSError as ex:
            if ex.errno not in DISK_FULL_ERRNOS:
                raise SpoolUnwritable(f"spool directory {self.root} cannot be written: "
                                      f"{ex.strerror or ex}") from ex
            self._disk_failed(ex, 0)
        if self.fsync != "never":
            self._syncer = gevent.spawn(self._sync_loop)

    def _create(self) -> None:
        """Make, lock and start the directory; on a retry, go on from the step that failed.

        The directory is made and locked under a hidden name, then renamed into place:
        a sibling looking for dead workers' spools must never see it unlocked.
        """
        hidden = self.root / ("." + self.directory.name)
        if self._lock_fd is None:
            hidden.mkdir(parents=True, exist_ok=True)
            fd = os.open(hidden / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd
        if not self.directory.exists():
            hidden.rename(self.directory)
        if self._active is None:
            self._start_segment(1)

    def append(self, payloads: list[bytes]) -> list[SpoolPosition]:
        """Append records in one write, all or none.

        Raise SpoolFull if they exceed the budget, SpoolDiskFull if the disk cannot
        take them; either way nothing of them stays in the spool.
        """
        records = [encode_record(p) for p in payloads]
        size = sum(len(r) for r in records)
        if self._bytes + size > self.max_bytes:
            raise SpoolFull(f"its spool holds {self._bytes} bytes of its "
                            f"{self.max_bytes}-byte budget")
        data = b"".join(records)
        try:
            if self._active is None:
                self._create()  # the disk was full at start
            elif self._active.size + size > self.segment_bytes and self._active.size:
                self._rotate()
            self._write(data)
        except OSError as ex:
            raise self._disk_failed(ex, size) from ex
        if self._disk_problem is not None:
            self._disk_recovered()
        segment = self._active
        positions = []
        offset = segment.size
        for record in records:
            positions.append(SpoolPosition(segment.number, offset))
            offset += len(record)
        segment.size = offset
        segment.records += len(records)
        self._bytes += size
        self._appended += len(records)
        return positions

    def _write(self, data: bytes) -> None:
        """Write all of `data` at the active segment's end, or none of it (raise OSError)."""
        segment = self._active
        view = memoryview(data)
        done = 0
        try:
            # A full disk first takes part of a write (a short write), and only the next
            # write says why (ENOSPC): keep writing until done or refused.
            while done < len(data):
                written = os.write(self._fd, view[done:])
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except OSError:
            if done:
                self._cut(segment)
            raise

    def _cut(self, segment: _Segment) -> None:
        """Cut the active segment back to its last whole record, after a failed write."""
        try:
            os.ftruncate(self._fd, segment.size)
        except OSError as ex:
            # The torn bytes stay: count them, so that the next record's position is where
            # it really lands (O_APPEND); readers skip the torn bytes as corrupt.
            size = os.fstat(self._fd).st_size
            logger.error("spool %s: torn write of %d bytes not cut off: %s",
                         segment.path, size - segment.size, ex)
            self._bytes += size - segment.size
            segment.size = size

    def _disk_failed(self, ex: OSError, size: int) -> SpoolDiskFull:
        """Note that the disk refused a write of `size` bytes; return the error for the client."""
        if ex.errno in DISK_FULL_ERRNOS:
            problem, told = "spool disk is full", "the disk of its spool is full"
        else:
            problem = f"spool disk cannot be written ({ex.strerror or ex})"
            told = "the disk of its spool cannot be written"
        if self._disk_problem is None:
            self._disk_problem_since = time.monotonic()
            logger.error("%s: %s; events are refused (503) until it has room, spool %s "
                         "holds %d bytes", problem, ex, self.directory, self._bytes)
        self._disk_problem = problem
        self._disk_needed = size
        return SpoolDiskFull(told)

    def _disk_recovered(self) -> None:
        logger.warning("spool disk takes events again, after %.1f s of %r",
                       time.monotonic() - self._disk_problem_since, self._disk_problem)
        self._disk_problem = None

    def disk_problem(self) -> str | None:
        """Say why the spool's disk cannot take events now (full, failing), or None.

        Once the filesystem shows room for the refused write again, the problem is over
        even if no event has been written since (a load balancer may have stopped
        sending any, because /ready said so).
        """
        if self._disk_problem is None:
            return None
        try:
            disk = os.statvfs(self.root)
        except OSError:
            return self._disk_problem
        headroom = min(DISK_HEADROOM, disk.f_blocks * disk.f_frsize * DISK_HEADROOM_SHARE)
        room = disk.f_bavail * disk.f_frsize >= self._disk_needed + headroom
        if self._active is None and disk.f_files and not disk.f_favail:
            room = False  # not started yet: its directory and files need inodes too
        if room and not disk.f_flag & os.ST_RDONLY:
            self._disk_recovered()
        return self._disk_problem

    def wait_durable(self) -> None:
        """With fsync=always, return once every record appended so far is fsynced."""
        if self.fsync != "always":
            return
        target = self._appended
        while self._synced < target:
            done = self._sync_done
            self._sync_wanted.set()
            done.wait()

    def read(self, position: SpoolPosition, limit: int) -> tuple[list[Record], SpoolPosition]:
        """Read up to `limit` of this worker's records from `position` on, in order."""
        records: list[Record] = []
        number, offset = position
        while len(records) < limit and number in self._segments:
            segment = self._segments[number]
            payloads, offset, skipped = read_records(segment.path, offset,
                                                     limit - len(records), segment.size)
            if skipped:
                logger.error("spool %s: skipped %d corrupt bytes", segment.path, skipped)
            records.extend(Record(number, p) for p in payloads)
            if offset < segment.size or segment is self._active:
                break
            number, offset = number + 1, 0
        return records, SpoolPosition(number, offset)

    def release(self, segment_number: int, count: int) -> None:
        """Record that `count` events of a segment are durable in PostgreSQL."""
        segment = self._segments.get(segment_number)
        if segment is None:
            return
        segment.released += count
        if segment.released < segment.records:
            return
        if segment is not self._active:
            self._delete(segment)
        elif segment.size:
            self._recycle(segment)

    def close(self) -> bool:
        """Stop the spool; remove its directory if every event was released. Tell if removed."""
        if self._syncer is not None:
            self._syncer.kill()
        if self._fd is not None:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        empty = all(s.released >= s.records for s in self._segments.values())
        if empty and self.directory.exists():
            for segment in list(self._segments.values()):
                self._delete(segment)
            _remove_directory(self.directory)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return empty

    def _start_segment(self, number: int) -> None:
        path = self.directory / f"{number:08d}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._active = _Segment(number, path)
        self._segments[number] = self._active

    def _rotate(self) -> None:
        old, fd = self._active, self._fd
        if self.fsync != "never" and old.released < old.records:
            os.fsync(fd)  # a closed segment is whole on disk; the syncer only sees the new one
        self._start_segment(old.number + 1)  # if that fails, the old one stays active
        os.close(fd)
        if old.released >= old.records:
            self._delete(old)

    def _recycle(self, segment: _Segment) -> None:
        """Empty the active segment once all of it is in PostgreSQL, giving its bytes back.

        However small it is: on a full disk, a few drained KiB are what the next events
        need. Nothing refers to its records any more (all were taken and released), so
        the next one is written at offset 0 of the same segment.
        """
        try:
            os.ftruncate(self._fd, 0)
        except OSError as ex:
            logger.error("spool %s not emptied: %s", segment.path, ex)
            return
        self._bytes -= segment.size
        segment.size = segment.records = segment.released = 0

    def _delete(self, segment: _Segment) -> None:
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        self._bytes -= segment.size
        del self._segments[segment.number]

    def _sync_loop(self) -> None:
        """Fsync the active segment: on request (always) or every interval."""
        threadpool = gevent.get_hub().threadpool
        timeout = self.fsync_interval if self.fsync == "interval" else None
        while True:
            self._sync_wanted.wait(timeout)
            self._sync_wanted.clear()
            target = self._appended
            if target == self._synced:
                continue
            done, self._sync_done = self._sync_done, gevent.event.Event()
            try:
                # In a thread, so the worker's other greenlets run during the fsync.
                threadpool.apply(os.fsync, (self._fd,))
            except Exception as ex:  # waiters must be woken whatever happened
                logger.error("spool fsync failed: %s", ex)
            self._synced = target
            done.set()


class OrphanSpool:
    """The spool directory of a dead worker, locked by this worker while it replays it."""

    def __init__(self, directory: pathlib.Path, lock_fd: int) -> None:
        self.directory = directory
        self._lock_fd = lock_fd
        self.segments = sorted(directory.glob("*" + SEGMENT_SUFFIX))
        self.bytes = sum(p.stat().st_size for p in self.segments)
        self.position = SpoolPosition(0, 0)  # index into segments, offset

    def read(self, limit: int) -> tuple[list[bytes], SpoolPosition]:
        """Read up to `limit` records from the current position; return them and the next one."""
        index, offset = self.position
        payloads: list[bytes] = []
        while len(payloads) < limit and index < len(self.segments):
            found, offset, skipped = read_records(self.segments[index], offset,
                                                  limit - len(payloads))
            if skipped:
                logger.error("spool %s: skipped %d corrupt bytes", self.segments[index], skipped)
            payloads.extend(found)
            if len(payloads) < limit:
                index, offset = index + 1, 0
        return payloads, SpoolPosition(index, offset)

    def advance(self, position: SpoolPosition) -> None:
        """Mark everything before `position` as durable in PostgreSQL."""
        self.position = position

    @property
    def finished(self) -> bool:
        """Tell whether every record was read and advanced past."""
        return self.position.segment >= len(self.segments)

    def remove(self) -> None:
        """Delete the replayed directory and release its lock."""
        for path in self.segments:
            path.unlink(missing_ok=True)
        _remove_directory(self.directory)
        os.close(self._lock_fd)

    def release(self) -> None:
        """Give the directory back unfinished (another worker may take it)."""
        os.close(self._lock_fd)


def orphans(spool_dir: str, own: pathlib.Path | None = None) -> Iterator[OrphanSpool]:
    """Yield, locked, each spool directory whose owner is dead."""
    root = pathlib.Path(spool_dir)
    if not root.is_dir():
        return
    for directory in sorted(root.iterdir()):
        if directory == own or not directory.is_dir():
            continue
        try:
            fd = os.open(directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # its owner is alive
            continue
        if not directory.exists():  # removed by the worker that held it before us
            os.close(fd)
            continue
        if directory.name.startswith("."):
            # A worker setting up (it may not hold the lock yet), or one that died doing so,
            # before writing anything: remove it only when it is clearly abandoned.
            if time.time() - directory.stat().st_mtime > ABANDONED_SETUP_AGE:
                _remove_directory(directory)
            os.close(fd)
            continue
        yield OrphanSpool(directory, fd)


def _remove_directory(directory: pathlib.Path) -> None:
    for path in directory.iterdir():
        path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError as ex:
        logger.warning("spool directory %s not removed: %s", directory, ex)


def owner_alive(directory: pathlib.Path) -> bool:
    """Tell whether a live process holds a worker directory's lock; create and change nothing.

    Not for a hidden directory being set up: the shared lock, held for an instant, could
    make its worker's own exclusive lock fail.
    """
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock, if we got it
    return False
