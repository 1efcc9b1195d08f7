"""Suite-wide test settings.

The suite runs in parallel by default: ``addopts`` in pyproject.toml passes
``--numprocesses=auto --dist=loadgroup`` (pytest-xdist: one worker per core; tests marked
``xdist_group`` run on one worker, one after another). ``-n 0`` runs the suite serially in
this process, and so does ``-p no:xdist``, for which this file accepts and ignores the
two options that ``addopts`` still passes.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# Hypothesis fails an example that takes longer than its deadline (200 ms by default): on
# two cores shared with the rest of the suite (or other work) a slow example is load, not
# a bug. Examples and shrinking are unchanged.
settings.register_profile("fedlearn", deadline=None)
settings.load_profile("fedlearn")


# absl.logging (imported by dp-accounting) creates a handler on whatever sys.stderr is at
# import time: during collection, pytest's capture file. A later logging.config.dictConfig
# (uvicorn's, in the serving tests) closes every handler, and absl's close() spares only
# the *current* sys.stderr - under click's CliRunner that is another stream, so pytest's
# capture file was closed and every later test in the worker errored. Point the handler
# at the process's real stderr, which it never closes.
try:
    import absl.logging
except ImportError:  # the privacy extra is not installed
    pass
else:
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist", "pytest-xdist is disabled: these options are ignored")
    group.addoption("--numprocesses", dest="numprocesses", default=None)
    group.addoption("--dist", dest="dist", default="no")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run on one xdist worker (ignored)")
    # pytest imports readline before it captures output, and GNU readline exports
    # COLUMNS=80 and LINES=24 into the C environment when stdin is no terminal. os.environ
    # never sees them, but child processes inherit them: xdist's workers (whose rich
    # consoles would then be created 80 columns wide, whatever a test's COLUMNS says) and
    # any subprocess a test starts. Unset what os.environ does not have.
    for name in ("COLUMNS", "LINES"):
        if name not in os.environ:
            os.unsetenv(name)


# The longest tests (seconds on two busy cores), started first when the suite runs in
# parallel so that no worker is left with one of them at the end while the other idles.
# A name here that no longer matches changes nothing but the order.
SLOW_FIRST = (
    "tests/test_mnist_convergence.py",
    "tests/test_deploy_lifecycle.py",
    "tests/test_interrupts.py",
    "tests/test_chaos.py",
    "tests/test_deploy.py",
    "tests/test_deploy_fuzz.py",
    "tests/test_site_install.py",
    "tests/test_secagg_rounds.py::test_pool_moves_large_messages_both_ways_without_deadlock",
    "tests/test_deploy_faults.py",
    "tests/test_flower_adapter.py::test_flower_client_as_tls_sites_matches_in_process_simulation",
    "tests/test_serving_e2e.py",
    "tests/test_privacy_run.py::test_kill_9_mid_run_then_resume_keeps_the_epsilon_series",
    "tests/test_ui_browser.py",
)


def _slow_rank(item: pytest.Item) -> int:
    for rank, prefix in enumerate(SLOW_FIRST):
        if item.nodeid == prefix or item.nodeid.startswith(prefix + "::"):
            return rank
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # serial runs keep the file order
        items.sort(key=_slow_rank)  # stable: the rest keep their order
