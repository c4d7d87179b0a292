"""Issue 12, item 3: the Functions path reuses one credential and one set of clients per process and
event loop. Work items go through the real function code (``function_app``'s ``vm_check``) against
the simulator's identity endpoint and ARM, with Azurite for the queue and ledger; the simulator's
record counts token requests (``token``) and the TLS connections requests came on
(``tls_connection``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.functions.queue import QueueMessage

from shared.clients import close_shared_clients, shared_clients
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm
from tests.test_function_app import user

SUB = "0b4c5d6e-7f80-4a91-8b2c-3d4e5f607182"
HEALTHY = [f"kms-{i:02d}" for i in range(6)]


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-reuse/providers/Microsoft.Compute/virtualMachines/{name}"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    estate = Estate.from_dict({"vms": [windows_vm(vm_id(name), channel="KMS_CLIENT") for name in HEALTHY]})
    with Simulator(estate, latency_s=0.02) as running:
        yield running


@pytest.fixture
def env(sim: Simulator, azurite: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The app settings a Functions host would have (as in tests/test_function_app.py)."""
    values = {
        **sim.env(),
        "AzureWebJobsStorage": azurite.connection_string,
        "REMEDIATION_MODE": "enforce",
        "LEDGER_TABLE": "reuse" + uuid.uuid4().hex[:12],
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def vm_check() -> Any:
    return user("vm_check")  # function_app's own function (get_functions() may run once per app)


def message(name: str) -> QueueMessage:
    body = json.dumps({"reason": "manual", "vmId": vm_id(name), "correlationId": f"reuse-{name}"})
    return QueueMessage(id=str(uuid.uuid4()), body=body.encode(), dequeue_count=1)


def requests(sim: Simulator, kind: str) -> int:
    return int(sim.counters()["requests"].get(kind, 0))


async def test_messages_one_after_another_make_one_token_request_over_one_tls_connection(
    env: dict[str, str], sim: Simulator
) -> None:
    handler = vm_check()
    for name in HEALTHY:
        await handler(message(name))
    # every message did its work (a VM read, a detection each), with one token and one connection
    assert sum(1 for entry in sim.run_logs().values() for _ in entry) == len(HEALTHY)
    assert requests(sim, "token") == 1
    assert requests(sim, "tls_connection") == 1
    assert requests(sim, "get") == len(HEALTHY)


async def test_messages_at_once_make_one_token_request_and_no_more_connections_than_at_once(
    env: dict[str, str], sim: Simulator
) -> None:
    handler = vm_check()
    for _ in range(2):
        await asyncio.gather(*(handler(message(name)) for name in HEALTHY))
    # a cold process, six invocations starting together: the first asks, the others wait for it
    assert requests(sim, "token") == 1
    # six invocations at a time, one request each at a time: the pool never needs more than six
    # connections, and the second wave reuses the first's (a client per message opens twelve)
    assert 1 <= requests(sim, "tls_connection") <= len(HEALTHY)
    assert requests(sim, "get") == 2 * len(HEALTHY)


def test_each_event_loop_has_its_own_set_closed_when_the_loop_ends(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)

    async def use() -> Any:
        clients = await shared_clients(settings)
        assert await shared_clients(settings) is clients  # one set per loop and settings
        clients.compute()._shared_transport()  # the gateway's session, opened as a first call would
        return clients

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert first is not second  # aiohttp sessions belong to their loop: never handed to another
    for clients in (first, second):
        # asyncio.run ended with loop.shutdown_asyncgens(), which closed the set inside its loop
        assert clients.closed
        assert clients._compute is None and clients._queues == {}


def test_other_settings_or_another_identity_get_another_set(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)

    async def sets() -> list[Any]:
        one = await shared_clients(settings)
        other_table = await shared_clients(Settings.from_env({**env, "LEDGER_TABLE": "othertable"}))
        other_identity = await shared_clients(settings, {**env, "AZURE_CLIENT_ID": str(uuid.uuid4())})
        again = await shared_clients(settings, env)
        return [one, other_table, other_identity, again]

    one, other_table, other_identity, again = asyncio.run(sets())
    assert len({id(one), id(other_table), id(other_identity)}) == 3
    assert again is one


async def test_an_explicit_close_closes_the_set_and_the_next_use_builds_a_new_one(
    env: dict[str, str],
) -> None:
    settings = Settings.from_env(env)
    clients = await shared_clients(settings)
    await close_shared_clients()
    assert clients.closed
    fresh = await shared_clients(settings)
    assert fresh is not clients and not fresh.closed


def test_the_simulator_issues_tokens_of_the_lifetime_it_is_given() -> None:
    """The chaos run's short-lived tokens (refreshes within a run); an hour by default."""
    from simulator.identity import TOKEN_LIFETIME_S, TokenIssuer

    for lifetime in (330.0, TOKEN_LIFETIME_S):
        issuer = TokenIssuer(lifetime_s=lifetime)
        before = time.time()
        token = issuer.issue()
        assert before + lifetime - 1 <= int(token["expires_on"]) <= time.time() + lifetime
        assert issuer.is_valid(token["access_token"])
    with pytest.raises(ValueError, match="lifetime must be positive"):
        TokenIssuer(lifetime_s=0)
