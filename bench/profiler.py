"""Sample one gunicorn worker with py-spy while a scenario runs, to see where its time goes."""

import pathlib

from bench.processes import Child

MAX_SECONDS = 10  # of sampling
RATE = 100  # samples per second (py-spy's default)
FINISH_MARGIN = 30.0  # seconds past the sampling for py-spy to write its file
FORMATS = {"flamegraph": "svg", "speedscope": "json"}


class Profiler:
    """A py-spy record of one process, written to bench/profile-<pid>.<svg|json>."""

    def __init__(self, py_spy: str, pid: int, seconds: float, out_dir: pathlib.Path,
                 log_path: pathlib.Path, fmt: str = "flamegraph") -> None:
        self.seconds = max(1, min(MAX_SECONDS, round(seconds)))
        self.path = out_dir / f"profile-{pid}.{FORMATS[fmt]}"
        # --nonblocking: do not pause the worker for each sample, so the profile costs
        # the measured run little (at the price of an occasional torn stack).
        self.child = Child("py-spy", [py_spy, "record", "--pid", str(pid), "-d", str(self.seconds),
                                      "-r", str(RATE), "--nonblocking", "--format", fmt,
                                      "-o", str(self.path)], log_path)

    def start(self) -> "Profiler":
        """Begin sampling (py-spy needs ptrace: run as root or with CAP_SYS_PTRACE)."""
        self.child.start()
        return self

    def finish(self) -> pathlib.Path | None:
        """Wait for py-spy to write its file; return the path, or None if it failed."""
        code = self.child.wait(self.seconds + FINISH_MARGIN)
        return self.path if code == 0 and self.path.exists() else None

    def stop(self) -> None:
        """Stop py-spy if it still runs (on failure or Ctrl-C)."""
        self.child.stop()
