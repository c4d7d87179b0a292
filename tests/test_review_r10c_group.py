"""Review r10c of issue 10, item 1: the CLI reaches only ``MANAGEMENT_GROUP_ID``'s subscriptions.

Findings fixed here (each test below fails on the code before the fix):

- A management group Resource Graph refuses (no such group, or no read access: 403
  ``AuthorizationFailed``) made ``sweep`` exit 1 with one stderr line that said only "Please
  provide below info when asking for support" (Resource Graph's top-level message; its reason is in
  ``details``), and made ``check`` exit 1 with ``failed: scope-unknown`` and nothing on stderr. A
  group in which Resource Graph sees no subscription swept nothing and exited 0. Now the group is
  asked once before any VM: exit 2 with what to fix (``shared/cli.py``, ``_check_group``).
- Any Resource Graph error shown on one line now leads with the reason from ``details``
  (``shared/azure/inventory.py``, ``_service_words``).

The rest hold the scope on every path an operator relies on, and kill the mutants of the brief
(drop the group from the query body; an empty membership answer taken as "in"; ``check`` without
the scope check): ``check`` of a VM outside the group, ``--ids``, ``sweep --from`` (a later pass),
both ``TARGET_SUBSCRIPTIONS`` and ``MANAGEMENT_GROUP_ID`` set, the variable with a trailing newline
and a full resource id instead of the group id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from shared.azure import inventory
from shared.cli import _simulated_env, main
from shared.model import VmId
from simulator import Estate, Simulator
from tests.test_listing import ESTATE, SUB_A, SUB_B, SUB_C, vm_id

IN_GROUP = vm_id(SUB_A, "rg-App", "avma-app-01")  # an AVMA VM in mg-prod: --apply remediates it
OUTSIDE = vm_id(SUB_C, "rg-c", "avma-c-01")  # the same kind of VM, in a subscription outside mg-prod


@pytest.fixture
def sim() -> Iterator[Simulator]:
    estate = Estate.from_dict({**ESTATE, "managementGroups": {"mg-prod": [SUB_A, SUB_B], "mg-empty": []}})
    with Simulator(estate, latency_s=0.0) as running:
        yield running


def _point_at(sim: Simulator, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for key, value in _simulated_env(sim.env()).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("TARGET_SUBSCRIPTIONS", raising=False)
    monkeypatch.delenv("MANAGEMENT_GROUP_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _run_commands(sim: Simulator) -> dict[str, int]:
    """Run Commands accepted per VM (only VMs that got any)."""
    return {vm: len(log) for vm, log in sim.run_logs().items() if log}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("avma-remediator: MANAGEMENT_GROUP_ID")]


# ------------------------------------------------------------------ a group that cannot be used


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--output", "json"],
        ["sweep", "--apply", "--yes", "--output", "json"],
        ["check", IN_GROUP, "--apply", "--yes", "--output", "json"],
        ["sweep", "--ids", IN_GROUP, "--apply", "--yes", "--output", "json"],
    ],
    ids=["sweep", "sweep-apply", "check", "ids"],
)
def test_a_management_group_resource_graph_refuses_is_exit_2_with_what_to_fix(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """On main: ``sweep`` exit 1 and a line cut to "Please provide below info when asking for
    support"; ``check`` exit 1, ``failed: scope-unknown`` and nothing on stderr."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-nope")
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""  # nothing was checked: no result to read as "nothing to do"
    [line] = _errors(captured.err)
    # the service's reason, not its "Please provide below info when asking for support"
    assert "Resource Graph answered HTTP 403: (AuthorizationFailed) The client" in line
    assert "over scope '/providers/Microsoft.Management/managementGroups/mg-nope'" in line
    assert "the group's id (not its display name)" in line and "Reader on the group" in line
    assert _run_commands(sim) == {}
    assert [q["status"] for q in sim.graph_queries()] == [403]  # the one question; no listing
    assert sim.state_dump()[IN_GROUP]["changed"] is False


