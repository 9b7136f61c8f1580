"""The benchmark's child processes: each in a process group of its own, always stopped.

Every program the benchmark starts (PostgreSQL aside, which pg_ctl runs) is a
`Child`: started in a new session so that Ctrl-C in the terminal reaches only the
benchmark, which then stops each child itself, and stopped by process group so
that nothing a child forked (gunicorn's workers, locust's processes) outlives it.
"""

import os
import pathlib
import resource
import signal
import socket
import subprocess
from typing import Callable, TypeVar

from tests import polling

T = TypeVar("T")

STOP_TIMEOUT = 40.0  # seconds a child may take to stop (above gunicorn's graceful_timeout)
KILL_TIMEOUT = 10.0  # seconds to wait for a process group after SIGKILL
WANTED_OPEN_FILES = 65_536  # 1000 connections need ~1000 fds in wrk and in each worker


class BenchError(RuntimeError):
    """The benchmark could not go on; the message says why."""


def raise_open_files_limit() -> int:
    """Raise this process's (and so its children's) open-files limit; return the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(WANTED_OPEN_FILES, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Tell whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Return the first truthy value of predicate(); raise BenchError naming `what` on timeout.

    A BenchError from the predicate (a server exited) ends the wait at once."""
    return polling.wait_until(predicate, timeout, what, give_up=(BenchError,),
                              failure=BenchError)


def tail(path: pathlib.Path, lines: int = 40) -> str:
    """Return the last lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One program started by the benchmark, its output going to a log file."""

    def __init__(self, name: str, command: list[str], log_path: pathlib.Path,
                 env: dict[str, str] | None = None, cwd: pathlib.Path | None = None) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """Return the process id (also its process group id)."""
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def start(self) -> "Child":
        """Start the program in a new session (its own process group)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                            start_new_session=True)
        return self

    def running(self) -> bool:
        """Tell whether the program is still running."""
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the program to end by itself; stop it and raise BenchError past timeout."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
            raise BenchError(f"{self.name} did not finish within {timeout:g} s; killed") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Send sig to the program, then SIGKILL its whole process group if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, sig)
                self.process.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                print(f"bench: {self.name} did not stop within {timeout:g} s; killing it")
                os.killpg(self.process.pid, signal.SIGKILL)  # still our group: not reaped yet
                self.process.wait(timeout=KILL_TIMEOUT)
        # Whatever the program left in its group (orphaned workers, forks) goes too.
        for pid in group_members(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def group_members(pgid: int) -> list[int]:
    """Return the live processes of a process group whose leader we have already reaped.

    The leader's own pid is left out: once reaped, that pid may be reused by a
    process that is not ours.
    """
    members = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry.name))
    return members


def run_bounded(name: str, command: list[str], timeout: float, log_path: pathlib.Path,
                env: dict[str, str] | None = None, cwd: pathlib.Path | None = None,
                ok_codes: tuple[int, ...] = (0,)) -> str:
    """Run a program to its end within timeout and return its output (also kept in log_path)."""
    start = log_path.stat().st_size if log_path.exists() else 0
    child = Child(name, command, log_path, env, cwd).start()
    try:
        code = child.wait(timeout)
    finally:
        child.stop()  # a no-op once it has ended, unless it left children behind
    with open(log_path, "rb") as log:
        log.seek(start)
        output = log.read().decode(errors="replace")
    if code not in ok_codes:
        raise BenchError(f"{name} exited with {code}:\n{output[-3000:]}")
    return output
