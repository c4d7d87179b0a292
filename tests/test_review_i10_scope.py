"""Review of issue 10, items 1 and 9: the CLI under ``MANAGEMENT_GROUP_ID``.

- Membership of the management group is asked of Resource Graph once per subscription in a run,
  not once per VM (on main a sweep of the 68-VM built-in estate sent 68 queries; at Resource
  Graph's quota of about 15 queries per 5 s, a 10,000-VM sweep would wait on it for most of an
  hour and fail VMs as ``scope-unknown`` once the inventory's retries were spent).
- A scope that cannot be checked is never assumed: with Resource Graph refusing, a VM named to
  ``check --apply`` ends ``failed: scope-unknown`` and no Run Command reaches it (a mutant that let
  it through survived every test on main).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.cli import _simulated_env, main
from shared.model import VmId
from shared.scope import PerSubscription
from simulator import Estate, Simulator

GROUP = "mg-servers"


def _point_at(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _simulated_env(sim.env()).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("MANAGEMENT_GROUP_ID", GROUP)
    monkeypatch.delenv("TARGET_SUBSCRIPTIONS", raising=False)


def test_a_management_group_sweep_asks_membership_once_per_subscription(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = Estate.default()
    with Simulator(estate, latency_s=0.0) as sim:
        _point_at(sim, monkeypatch)
        # each subscription named: on main the CLI lists "every subscription" under a management
        # group (ARM's subscription list, which the simulator does not serve), not the group's
        subs = [arg for sub in estate.subscriptions for arg in ("--subscription", sub)]
        code = main(["sweep", *subs, "--output", "json", "--retry-wait", "0"])
        asked = [q for q in sim.graph_queries() if q["kind"] == "subscriptions"]
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code in (1, 3)  # the estate has failed and deferred VMs on purpose
    vms = out["vms"]
    assert len(vms) == 68 and not any(v["reason"] in ("out-of-scope", "scope-unknown") for v in vms)
    subscriptions = {VmId.parse(v["id"]).subscription_id.lower() for v in vms}
    # The listing asks once whether Resource Graph sees each subscription given (shared/sweep.py,
    # NOT_LISTED), at those subscriptions; every other subscriptions query is the scope check's
    # membership, at the group.
    membership = [q for q in asked if q["managementGroups"]]
    listing = [q for q in asked if not q["managementGroups"]]
    assert [sorted(q["subscriptions"]) for q in listing] == [sorted(subscriptions)]
    assert all(q["managementGroups"] == [GROUP] for q in membership)
    assert 1 <= len(membership) <= len(subscriptions) == 3  # 68 before PerSubscription


def test_a_scope_that_cannot_be_checked_yet_defers_the_vm_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resource Graph throttled for the whole run: the VM is deferred (retried within the run, then
    exit 3, "retry later"), never assumed in scope, never a failure of the VM."""
    estate = Estate.default()
    with Simulator(estate, latency_s=0.0) as sim:
        _point_at(sim, monkeypatch)
        vm = next(vm_id for vm_id, s in sim.state_dump().items() if "avma" in vm_id.lower())
        sim.throttle_resource_graph(100, resets_after_s=0)
        code = main(["check", vm, "--apply", "--yes", "--output", "json", "--retry-wait", "0"])
        state = sim.state_dump()[vm]
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 3
    assert [(v["id"], v["outcome"], v["reason"]) for v in out["vms"]] == [(vm, "deferred", "throttled")]
    assert out["vms"][0]["scope"] == f"management group {GROUP}"  # what could not be checked
    assert not state["runCommands"] and not state["changed"]


def test_a_scope_throttled_for_a_moment_is_checked_again_within_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 6: throttled is retried within the run; the VM in scope is then checked as usual."""
    estate = Estate.default()
    with Simulator(estate, latency_s=0.0) as sim:
        _point_at(sim, monkeypatch)
        vm = next(vm_id for vm_id, s in sim.state_dump().items() if "avma" in vm_id.lower())
        # more than the up-front group check's and the scope check's own tries (azure-core's retry
        # policy): the first look at the VM is deferred, a retry of the run finds it in scope
        sim.throttle_resource_graph(8, resets_after_s=0)
        code = main(["check", vm, "--output", "json", "--retry-wait", "0.01"])
        statuses = [q.get("status") for q in sim.graph_queries()]
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0
    [only] = out["vms"]
    assert (only["outcome"], only["reason"], only["tries"]) == (
        "would-remediate",
        "avma-channel",
        2,
    )
    assert statuses.count(429) == 8 and statuses[-1] == 200


class _Counting:
    def __init__(self, fail_first: int = 0) -> None:
        self.asked: list[str] = []
        self._fail = fail_first

    async def in_scope(self, vm_id: VmId) -> bool:
        self.asked.append(vm_id.subscription_id)
        if self._fail:
            self._fail -= 1
            raise RuntimeError("Resource Graph said no")
        return vm_id.subscription_id.startswith("6")


async def test_the_answer_is_per_subscription_and_a_failure_is_not_remembered() -> None:
    def vm(sub: str, name: str) -> VmId:
        return VmId.parse(
            f"/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
        )

    inside, outside = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7", "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    inner = _Counting(fail_first=1)
    lookup = PerSubscription(inner)
    with pytest.raises(RuntimeError):
        await lookup.in_scope(vm(inside, "a"))
    assert await lookup.in_scope(vm(inside, "b")) is True  # asked again after the failure
    assert await lookup.in_scope(vm(inside.upper(), "c")) is True  # ARM ids ignore case
    assert await lookup.in_scope(vm(outside, "d")) is False
    assert await lookup.in_scope(vm(outside, "e")) is False
    assert inner.asked == [inside, inside, outside]
