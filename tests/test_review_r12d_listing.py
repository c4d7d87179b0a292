"""Review r12d: the simulator's Resource Graph serves a listing's later pages from its first page's
rows (p12, simulator/monitor.py; docs/simulator.md "a guess"). A token is the listing's only:
another query or another scope given the same token is answered from the estate, never from that
listing's rows; and the answers that open no later page (one page, a refused token) keep nothing,
so they cannot push a listing in progress out of the few the simulator keeps.
"""

from __future__ import annotations

import json
from typing import Any

from simulator import Estate, monitor
from simulator.arm import Compute
from simulator.monitor import ResourceGraph

WINDOWS = (
    "Resources | where type =~ 'microsoft.compute/virtualmachines' "
    "| where tostring(properties.storageProfile.osDisk.osType) =~ 'Windows' "
    "| project id, name, powerState = tostring(properties.extended.instanceView.powerState.code) "
    "| order by id asc"
)
RUNNING = (
    "Resources | where type =~ 'microsoft.compute/virtualmachines' "
    "| where tostring(properties.extended.instanceView.powerState.code) =~ 'PowerState/running' "
    "| project id, name, powerState = tostring(properties.extended.instanceView.powerState.code) "
    "| order by id asc"
)


def _graph() -> tuple[Compute, ResourceGraph]:
    estate = Estate.from_dict(
        # the simulator's own quota off: these tests ask more than 15 queries in 5 s
        {"generate": {"count": 40, "seed": 7, "subscriptions": 2}, "throttling": {"resourceGraph": "off"}}
    )
    sim = Compute(estate)
    return sim, ResourceGraph(sim)


def _ask(graph: ResourceGraph, query: str, options: dict[str, Any], **scope: Any) -> Any:
    return graph.handle(json.dumps({"query": query, "options": options, **scope}).encode())


def _rows(graph: ResourceGraph, query: str, options: dict[str, Any], **scope: Any) -> list[dict[str, Any]]:
    answer = _ask(graph, query, options, **scope)
    assert answer.status == 200, answer.body
    data: list[dict[str, Any]] = answer.body["data"]
    return data


def _whole(graph: ResourceGraph, query: str, **scope: Any) -> list[dict[str, Any]]:
    return _rows(graph, query, {"$top": 1000}, **scope)


def test_a_listing_s_token_given_with_another_query_or_scope_is_not_served_that_listing_s_rows() -> None:
    sim, graph = _graph()
    first = _ask(graph, WINDOWS, {"$top": 10})
    token = first.body["$skipToken"]
    windows, running = _whole(graph, WINDOWS), _whole(graph, RUNNING)
    assert windows != running  # the estate has VMs one query lists and the other does not
    # Another query with the Windows listing's token: the running VMs from offset 10, not Windows'.
    assert _rows(graph, RUNNING, {"$top": 10, "$skipToken": token}) == running[10:20]
    # The same query over one subscription: that subscription's VMs only.
    sub = sim.snapshot()[0].spec.subscription_id
    one = _whole(graph, WINDOWS, subscriptions=[sub])
    assert 0 < len(one) < len(windows)
    assert _rows(graph, WINDOWS, {"$top": 10, "$skipToken": token}, subscriptions=[sub]) == one[10:20]
    # The listing's own next page is still its own.
    assert _rows(graph, WINDOWS, {"$top": 10, "$skipToken": token}) == windows[10:20]


def test_one_page_answers_and_refused_tokens_do_not_evict_a_listing_in_progress() -> None:
    """A listing's first page, then more one-page queries than the simulator keeps listings (the
    function app resolves a computer name per event while the sweep lists), a refused token, and a
    VM of the first page deleted: the next page is still cut from the first page's rows, so no VM
    is skipped by the shift (before: the listing was pushed out, page 2 was cut from the estate as
    it now is, and the VM that moved into page 1's range was never listed)."""
    sim, graph = _graph()
    snapshot = _whole(graph, WINDOWS)
    first = _ask(graph, WINDOWS, {"$top": 10})
    assert first.body["data"] == snapshot[:10]
    token = first.body["$skipToken"]
    for _ in range(monitor._LISTINGS_KEPT + 1):
        assert "$skipToken" not in _ask(graph, RUNNING, {"$top": 1000}).body
        assert _ask(graph, RUNNING, {"$top": 10, "$skipToken": "not-a-token"}).status == 400
    sim.delete_vm(snapshot[0]["id"])
    assert _rows(graph, WINDOWS, {"$top": 10, "$skipToken": token}) == snapshot[10:20]
