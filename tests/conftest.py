"""Fixture modules for the whole suite; the fixtures themselves live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.collector",
    "tests.fixtures.nginx",
    "tests.fixtures.pgbouncer",
    "tests.fixtures.prometheus",
    "tests.fixtures.browser",
    "tests.fixtures.replication",
]
