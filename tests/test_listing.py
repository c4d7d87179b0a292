"""The sweep lists through Resource Graph: one paged query over the whole scope, management groups
honoured, the quota paced from its headers, subscriptions served in parallel lanes.

Driven through the real SDK clients and credential against the simulator over HTTPS, and the CLI
as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from azure.identity.aio import ManagedIdentityCredential

from shared.azure.compute import ComputeGateway
from shared.azure.inventory import Inventory
from shared.cli import main
from shared.lanes import SubscriptionLanes
from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import Settings
from shared.sweep import sweep, sweep_inventory
from shared.vm import VmFacts
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB_A = "11111111-2222-4333-8444-555555555555"
SUB_B = "66666666-7777-4888-8999-000000000000"
SUB_C = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"


def vm_id(sub: str, rg: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


ESTATE: dict[str, Any] = {
    "subscriptions": [SUB_A, SUB_B, SUB_C],
    "vms": [
        windows_vm(vm_id(SUB_A, "rg-App", "avma-app-01"), tags={"env": "prod", "owner": "app team"}),
        windows_vm(vm_id(SUB_A, "rg-App", "kms-app-02"), channel="KMS_CLIENT", location="northeurope"),
        windows_vm(vm_id(SUB_A, "rg-Old", "avma-old-03"), power="deallocated"),
        windows_vm(
            vm_id(SUB_B, "rg-b", "avma-b-01"), tags={"avma-remediator-opt-out": "true"}, agentReady=False
        ),
        {
            "id": vm_id(SUB_B, "rg-b", "lnx-b-02"),
            "os": "Linux",
            "powerState": "running",
            "agentReady": True,
            "tags": {},
        },
        windows_vm(vm_id(SUB_C, "rg-c", "avma-c-01")),
    ],
    "managementGroups": {"mg-prod": [SUB_A, SUB_B]},
}


@pytest.fixture
def sim(sim_factory: Callable[..., Simulator]) -> Simulator:
    return sim_factory(Estate.from_dict(ESTATE), latency_s=0.01)


@pytest.fixture
async def credential(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ManagedIdentityCredential]:
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred:
        yield cred


def settings(sim: Simulator, **env: str) -> Settings:
    return Settings.from_env({**sim.env(), **env})


async def test_one_paged_query_gives_the_gate_what_arm_would(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    """Every VM of the scope (Linux too), with the OS type, power state, tags, location, resource
    group and name a VM read gives; the agent is unknown (the gate reads the VM before acting)."""
    config = settings(sim)
    async with Inventory(credential, config, page_size=2) as inventory:
        listed = [vm async for vm in inventory.list_vms()]
    async with ComputeGateway(credential, config) as gateway:
        read = {str(vm.vm_id): await gateway.get_vm(vm.vm_id) for vm in listed}
    assert sorted(str(vm.vm_id) for vm in listed) == sorted(v["id"] for v in ESTATE["vms"])
    for vm in listed:
        arm = read[str(vm.vm_id)]
        assert (vm.os_type, vm.power_state, dict(vm.tags), vm.location) == (
            arm.os_type,
            arm.power_state,
            dict(arm.tags),
            arm.location,
        ), vm
        assert vm.agent_ready is None
        assert (vm.vm_id.resource_group, vm.vm_id.name) == (arm.vm_id.resource_group, arm.vm_id.name)
    queries = [q for q in sim.graph_queries() if q["kind"] == "list_vms"]
    assert len(queries) == math.ceil(len(ESTATE["vms"]) / 2)  # one query, paged
    assert all(q["status"] == 200 and q["subscriptions"] == [SUB_A, SUB_B, SUB_C] for q in queries)
    assert sim.counters()["requests"].get("list_all", 0) == 0  # no ARM list pages at all


def test_a_sweep_at_a_management_group_lists_only_its_subscriptions(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10, item 1: MANAGEMENT_GROUP_ID and no TARGET_SUBSCRIPTIONS is the group's scope, as in
    the app; a VM outside it is never listed, and nothing runs in it."""
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TARGET_SUBSCRIPTIONS")
    monkeypatch.delenv("AZURE_CLIENT_ID", raising=False)
    monkeypatch.setenv("MANAGEMENT_GROUP_ID", "mg-prod")
    code = main(["sweep", "--apply", "--yes", "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert {VmId.parse(v["id"]).subscription_id for v in out["vms"]} == {SUB_A, SUB_B}
    assert len(out["vms"]) == 5 and out["listingErrors"] == {}
    assert sim.run_log(vm_id(SUB_C, "rg-c", "avma-c-01")) == []
    by_name = {VmId.parse(v["id"]).name: v for v in out["vms"]}
    assert by_name["avma-app-01"]["outcome"] == "remediated"
    assert (by_name["avma-old-03"]["outcome"], by_name["avma-old-03"]["reason"]) == ("skipped", "not-running")
    assert by_name["lnx-b-02"]["reason"] == "not-windows"
    assert code == 0
    listings = [q for q in sim.graph_queries() if q["kind"] == "list_vms"]
    assert [(q["managementGroups"], q["subscriptions"]) for q in listings] == [(["mg-prod"], [])]
    # The scope check asks Resource Graph once per subscription, not once per VM.
    checks = Counter(q["kind"] for q in sim.graph_queries())
    assert checks["subscriptions"] <= 2

    # --subscription narrows the listing; a subscription outside the group stays out of scope.
    code = main(["sweep", "--apply", "--yes", "--output", "json", "--subscription", SUB_C])
    out = json.loads(capsys.readouterr().out)
    assert [(v["outcome"], v["reason"]) for v in out["vms"]] == [("skipped", "out-of-scope")]
    assert sim.run_log(vm_id(SUB_C, "rg-c", "avma-c-01")) == []


async def test_the_listing_paces_itself_on_the_quota_headers_instead_of_meeting_a_429(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resource Graph's quota (here 2 queries per 1-second window): once an answer says none is
    left, the next page waits ``x-ms-user-quota-resets-after``; no query is refused."""
    data = {**ESTATE, "throttling": {"timeScale": 1, "resourceGraph": {"queries": 2, "windowSeconds": 1}}}
    sim = sim_factory(Estate.from_dict(data), latency_s=0.01)
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    started = time.monotonic()
    async with ManagedIdentityCredential() as cred, Inventory(cred, settings(sim), page_size=1) as inventory:
        found = [str(vm) async for vm in inventory.windows_vms()]
    elapsed = time.monotonic() - started
    assert len(found) == 5  # the Windows VMs, one page each
    assert [q["status"] for q in sim.graph_queries()] == [200] * 5
    assert sim.throttling()["graph"] == {"requests": 5, "throttled": 0}
    assert elapsed >= 1.9  # two quota windows waited for, not three 429s


# ------------------------------------------------------------------ lanes


def _facts(sub: str, name: str) -> VmFacts:
    return VmFacts(VmId.parse(vm_id(sub, "rg", name)), "Windows", "running", None)


async def test_lanes_serve_subscriptions_in_turn_within_their_limits() -> None:
    limits = {SUB_A: 1, SUB_B: 5, SUB_C: 5}
    lanes = SubscriptionLanes(capacity=100, limit=lambda sub: limits[sub])
    for sub in (SUB_A, SUB_B, SUB_C):  # listed subscription by subscription, as Resource Graph does
        for i in range(3):
            await lanes.put(_facts(sub, f"vm-{i}"))
    await lanes.close()
    order = [vm async for vm in _drain(lanes, 5)]
    assert [vm.vm_id.subscription_id for vm in order] == [SUB_A, SUB_B, SUB_C, SUB_B, SUB_C]
    # SUB_A is at its limit (1 busy) until its VM is done.
    await lanes.done(order[0])
    nxt = await lanes.get()
    assert nxt is not None and nxt.vm_id.subscription_id == SUB_A


async def _drain(lanes: SubscriptionLanes, count: int) -> AsyncIterator[VmFacts]:
    for _ in range(count):
        vm = await lanes.get()
        assert vm is not None
        yield vm


async def test_lanes_hold_at_most_their_capacity_and_end_after_close() -> None:
    lanes = SubscriptionLanes(capacity=2)
    await lanes.put(_facts(SUB_A, "a"))
    await lanes.put(_facts(SUB_A, "b"))
    third = asyncio.create_task(lanes.put(_facts(SUB_A, "c")))
    await asyncio.sleep(0.01)
    assert not third.done() and len(lanes) == 2  # the producer waits
    assert await lanes.get() is not None
    await asyncio.wait_for(third, 1)
    await lanes.close()
    assert [await lanes.get(), await lanes.get()] != [None, None]
    assert await lanes.get() is None and await lanes.get() is None


class _Recorder:
    """A checker that records which subscription each VM it starts belongs to, and how many of a
    subscription run at once."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    async def check(self, vm: VmId, *, listed: VmFacts | None = None) -> Outcome:
        sub = vm.subscription_id
        self.started.append(sub)
        self.running[sub] += 1
        self.most[sub] = max(self.most[sub], self.running[sub])
        await asyncio.sleep(0.005)
        self.running[sub] -= 1
        return Outcome(str(vm), OutcomeKind.HEALTHY, "licensed")


async def test_a_sweep_spreads_its_workers_over_the_subscriptions() -> None:
    """Listed subscription by subscription, worked on in turn: the first VMs started come from every
    subscription, and a subscription never runs more VMs at once than its limit."""

    async def list_vms(sub: str) -> AsyncIterator[VmFacts]:
        for i in range(6):
            yield _facts(sub, f"vm-{i}")

    checker = _Recorder()
    report = await sweep(
        checker, list_vms, [SUB_A, SUB_B, SUB_C], concurrency=6, limit=lambda sub: 1 if sub == SUB_C else 6
    )
    assert len(report.outcomes) == 18
    assert set(checker.started[:3]) == {SUB_A, SUB_B, SUB_C}
    assert checker.most[SUB_C] == 1 and checker.most[SUB_A] > 1


class _FailingListing:
    """An inventory whose query fails after two VMs."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def list_vms(self) -> AsyncIterator[VmFacts]:
        yield _facts(SUB_A, "a")
        yield _facts(SUB_B, "b")
        raise self.error

    def listing_scope(self) -> list[str]:
        return ["managementGroups/mg-prod"]

    async def unlisted_subscriptions(self) -> list[str]:
        return []


async def test_a_failed_query_is_an_error_of_the_whole_scope_and_what_was_listed_is_worked_on() -> None:
    from shared.azure.inventory import InventoryUnavailable

    listing = _FailingListing(InventoryUnavailable("Resource Graph throttled", reason="throttled"))
    report = await sweep_inventory(_Recorder(), listing, concurrency=2)
    assert len(report.outcomes) == 2
    assert report.listing_errors == {"managementGroups/mg-prod": "throttled: Resource Graph throttled"}
