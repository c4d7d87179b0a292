"""Review r12c: the Resource Graph listing's paging, against the simulator and against answers the
simulator does not give (Resource Graph's documented ``resultTruncated``, an empty ``$skipToken``).

MicrosoftDocs/azure-docs ``articles/governance/resource-graph/concepts/work-with-data.md``
("Paging results"): ``resultTruncated`` "informs the consumer if there are more records not
returned in the response … also identified when the count property is less than the totalRecords
property … When resultTruncated is true, the $skipToken property isn't set"; pages are at most
1,000 records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from azure.identity.aio import ManagedIdentityCredential
from azure.mgmt.resourcegraph.models import QueryResponse

from shared.azure.inventory import Inventory, InventoryError
from shared.model import VmId
from shared.settings import Settings
from shared.sweep import sweep_inventory
from shared.vm import VmFacts
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB = "11111111-2222-4333-8444-555555555555"


def vm_id(name: str, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


def _row(name: str) -> dict[str, Any]:
    return {
        "id": vm_id(name),
        "name": name,
        "resourceGroup": "rg",
        "subscriptionId": SUB,
        "location": "westeurope",
        "tags": {},
        "osType": "Windows",
        "powerState": "PowerState/running",
    }


async def test_a_listing_of_150_vms_is_one_query_of_up_to_1000_rows(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default page is Resource Graph's largest (1,000 rows): 150 VMs are one query, where
    pages of 100 would be two (and at 10,000 VMs 100 queries, 7 quota windows of 15)."""
    estate = Estate.from_dict({"vms": [windows_vm(vm_id(f"vm-{i:03}")) for i in range(150)]})
    sim = sim_factory(estate, latency_s=0.01)
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with (
        ManagedIdentityCredential() as cred,
        Inventory(cred, Settings.from_env(sim.env())) as inventory,
    ):
        listed = [vm async for vm in inventory.list_vms()]
    assert len(listed) == 150
    queries = [q for q in sim.graph_queries() if q["kind"] == "list_vms"]
    assert [(q["top"], q["rows"]) for q in queries] == [(1000, 150)]


class _Graph:
    """Resource Graph's ``resources`` operation answering the given pages in turn."""

    def __init__(self, pages: list[QueryResponse]) -> None:
        self.pages = pages
        self.tokens: list[str | None] = []

    async def resources(self, request: Any, cls: Any) -> tuple[QueryResponse, Mapping[str, str]]:
        self.tokens.append(request.options.skip_token)
        return self.pages[len(self.tokens) - 1], {"x-ms-user-quota-remaining": "14"}


def _page(names: list[str], *, total: int, token: str | None, truncated: str = "false") -> QueryResponse:
    return QueryResponse(
        total_records=total,
        count=len(names),
        result_truncated=truncated,
        skip_token=token,
        data=[_row(n) for n in names],
    )


@pytest.fixture
def settings(sim_factory: Callable[..., Simulator]) -> Settings:
    return Settings.from_env(sim_factory(Estate.from_dict({"vms": []}), latency_s=0.01).env())


async def _listed(settings: Settings, graph: _Graph) -> list[str]:
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]
    try:
        return [vm.vm_id.name async for vm in inventory.list_vms()]
    finally:
        await inventory.close()


@pytest.mark.parametrize("last_token", [None, ""])
async def test_the_last_page_is_the_one_without_a_skip_token_absent_or_empty(
    settings: Settings, last_token: str | None
) -> None:
    graph = _Graph([_page(["a", "b"], total=3, token="t1"), _page(["c"], total=3, token=last_token)])
    assert await _listed(settings, graph) == ["a", "b", "c"]
    assert graph.tokens == [None, "t1"]


