"""Shared pytest fixtures, and the environment a pytest-xdist worker runs the tests in."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from simulator import Estate, Simulator

# The terminal size variables as the person or script that started pytest set them (None: unset).
# pytest imports readline (_pytest/capture.py, _readline_workaround), and GNU readline exports
# COLUMNS=80 and LINES=24 into the process's C environment without os.environ knowing
# (pytest-dev/pytest#12888; python/cpython gh-46927): an xdist worker, a child of that process,
# starts with them in os.environ, and output that fits itself to COLUMNS (shared/output.py) wraps at
# 80 in a worker but not in a plain run. The controller hands its own values to each worker.
_TERMINAL_VARIABLES = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: what COLUMNS and LINES were when pytest started."""
    node.workerinput["terminal_variables"] = {name: os.environ.get(name) for name in _TERMINAL_VARIABLES}


def pytest_configure(config: pytest.Config) -> None:
    """xdist worker: COLUMNS and LINES as the controller had them, not readline's."""
    given = getattr(config, "workerinput", {}).get("terminal_variables")
    if given is None:
        return
    for name, value in given.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., Simulator]]:
    """Start simulators on demand (``sim_factory(estate, latency_s=…, page_size=…)``); all stop after."""
    started: list[Simulator] = []

    def start(estate: Estate | None = None, **options: Any) -> Simulator:
        sim = Simulator(estate if estate is not None else Estate.default(), **options).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def simulator(sim_factory: Callable[..., Simulator]) -> Simulator:
    """A running simulator of the default estate (fresh state for each test)."""
    return sim_factory()


@pytest.fixture(scope="session")
def azurite() -> Iterator[Any]:
    """Azurite for the whole session (started on first use, on free ports): ``connection_string``,
    ``queue_port``, ``table_port`` and ``restart()``. Tests isolate themselves by table/queue name."""
    from tests.azurite import AzuriteError, start_azurite

    try:
        server = start_azurite()
    except AzuriteError as error:
        pytest.fail(f"cannot start Azurite: {error}", pytrace=False)
    yield server
    server.close()


@pytest.fixture(scope="session")
def restartable_azurite(azurite: Any) -> Iterator[Any]:
    """A second Azurite for the tests that restart it (a storage loss): restarting the session's
    one would wipe other tests' queues and tables. Shared by those tests, which each start from a
    restart or from names of their own, so that it is started once, not once per test."""
    from tests.azurite import AzuriteError, start_azurite

    if not azurite.owned:
        pytest.skip("Azurite is external (AZURITE_CONNECTION_STRING); no private one is started")
    try:
        server = start_azurite()
    except AzuriteError as error:
        pytest.fail(f"cannot start Azurite: {error}", pytrace=False)
    yield server
    server.close()
