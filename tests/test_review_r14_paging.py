"""Review r14: mutants of r12c's listing and pacer fixes that no test killed.

MicrosoftDocs/azure-docs articles/governance/resource-graph/concepts/work-with-data.md ("Paging
results"): ``resultTruncated`` says records were not returned, "also identified when the count
property is less than the totalRecords property"; a query that projects ``id`` is paged.
"""

from __future__ import annotations

import pytest
from azure.identity.aio import ManagedIdentityCredential

from shared.azure.inventory import Inventory, InventoryError
from shared.azure.pacing import Pacer
from shared.settings import Settings
from tests.test_review_r12c_listing import _Graph, _listed, _page, settings  # noqa: F401
from tests.test_throttle_pacing import FakeTime

SUB = "11111111-2222-4333-8444-555555555555"
READS = "x-ms-ratelimit-remaining-subscription-reads"


async def test_a_truncated_mark_on_every_row_matched_is_the_whole_estate(settings: Settings) -> None:  # noqa: F811
    """``resultTruncated: true`` with as many rows as ``totalRecords`` lost nothing: listed, no error
    (kills ``rows >= total`` -> ``rows > total``)."""
    graph = _Graph([_page(["a"], total=2, token="t1"), _page(["b"], total=2, token=None, truncated="true")])
    assert await _listed(settings, graph) == ["a", "b"]


async def test_a_truncated_result_without_a_total_is_a_listing_error(settings: Settings) -> None:  # noqa: F811
    """No ``totalRecords`` to compare with: a result Resource Graph says it truncated is not taken as
    complete (kills a check that reads a missing total as 0)."""
    graph = _Graph([_page(["a"], total=1, token=None, truncated="true")])
    graph.pages[0].total_records = None  # type: ignore[assignment]
    with pytest.raises(InventoryError):
        await _listed(settings, graph)


async def test_the_windows_listing_is_checked_for_truncation_too(settings: Settings) -> None:  # noqa: F811
    """The Windows VMs' listing (the sweep's) fails on a truncated result as the full listing does."""
    graph = _Graph([_page(["a"], total=3, token=None, truncated="true")])
    inventory = Inventory(ManagedIdentityCredential(), settings)
    inventory._sdk = lambda: graph  # type: ignore[assignment,method-assign,return-value]
    listed: list[str] = []

    async def drain() -> None:
        async for vm in inventory.windows_vms():
            listed.append(vm.name)

    try:
        with pytest.raises(InventoryError):
            await drain()
    finally:
        await inventory.close()
    assert listed == ["a"]


async def test_a_held_request_is_not_counted_as_sent() -> None:
    """A request the pacer refuses for a wait beyond ``max_wait_s`` never went: ``sent`` and
    ``requests`` (bench/sweep.py's ARM bound reads ``sent``) count only the two that did."""
    fake = FakeTime()
    pacer = Pacer(
        concurrency=4,
        clock=fake.clock,
        sleep=fake.sleep,
        max_wait_s=5.0,
        hold_error=lambda s, k, w: RuntimeError("held"),
    )
    await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 429, {READS: "240", "Retry-After": "1200"})
    with pytest.raises(RuntimeError):
        await pacer.before(SUB, "reads")
    assert pacer.sent[(SUB, "reads")] == 1 and pacer.requests[SUB] == 1
    assert pacer.held[SUB] == 1
    fake.now += 1200
    await pacer.before(SUB, "reads")
    assert pacer.sent[(SUB, "reads")] == 2 and pacer.requests[SUB] == 2


async def test_a_skip_token_that_comes_back_after_another_is_a_listing_error_not_a_loop(
    settings: Settings,  # noqa: F811
) -> None:
    """Tokens t1, t2, t1: following them would list a, b, c, b, c, ... for ever (the check compared
    only with the token just asked for); the third page's token is refused after its rows."""
    graph = _Graph(
        [
            _page(["a"], total=9, token="t1"),
            _page(["b"], total=9, token="t2"),
            _page(["c"], total=9, token="t1"),
        ]
    )
    with pytest.raises(InventoryError) as raised:
        await _listed(settings, graph)
    assert raised.value.code == "SkipTokenRepeated"
    assert graph.tokens == [None, "t1", "t2"]
