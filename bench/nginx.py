"""nginx for the benchmark: answering 202 by itself (the reference), or proxying to Firehose.

The reference is nginx with `return 202`: the most this machine's HTTP stack gives,
which every other figure is compared with. The proxy uses the project's
conf/nginx.conf when there is one, with its listen port, upstream address and log
and pid paths rewritten to the benchmark's own; if that file cannot be used here
(`nginx -t` fails), a minimal proxy with upstream keep-alive stands in, and the
benchmark says so.
"""

import os
import pathlib
import pwd
import re
import signal
import subprocess

from bench.processes import BenchError, Child, port_open, tail, wait_until

START_TIMEOUT = 20.0
TEST_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
WORKER_CONNECTIONS = 4096  # per nginx worker; 1000 proxied clients use 2000
UPSTREAM_KEEPALIVE = 64  # idle connections kept open to gunicorn per nginx worker
# Shorter than gunicorn's keepalive (15 s), so nginx closes idle connections first (docs/gevent-and-psycopg2.md).
UPSTREAM_KEEPALIVE_TIMEOUT = "10s"
CLIENT_MAX_BODY_SIZE = "6m"  # above the collector's 5 MiB batch limit
# The upstream address the project's file points at (gunicorn.conf.py's default bind).
PROJECT_UPSTREAM = re.compile(r"^([^#\n]*\bserver\s+)(?:127\.0\.0\.1|localhost):8000\b",
                              re.MULTILINE)
REFERENCE_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{
            return 202 '{{"status":"accepted"}}';
        }}
    }}
