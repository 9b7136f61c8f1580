"""Install what the benchmark needs and the project does not: wrk, nginx, py-spy, the peer.

wrk and nginx come from Debian's packages (as root, with apt-get); py-spy from PyPI
into the project's virtualenv; the peer collector's packages from PyPI into a
virtualenv of its own. Each install is announced before it runs.
"""

import os
import pathlib
import shutil
import subprocess
import sys

from bench.processes import BenchError

APT_TIMEOUT = 600  # seconds for one apt-get command
PIP_TIMEOUT = 300
NGINX_PACKAGES = ("nginx-light", "nginx")  # the smallest first; Debian 13 has only nginx
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
NGINX_SERVICE_PID = pathlib.Path("/run/nginx.pid")
PEER_STAMP = ".installed"  # in the peer's virtualenv: the requirements it was built from


def find_program(name: str) -> str | None:
    """Return the path of a program, looking in the sbin directories too."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        path = pathlib.Path(directory) / name
        if path.exists():
            return str(path)
    return None


def _apt_get(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], env=env, timeout=APT_TIMEOUT,
                          capture_output=True, text=True)


def apt_install(packages: tuple[str, ...], program: str) -> str:
    """Install the first of packages that exists, as root; return the program's path."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"{program} is not installed; install it (Debian: apt-get install "
                         f"{packages[0]}) and run again")
    updated = False
    for package in packages:
        print(f"bench: installing {package} (apt-get install -y {package})", flush=True)
        result = _apt_get("install", "-y", "-q", package)
        if result.returncode != 0 and not updated:
            print("bench: apt-get update, then trying again", flush=True)
            _apt_get("update", "-q")
            updated = True
            result = _apt_get("install", "-y", "-q", package)
        if result.returncode == 0 and find_program(program):
            return find_program(program)
        print(f"bench: {package} could not be installed:\n{result.stderr[-1000:]}", flush=True)
    raise BenchError(f"could not install {program} from any of: {', '.join(packages)}")


def ensure_wrk() -> str:
    """Return wrk's path, installing Debian's wrk package if it is missing."""
    return find_program("wrk") or apt_install(("wrk",), "wrk")


def ensure_nginx() -> str:
    """Return nginx's path, installing nginx-light if it is missing.

    Where no policy-rc.d forbids it, the package starts the system's nginx service;
    that one is not ours to keep, so it is stopped again at once.
    """
    path = find_program("nginx")
    if path:
        return path
    service_was_running = NGINX_SERVICE_PID.exists()
    path = apt_install(NGINX_PACKAGES, "nginx")
    if not service_was_running and NGINX_SERVICE_PID.exists():
        print("bench: stopping the nginx service the package started", flush=True)
        subprocess.run([path, "-s", "quit"], timeout=30, capture_output=True)
    return path


def ensure_py_spy(venv_bin: pathlib.Path) -> str:
    """Return py-spy's path, installing it into the virtualenv if it is missing."""
    path = venv_bin / "py-spy"
    if path.exists():
        return str(path)
    found = shutil.which("py-spy")
    if found:
        return found
    print(f"bench: installing py-spy ({venv_bin / 'pip'} install py-spy)", flush=True)
    subprocess.run([str(venv_bin / "python"), "-m", "pip", "install", "--quiet", "py-spy"],
                   check=True, timeout=PIP_TIMEOUT, stdout=sys.stdout, stderr=sys.stderr)
    return str(path)


def ensure_python_package(venv_bin: pathlib.Path, module: str, requirement: str) -> None:
    """Install a bench-only package (e.g. matplotlib==3.11.2) into the virtualenv if missing."""
    probe = subprocess.run([str(venv_bin / "python"), "-c", f"import {module}"],
                           capture_output=True)
    if probe.returncode == 0:
        return
    print(f"bench: installing {requirement} ({venv_bin / 'pip'} install {requirement})",
          flush=True)
    subprocess.run([str(venv_bin / "python"), "-m", "pip", "install", "--quiet", requirement],
                   check=True, timeout=PIP_TIMEOUT, stdout=sys.stdout, stderr=sys.stderr)


def ensure_peer_venv(venv: pathlib.Path, requirements: pathlib.Path) -> pathlib.Path:
    """Return the peer's virtualenv, building it from requirements if it is missing or older.

    Its own, not the project's: FastAPI, uvicorn and asyncpg are no part of Firehose.
    """
    wanted = requirements.read_text()
    stamp = venv / PEER_STAMP
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    steps = [] if (venv / "bin" / "python").exists() else [
        ("creating the peer's virtualenv", [sys.executable, "-m", "venv", str(venv)])]
    steps.append(("installing the peer's packages",
                  [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                   "-r", str(requirements)]))
    for what, command in steps:
        print(f"bench: {what} ({' '.join(command)})", flush=True)
        if subprocess.run(command, timeout=PIP_TIMEOUT, stdout=sys.stdout,
                          stderr=sys.stderr).returncode != 0:
            raise BenchError(f"{what} failed: {' '.join(command)}")
    stamp.write_text(wanted)
    return venv