def test_a_management_group_with_no_subscription_is_exit_2_not_an_empty_success(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On main: an empty listing, ``{"vms": []}`` and exit 0, as if every VM were done."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-empty")
    code = main(["sweep", "--apply", "--yes", "--output", "json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    [line] = _errors(captured.err)
    assert "sees no subscription in or under this management group" in line
    assert _run_commands(sim) == {}


def test_a_throttled_group_check_up_front_assumes_nothing(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resource Graph throttled (past the inventory's retries) when the group is asked up front:
    not a configuration error (no exit 2), and each VM's own scope check decides; here throttled too,
    so the VM is not checked (``deferred: throttled``, exit 3: retry later) and nothing runs."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-prod")
    sim.throttle_resource_graph(100, resets_after_s=0)
    code = main(["check", IN_GROUP, "--apply", "--yes", "--output", "json", "--retry-wait", "0"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 3
    assert [(v["outcome"], v["reason"]) for v in out["vms"]] == [("deferred", "throttled")]
    assert _run_commands(sim) == {}


def test_the_group_asked_up_front_answers_the_scope_check_of_its_subscriptions(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The up-front question is the scope check's own (``ResourceContainers`` at the group), for all
    the group's subscriptions at once: a sweep asks nothing more of Resource Graph than that and
    its listing, both at the group."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-prod")
    assert main(["sweep", "--apply", "--yes", "--output", "json"]) == 0
    capsys.readouterr()
    asked = [(q["kind"], q["managementGroups"], q["subscriptions"]) for q in sim.graph_queries()]
    assert asked == [("subscriptions", ["mg-prod"], []), ("list_vms", ["mg-prod"], [])]


# ------------------------------------------------------------------ every path keeps to the group


def test_check_of_a_vm_outside_the_group_is_out_of_scope_and_no_run_command_reaches_it(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kills "check without the scope check" and "an empty membership answer is in the group"."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-prod")
    code = main(["check", OUTSIDE, IN_GROUP, "--apply", "--yes", "--output", "json"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    by_id = {v["id"]: (v["outcome"], v["reason"]) for v in out["vms"]}
    assert by_id[OUTSIDE] == ("skipped", "out-of-scope")
    assert by_id[IN_GROUP][0] == "remediated"
    assert sim.run_log(OUTSIDE) == [] and sim.state_dump()[OUTSIDE]["changed"] is False
    assert code == 0
    # the VM outside was asked about at the group, not assumed either way
    outside = [q for q in sim.graph_queries() if q["kind"] == "subscriptions" and q["rows"] == 0]
    assert [q["managementGroups"] for q in outside] == [["mg-prod"]]


def test_a_later_pass_from_a_result_keeps_to_the_group(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``sweep --from`` re-runs the VMs a result names; one outside the group (a result from another
    scope, or edited) is refused, not re-run."""
    result = tmp_path / "result.json"
    rows = [{"id": vm, "outcome": "failed", "reason": "run-command-failed"} for vm in (OUTSIDE, IN_GROUP)]
    result.write_text(json.dumps({"vms": rows}), encoding="utf-8")
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-prod")
    code = main(["sweep", "--from", str(result), "--apply", "--yes", "--output", "json"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    by_id = {v["id"]: (v["outcome"], v["reason"]) for v in out["vms"]}
    assert by_id == {OUTSIDE: ("skipped", "out-of-scope"), IN_GROUP: ("remediated", by_id[IN_GROUP][1])}
    assert list(_run_commands(sim)) == [IN_GROUP]
    assert code == 0


@pytest.mark.parametrize(
    "env",
    [
        {"MANAGEMENT_GROUP_ID": "mg-prod\n"},  # as `$(cat file)` or a .env file can leave it
        {"MANAGEMENT_GROUP_ID": "mg-prod", "TARGET_SUBSCRIPTIONS": SUB_C},  # the group wins (README)
    ],
    ids=["trailing-newline", "both-set"],
)
def test_the_sweep_reaches_only_the_group(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    """Kills "drop the management group from the query body" on the sweep path (the listing and the
    scope check would then reach the tenant, and the VM outside the group would be remediated)."""
    _point_at(sim, monkeypatch, **env)
    code = main(["sweep", "--apply", "--yes", "--output", "json"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert {VmId.parse(v["id"]).subscription_id for v in out["vms"]} == {SUB_A, SUB_B}
    assert OUTSIDE not in _run_commands(sim) and IN_GROUP in _run_commands(sim)
    assert {tuple(q["managementGroups"]) for q in sim.graph_queries()} == {("mg-prod",)}
    assert all(q["subscriptions"] == [] for q in sim.graph_queries())
    assert code == 0


def test_a_full_resource_id_is_a_configuration_error_before_any_query(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resource Graph's ``managementGroups`` takes group ids ("Example: [ 'mg1', 'mg2' ]",
    resourcegraph.json), not ``/providers/Microsoft.Management/managementGroups/<id>``."""
    _point_at(
        sim, monkeypatch, MANAGEMENT_GROUP_ID="/providers/Microsoft.Management/managementGroups/mg-prod"
    )
    code = main(["sweep", "--apply", "--yes", "--output", "json"])
    captured = capsys.readouterr()
    assert code == 2 and "MANAGEMENT_GROUP_ID=" in captured.err
    assert sim.graph_queries() == [] and _run_commands(sim) == {}


# ------------------------------------------------------------------ Resource Graph's error shape


def test_a_resource_graph_error_leads_with_its_reason_and_keeps_the_whole_answer() -> None:
    """Resource Graph's body: the top ``message`` is support boilerplate, the reason in ``details``
    (Azure/azure-powershell ResourceGraphQueryTests.ps1, ``Search-AzureRmGraph-QueryError``)."""
    reason = (
        "The client 'x' does not have authorization to perform action "
        "'Microsoft.Management/managementGroups/read' over scope "
        "'/providers/Microsoft.Management/managementGroups/mg-nope' or the scope is invalid."
    )
    body = {
        "error": {
            "code": "AuthorizationFailed",
            "message": "Please provide below info when asking for support: timestamp = t, correlationId = c.",
            "details": [{"code": "AuthorizationFailed", "message": reason}],
        }
    }

    class Answer:
        status_code, reason, request, headers = 403, "Forbidden", None, {}

        def text(self) -> str:
            return json.dumps(body)

    error = inventory._translate(HttpResponseError(response=Answer()))
    first, *rest = str(error).splitlines()
    assert first == f"(AuthorizationFailed) {reason}"
    assert "correlationId = c" in "\n".join(rest)  # the whole answer is still there (-v, support)
    assert (error.reason, error.status, error.code) == ("forbidden", 403, "AuthorizationFailed")


def test_a_plan_made_at_the_group_is_applied_at_the_group_only(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``sweep --out-plan`` then ``apply PLAN``: the plan holds the group's VMs only, and applying
    it changes those, asking Resource Graph at the group only."""
    _point_at(sim, monkeypatch, MANAGEMENT_GROUP_ID="mg-prod")
    plan = tmp_path / "plan.json"
    assert main(["sweep", "--out-plan", str(plan), "--output", "json"]) == 0
    capsys.readouterr()
    planned = json.loads(plan.read_text(encoding="utf-8"))
    assert planned["scope"]["managementGroup"] == "mg-prod"
    code = main(["apply", str(plan), "--yes", "--output", "json"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(v["id"], v["outcome"]) for v in out["vms"]] == [(IN_GROUP, "remediated")]
    assert OUTSIDE not in _run_commands(sim)
    assert {tuple(q["managementGroups"]) for q in sim.graph_queries()} == {("mg-prod",)}
