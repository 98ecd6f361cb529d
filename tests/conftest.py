"""Shared pytest configuration: the ``--long`` profile of the reliability tests.

``pytest`` runs the fast profile CI uses; ``pytest --long`` scales the case
counts of tests/reliability/ (kills, crash images, fuzz examples, model steps,
concurrency time) up by about ten.  See docs/reliability.md.
"""

from __future__ import annotations

import os

import pytest

# Read by tests/reliability/helpers.py (at import time, so that hypothesis
# settings chosen in decorators see it too) and inherited by child processes.
LONG_ENV = "REFSTORAGE_TEST_LONG"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False,
        help="run the long profile of the reliability tests (tests/reliability): "
             "about 10x the kills, crash images, fuzz examples and model steps")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        os.environ[LONG_ENV] = "1"
    config.addinivalue_line("markers", "reliability: crash, corruption, fault and bad-input tests")


@pytest.fixture(scope="session")
def long_profile(pytestconfig: pytest.Config) -> bool:
    """True under ``--long``."""
    return bool(pytestconfig.getoption("--long")) or os.environ.get(LONG_ENV) == "1"
