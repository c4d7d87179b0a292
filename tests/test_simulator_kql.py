"""The KQL subset the simulator evaluates, held to KQL's own rules (each departure is a false green).

KQL: ``==``/``!=`` are case-sensitive, ``=~``/``!~`` case-insensitive (learn.microsoft.com/kusto/
query/equals-cs-operator and equals-operator, "Applies to: Azure Monitor"); ``and`` binds every
comparison, ``or`` any one. Resource Graph speaks the same KQL. Answered without HTTP: the wire is
covered by tests/test_simulator.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.azure.logs import SPP_QUERY
from simulator import Estate, Simulator

VM_TYPE = "Resources | where type =~ 'microsoft.compute/virtualmachines'"
SUMMARY = "| summarize LastSeen=max(TimeGenerated), Events=count() by _ResourceId, Computer"


@pytest.fixture(scope="module")
def sim() -> Simulator:
    return Simulator(Estate.default())  # not started: the handlers are called directly


def _avma(sim: Simulator) -> set[str]:
    return {vm.id.lower() for vm in sim.estate.vms if vm.guest is not None and vm.guest.channel == "AVMA"}


def _log_rows(sim: Simulator, query: str) -> set[str]:
    logs = sim.server.logs
    parts = ["v1", "workspaces", logs.workspace_id, "query"]
    answer = logs.handle("POST", parts, json.dumps({"query": query}).encode(), token_audience=logs.audience)
    assert answer.status == 200, answer.body
    return {row[0] for row in answer.body["tables"][0]["rows"]}


def _graph(sim: Simulator, query: str, **scope: Any) -> tuple[int, Any]:
    answer = sim.server.graph.handle(json.dumps({"query": query, **scope}).encode())
    return answer.status, answer.body


def _graph_ids(sim: Simulator, query: str) -> list[str]:
    status, body = _graph(sim, query)
    assert status == 200, body
    return [row["id"] for row in body["data"]]


def test_the_engine_s_scan_finds_every_avma_vm(sim: Simulator) -> None:
    assert _log_rows(sim, SPP_QUERY) == _avma(sim) != set()


def test_log_analytics_equals_is_case_sensitive_and_tilde_equals_is_not(sim: Simulator) -> None:
    """A scan written ``Source == "microsoft-windows-security-spp"`` finds nothing in Azure: nor here."""
    exact = f'Event | where Source == "Microsoft-Windows-Security-SPP" {SUMMARY}'
    lower = f'Event | where Source == "microsoft-windows-security-spp" {SUMMARY}'
    tilde = f'Event | where Source =~ "microsoft-windows-security-spp" {SUMMARY}'
    differs = f'Event | where Source != "microsoft-windows-security-spp" {SUMMARY}'
    assert _log_rows(sim, exact) == _avma(sim)
    assert _log_rows(sim, lower) == set()
    assert _log_rows(sim, tilde) == _avma(sim)
    assert _log_rows(sim, differs) == _avma(sim)


def test_log_analytics_and_needs_every_comparison_or_any_one(sim: Simulator) -> None:
    both = f'Event | where EventLog == "Application" and Source == "Microsoft-Windows-Kernel" {SUMMARY}'
    either = f'Event | where EventLog == "Application" or Source == "Microsoft-Windows-Kernel" {SUMMARY}'
    assert _log_rows(sim, both) == set()
    assert _log_rows(sim, either) == _avma(sim)


def test_resource_graph_and_needs_every_comparison_or_any_one(sim: Simulator) -> None:
    vms = sorted(sim.estate.vms, key=lambda vm: vm.id)
    first = vms[0]
    other_group = next(vm for vm in vms if vm.resource_group.lower() != first.resource_group.lower())
    name, group = first.name, other_group.resource_group
    both = f"{VM_TYPE} | where name =~ '{name}' and resourceGroup =~ '{group}' | project id"
    either = f"{VM_TYPE} | where name =~ '{name}' or resourceGroup =~ '{group}' | project id"
    assert _graph_ids(sim, both) == []
    in_group = {vm.id for vm in vms if vm.resource_group.lower() == group.lower()}
    assert set(_graph_ids(sim, either)) == {first.id} | in_group


def test_resource_graph_equals_is_case_sensitive_and_tilde_equals_is_not(sim: Simulator) -> None:
    vm = next(vm for vm in sim.estate.vms if vm.name != vm.name.upper())
    assert _graph_ids(sim, f"{VM_TYPE} | where name == '{vm.name}'") == [vm.id]
    assert _graph_ids(sim, f"{VM_TYPE} | where name == '{vm.name.upper()}'") == []
    assert _graph_ids(sim, f"{VM_TYPE} | where name =~ '{vm.name.upper()}'") == [vm.id]


def test_resource_graph_refuses_subscriptions_and_management_groups_together(sim: Simulator) -> None:
    """QueryRequest leaves the combination undefined (resourcegraph.json, 2024-04-01) and Microsoft's
    clients never send it (Search-AzGraph: -Subscription and -ManagementGroup are separate parameter
    sets); the simulator refuses it rather than guess a union or an intersection."""
    sub = sim.estate.vms[0].subscription_id
    query = f"{VM_TYPE} | project id"
    status, body = _graph(sim, query, subscriptions=[sub], managementGroups=["mg-root"])
    assert status == 400 and body["error"]["details"][0]["code"] == "InvalidScope"
    assert _graph(sim, query, subscriptions=[sub])[0] == 200
    assert _graph(sim, query, managementGroups=["mg-root"])[0] == 200
