"""Look at processes through /proc: a gunicorn or nginx master's workers, and whether a pid lives."""

import pathlib


def _state_and_parent(pid_dir: pathlib.Path) -> tuple[str, int] | None:
    try:
        fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def children(parent: int) -> list[int]:
    """Return the pids of the live (not zombie) children of `parent`, sorted."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _state_and_parent(entry)
            if stat is not None and stat[1] == parent and stat[0] != "Z":
                pids.append(int(entry.name))
    return sorted(pids)


def alive(pid: int) -> bool:
    """Tell whether `pid` is a running (not zombie) process."""
    stat = _state_and_parent(pathlib.Path(f"/proc/{pid}"))
    return stat is not None and stat[0] != "Z"