"""
MINIMAL_PROXY_SERVER = """
    upstream firehose {{
        server 127.0.0.1:{upstream_port};
        keepalive {keepalive};
        keepalive_timeout {keepalive_timeout};
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size {max_body};
        location / {{
            proxy_pass http://firehose;
            proxy_http_version 1.1;         # upstream keep-alive needs HTTP/1.1 ...
            proxy_set_header Connection ""; # ... and no "Connection: close"
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
"""
# Directives the benchmark rewrites, matched on their own lines (never in comments).
# Main-context ones of a full nginx.conf are replaced by the benchmark's own.
OWN_MAIN_DIRECTIVES = re.compile(r"^\s*(user|pid|daemon|error_log)\s[^;\n]*;", re.MULTILINE)
# Includes that would pull in the machine's own sites (Debian's default listens on :80).
SITE_INCLUDES = re.compile(r"^\s*include\s+\S*(sites-enabled|conf\.d)\S*\s*;", re.MULTILINE)
LISTEN = re.compile(r"^([^#\n]*?)\blisten\s[^;\n]+;", re.MULTILINE)
ACCESS_LOG = re.compile(r"^([^#\n]*?\baccess_log\s+)(?!off\b)[^\s;]+", re.MULTILINE)
# The project's rate limits would refuse most of a load sent from one address: the
# benchmark measures the collector, so they are taken out (their zones stay, unused).
RATE_LIMITS = re.compile(r"^\s*limit_req\s[^;\n]*;", re.MULTILINE)

def _worker_user() -> str:
    """Return the user nginx's workers run as when started by root."""
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


class Nginx:
    """One nginx master with a generated configuration in a directory of its own."""

    def __init__(self, name: str, binary: str, directory: pathlib.Path, port: int) -> None:
        self.name = name
        self.binary = binary
        self.directory = directory
        self.port = port
        self.config_path = directory / "nginx.conf"
        self.error_log = directory / "error.log"
        self.source = "generated"
        self.child: Child | None = None
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)  # nginx's workers (www-data) reach their temp paths here

    def _main_context(self) -> str:
        d = self.directory
        user = f"user {_worker_user()};\n" if os.geteuid() == 0 else ""
        return (f"{user}daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n")

    def _http_context(self) -> str:
        d = self.directory
        return "".join(f"    {kind}_temp_path {d}/{kind}_temp;\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))

    def _wrap(self, servers: str) -> str:
        return (f"{self._main_context()}worker_processes auto;\n"
                f"events {{ worker_connections {WORKER_CONNECTIONS}; }}\n"
                f"http {{\n    access_log off;\n{self._http_context()}{servers}}}\n")

    def configure_reference(self) -> None:
        """Write the configuration of nginx answering 202 by itself."""
        self.config_path.write_text(self._wrap(REFERENCE_SERVER.format(port=self.port)))
        self.source = "generated: return 202"

    def configure_proxy(self, upstream_port: int, project_conf: pathlib.Path) -> list[str]:
        """Write a proxy configuration, from project_conf if it works here; return warnings."""
        warnings = []
        if project_conf.exists():
            text = project_conf.read_text()
            if PROJECT_UPSTREAM.search(text):
                self.config_path.write_text(self._rewrite(text, upstream_port))
                problem = self.test()
                if problem is None:
                    self.source = f"{project_conf} (ports and paths rewritten, rate limits off)"
                    return warnings
                warnings.append(f"{project_conf} does not work here ({problem}); "
                                "using a minimal proxy instead")
            else:
                warnings.append(f"{project_conf} has no upstream 127.0.0.1:8000 to point at "
                                "the benchmark's gunicorn; using a minimal proxy instead")
        self.config_path.write_text(self._wrap(MINIMAL_PROXY_SERVER.format(
            port=self.port, upstream_port=upstream_port, keepalive=UPSTREAM_KEEPALIVE,
            keepalive_timeout=UPSTREAM_KEEPALIVE_TIMEOUT, max_body=CLIENT_MAX_BODY_SIZE)))
        self.source = "generated: minimal proxy with upstream keepalive"
        return warnings

    def _rewrite(self, text: str, upstream_port: int) -> str:
        """Point a project configuration at the benchmark's ports, logs and temp paths."""
        text = PROJECT_UPSTREAM.sub(rf"\g<1>127.0.0.1:{upstream_port}", text)
        text = LISTEN.sub(rf"\g<1>listen 127.0.0.1:{self.port};", text)
        text = ACCESS_LOG.sub(rf"\g<1>{self.directory}/access.log", text)
        text = SITE_INCLUDES.sub("", text)
        text = RATE_LIMITS.sub("", text)
        if not re.search(r"^\s*http\s*\{", text, re.MULTILINE):
            return self._wrap(text)  # a file of server/upstream blocks for http {}
        text = OWN_MAIN_DIRECTIVES.sub("", text)
        text = re.sub(r"^(\s*http\s*\{)", lambda m: m.group(1) + "\n" + self._http_context(),
                      text, count=1, flags=re.MULTILINE)
        return self._main_context() + text

    def test(self) -> str | None:
        """Check the configuration with `nginx -t`; return the error, or None if it is fine."""
        result = subprocess.run([self.binary, "-t", "-q", "-p", str(self.directory),
                                 "-e", str(self.error_log), "-c", str(self.config_path)],
                                capture_output=True, text=True, timeout=TEST_TIMEOUT)
        if result.returncode == 0:
            return None
        lines = (result.stderr + result.stdout).strip().splitlines()
        return lines[0] if lines else f"exit {result.returncode}"

    def start(self) -> "Nginx":
        """Start nginx in the foreground (as a child) and wait until it accepts connections."""
        self.child = Child(f"nginx ({self.name})",
                           [self.binary, "-p", str(self.directory), "-e", str(self.error_log),
                            "-c", str(self.config_path)],
                           self.directory / "stdout.log").start()
        wait_until(self._listening, START_TIMEOUT, f"nginx ({self.name}) on port {self.port}")
        return self

    def _listening(self) -> bool:
        if not self.child.running():
            raise BenchError(f"nginx ({self.name}) exited at start:\n{tail(self.error_log)}")
        return port_open(self.port)

    def stop(self) -> None:
        """Stop nginx (SIGQUIT: graceful), killing it past the timeout."""
        if self.child is not None:
            self.child.stop(signal.SIGQUIT, timeout=STOP_TIMEOUT)