async def test_a_truncated_result_is_a_listing_error_not_a_silently_shorter_estate(
    settings: Settings,
) -> None:
    """``resultTruncated: true`` with fewer rows than ``totalRecords`` and no ``$skipToken``: the
    rows given are listed, then the listing fails (the sweep reports its scope as not listed),
    instead of a sweep that says nothing of the VMs it never saw."""
    graph = _Graph(
        [_page(["a", "b"], total=3, token="t1"), _page(["c"], total=5, token=None, truncated="true")]
    )
    listed: list[str] = []
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]

    async def drain() -> None:
        async for vm in inventory.list_vms():
            listed.append(vm.vm_id.name)

    with pytest.raises(InventoryError) as raised:
        await drain()
    await inventory.close()
    assert listed == ["a", "b", "c"]
    assert "3 of 5" in str(raised.value)


async def test_a_truncated_result_is_reported_by_the_sweep_as_a_listing_error(settings: Settings) -> None:
    from shared.model import Outcome, OutcomeKind

    graph = _Graph([_page(["a"], total=4, token=None, truncated="true")])
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]

    class Checker:
        async def check(self, vm: VmId, *, listed: VmFacts | None = None, **_: Any) -> Outcome:
            return Outcome(str(vm), OutcomeKind.HEALTHY, "licensed")

    async def no_unlisted() -> list[str]:
        return []

    inventory.unlisted_subscriptions = no_unlisted  # type: ignore[method-assign]
    report = await sweep_inventory(Checker(), inventory, concurrency=2)
    await inventory.close()
    assert len(report.outcomes) == 1
    assert report.listing_errors and all("1 of 4" in e for e in report.listing_errors.values())


async def test_a_vm_listed_on_two_pages_is_worked_on_once(settings: Settings) -> None:
    from shared.model import Outcome, OutcomeKind

    graph = _Graph([_page(["a", "b"], total=4, token="t1"), _page(["B", "c"], total=4, token=None)])
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]
    checked: list[str] = []

    class Checker:
        async def check(self, vm: VmId, *, listed: VmFacts | None = None, **_: Any) -> Outcome:
            checked.append(vm.name.lower())
            return Outcome(str(vm), OutcomeKind.HEALTHY, "licensed")

    async def no_unlisted() -> list[str]:
        return []

    inventory.unlisted_subscriptions = no_unlisted  # type: ignore[method-assign]
    report = await sweep_inventory(Checker(), inventory, concurrency=2)
    await inventory.close()
    assert sorted(checked) == ["a", "b", "c"] and len(report.outcomes) == 3


async def test_a_skip_token_given_twice_is_a_listing_error_not_the_end_of_the_estate(
    settings: Settings,
) -> None:
    """A page that hands back the token it was asked with would loop for ever; ending there quietly
    would leave every later VM out. The rows given are listed, then the listing fails."""
    graph = _Graph([_page(["a", "b"], total=6, token="t1"), _page(["c", "d"], total=6, token="t1")])
    listed: list[str] = []
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]

    async def drain() -> None:
        async for vm in inventory.list_vms():
            listed.append(vm.vm_id.name)

    with pytest.raises(InventoryError) as raised:
        await drain()
    await inventory.close()
    assert listed == ["a", "b", "c", "d"] and graph.tokens == [None, "t1"]
    assert "$skipToken" in str(raised.value)


async def test_a_query_without_ids_may_be_one_truncated_page(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The management group's subscriptions (``ResourceContainers``, no ``id`` projected) come in one
    page of at most 1,000 rows, ``resultTruncated`` beyond (work-with-data.md): that is no failed
    listing; the group's other subscriptions are asked one by one later (``in_scope``)."""
    sim = sim_factory(Estate.from_dict({"vms": []}), latency_s=0.01)
    env = {**sim.env(), "MANAGEMENT_GROUP_ID": "mg-big"}
    subs = [f"{i:08x}-abcd-4000-8000-000000000000" for i in range(3)]
    page = QueryResponse(
        total_records=1500,
        count=3,
        result_truncated="true",
        data=[{"subscriptionId": s} for s in subs],
    )
    inventory = Inventory(ManagedIdentityCredential(), Settings.from_env(env))
    inventory._sdk = lambda: _Graph([page])  # type: ignore[assignment,method-assign,return-value]
    try:
        assert await inventory.group_subscriptions() == subs
    finally:
        await inventory.close()
