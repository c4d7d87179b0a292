"""Plan, then apply (issue 10, item 10): ``sweep --out-plan`` records what the audit found, ``apply``
acts only on the plan's VMs and only where the fresh facts lead to the same decision."""

from __future__ import annotations

import copy
import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from shared.plan import PLAN_KIND, PlanError, plan_from_dict
from shared.settings import Settings
from tests.estates import windows_vm

ROOT = Path(__file__).resolve().parent.parent
SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"


def _id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"


FIXED, OPTED, ROUTE, SAME, REPAIR, HEALTHY = (
    _id(n) for n in ("vm-fixed", "vm-opted", "vm-route", "vm-same", "vm-repair", "vm-healthy")
)


def _estate() -> dict[str, Any]:
    return {
        "subscriptions": [SUB],
        "vms": [
            windows_vm(FIXED),
            windows_vm(OPTED),
            windows_vm(ROUTE),
            windows_vm(SAME),
            windows_vm(REPAIR, channel="KMS_CLIENT", status=0),
            windows_vm(HEALTHY, channel="KMS_CLIENT"),
        ],
    }


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_plan_records_each_vm_its_action_and_the_facts_and_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = _write(tmp_path / "estate.json", _estate())
    plan_file, state = tmp_path / "plan.json", tmp_path / "state.json"
    argv = ["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--out-plan", str(plan_file)]
    code, out, _ = _run([*argv, "--output", "json", "--sim-state-out", str(state)], capsys)
    assert code == 0
    assert not any(v["changed"] for v in json.loads(state.read_text()).values())  # an audit
    plan = json.loads(plan_file.read_text())
    assert (plan["kind"], plan["version"], plan["simulated"], plan["interrupted"]) == (
        PLAN_KIND,
        1,
        True,
        False,
    )
    assert plan["scope"] == {"managementGroup": None, "subscriptions": [SUB]}
    assert plan["settings"] == {
        "cloud": "AzureCloud",
        "kmsHost": "azkms.core.windows.net",
        "kmsPort": 1688,
        "optOutTag": "avma-remediator-opt-out",
        "allowCustomKmsOverride": False,
    }
    assert datetime.now(UTC) - datetime.fromisoformat(plan["createdAt"]) < timedelta(minutes=5)
    assert plan["counts"] == {"rekey": 4, "repair": 1, "none": 1}
    rows = {r["id"]: r for r in plan["vms"]}
    assert set(rows) == {v["id"] for v in json.loads(out)["vms"]}  # each VM the audit saw
    assert (rows[REPAIR]["action"], rows[REPAIR]["reason"]) == ("repair", "kms-client-unlicensed")
    assert (rows[HEALTHY]["action"], rows[HEALTHY]["outcome"]) == ("none", "healthy")
    assert "guest" not in rows[HEALTHY]
    fixed = rows[FIXED]
    assert (fixed["action"], fixed["outcome"], fixed["reason"]) == (
        "rekey",
        "would-remediate",
        "avma-channel",
    )
    assert fixed["vm"]["powerState"] == "running" and fixed["vm"]["agentReady"] is True
    assert (
        fixed["guest"]["script"] == "detect"
        and "VIRTUAL_MACHINE_ACTIVATION" in fixed["guest"]["license"]["description"]
    )
    assert fixed["facts"]["edition"] and fixed["facts"]["kmsTarget"] == "azkms.core.windows.net:1688"


def test_apply_acts_only_where_the_fresh_facts_lead_to_the_planned_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = _write(tmp_path / "estate.json", _estate())
    plan_file = tmp_path / "plan.json"
    assert (
        main(["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--out-plan", str(plan_file)]) == 0
    )
    capsys.readouterr()

    # Between the review and the apply: one VM was fixed by hand, one opted out, one lost its KMS
    # route; one VM outside the plan appeared. The plan's other VMs are as they were.
    later = _estate()
    vms = {v["id"]: v for v in later["vms"]}
    vms[FIXED]["guest"].update(channel="KMS_CLIENT", licenseStatus=1, kmsHost="azkms.core.windows.net:1688")
    vms[OPTED]["tags"] = {"avma-remediator-opt-out": "true"}
    vms[ROUTE]["guest"]["kmsReachable"] = False
    later["vms"].append(windows_vm(_id("vm-new")))
    _write(estate, later)
    state = tmp_path / "state.json"
    argv = ["apply", str(plan_file), "--simulate", str(estate), "--sim-latency", "0.01", "--output", "json"]
    code, out, _ = _run([*argv, "--sim-state-out", str(state)], capsys)
    result = {v["id"]: v for v in json.loads(out)["vms"]}
    final = json.loads(state.read_text())

    assert set(result) == {FIXED, OPTED, ROUTE, SAME, REPAIR}  # only the plan's VMs with an action
    assert (result[SAME]["outcome"], result[REPAIR]["outcome"]) == ("remediated", "remediated")
    assert final[SAME]["changed"] and final[REPAIR]["changed"]
    for vm_id in (FIXED, OPTED, ROUTE):
        row = result[vm_id]
        assert (row["outcome"], row["reason"]) == ("skipped", "plan-changed"), row
        assert row["planned"]["action"] == "rekey" and row["planned"]["reason"] == "avma-channel"
        assert final[vm_id]["changed"] is False  # nothing was sent to change it
    assert (final[FIXED]["runCommands"], final[ROUTE]["runCommands"], final[OPTED]["runCommands"]) == (
        1,
        1,
        0,
    )
    assert final[SAME]["runCommands"] == 2  # detected again, then remediated
    assert result[FIXED]["now"] == {"action": "none", "reason": "kms-client-licensed", "outcome": "healthy"}
    assert result[FIXED]["changed"]["channel"] == ["AVMA", "KMS_CLIENT"]
    assert result[OPTED]["now"]["reason"] == "opted-out" and "tags" in result[OPTED]["changed"]
    # Still a re-key, for another reason: the reviewed plan did not say the activation would fail.
    assert (
        result[ROUTE]["now"]["action"] == "rekey" and result[ROUTE]["now"]["reason"] == "avma-kms-unreachable"
    )
    assert result[ROUTE]["changed"] == {"kmsReachable": [True, False]}
    assert "kmsReachable True → False" in result[ROUTE]["hint"]
    assert final[_id("vm-new")]["changed"] is False
    assert code == 0
    from tests.test_cli_readme import json_keys_documented

    assert json_keys_documented(json.loads(out)) == []  # planned, now, changed: in the README's JSON shape


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, Any]]:
    estate = _write(tmp_path / "estate.json", _estate())
    plan_file = tmp_path / "plan.json"
    assert (
        main(["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--out-plan", str(plan_file)]) == 0
    )
    capsys.readouterr()
    return estate, json.loads(plan_file.read_text())


@pytest.fixture(scope="module")
def made_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One audit's plan of the estate above, for the tests that edit it."""
    import contextlib
    import io

    where = tmp_path_factory.mktemp("plan")
    estate = _write(where / "estate.json", _estate())
    argv = [
        "sweep",
        "--simulate",
        str(estate),
        "--sim-latency",
        "0.01",
        "--out-plan",
        str(where / "plan.json"),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    plan: dict[str, Any] = json.loads((where / "plan.json").read_text())
    return plan


def _settings() -> Settings:
    return Settings.from_env({"TARGET_SUBSCRIPTIONS": SUB})


def _edited(plan: dict[str, Any], change: Any) -> dict[str, Any]:
    data = copy.deepcopy(plan)
    change(data)
    return data


def _rekey_row(data: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in data["vms"] if r["id"] == SAME)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(kind="something-else"), "not an avma-remediator plan"),
        (lambda d: d.update(version=2), "plan version 2 is not supported"),
        (lambda d: d.update(createdAt="yesterday"), "createdAt must be an ISO 8601 time"),
        (
            lambda d: d.update(createdAt=(datetime.now(UTC) - timedelta(hours=25)).isoformat()),
            "stale: made 25 h ago, more than 24 h",
        ),
        (lambda d: d.update(createdAt=(datetime.now(UTC) + timedelta(hours=1)).isoformat()), "in the future"),
        (lambda d: d.update(simulated=False), "was made on Azure; this run is simulated"),
        (lambda d: d["settings"].update(cloud="AzureUSGovernment"), "made for cloud 'AzureUSGovernment'"),
        (lambda d: d["settings"].update(kmsHost="kms.contoso.local"), "decided with other settings (kmsHost"),
        (
            lambda d: d["scope"].update(subscriptions=["0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"]),
            "another scope",
        ),
        (lambda d: d.update(vms={}), "'vms' must be a list"),
        (lambda d: _rekey_row(d).update(id="not-a-vm"), "not a virtual machine resource id"),
        (lambda d: _rekey_row(d).update(action="delete"), "'action' must be rekey, repair or none"),
        (lambda d: _rekey_row(d).pop("guest"), "needs 'guest'"),
        (lambda d: _rekey_row(d)["guest"].update(schema=1), "guest: schema 1 is not supported"),
        (
            lambda d: _rekey_row(d).update(action="repair"),
            "the plan says repair (avma-channel), but the decision",
        ),
        (
            lambda d: _rekey_row(d)["guest"]["license"].update(
                description="Windows(R) Operating System, VOLUME_KMSCLIENT channel", licenseStatus=1
            ),
            "the decision table gives none",
        ),
        (lambda d: d["vms"].append(copy.deepcopy(_rekey_row(d))), "is in the plan twice"),
    ],
)
def test_a_plan_that_cannot_be_applied_is_refused_with_the_reason(
    made_plan: dict[str, Any], change: Any, message: str
) -> None:
    plan_from_dict(made_plan, _settings(), simulated=True, now=datetime.now(UTC))  # as made, it is fine
    with pytest.raises(PlanError) as raised:
        plan_from_dict(_edited(made_plan, change), _settings(), simulated=True, now=datetime.now(UTC))
    assert message in str(raised.value)


def test_apply_of_a_bad_plan_exits_2_before_any_vm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estate, plan = _plan(tmp_path, capsys)
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(_edited(plan, lambda d: d.update(createdAt="2020-01-01T00:00:00+00:00"))))
    code, out, err = _run(["apply", str(stale), "--simulate", str(estate)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("avma-remediator: plan: ") and "is stale" in err
    (tmp_path / "broken.json").write_text('{"kind": ')
    code, _, err = _run(["apply", str(tmp_path / "broken.json"), "--simulate", str(estate)], capsys)
    assert code == 2 and "is not JSON" in err


def _cli(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shared", *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        **kwargs,
    )


def test_without_a_terminal_and_without_yes_a_change_is_refused_before_anything(tmp_path: Path) -> None:
    """Azure, no terminal, no --yes: exit 2 at once (no credential is even looked for)."""
    vm = _id("vm-same")
    for args in (["sweep", "--apply"], ["check", vm, "--apply"], ["apply", "plan.json"]):
        done = _cli(args, tmp_path, stdin=subprocess.DEVNULL)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert "there is no terminal to ask on: add --yes" in done.stderr


def _on_a_terminal(args: list[str], cwd: Path, answer: str) -> tuple[int, str, str]:
    leader, follower = pty.openpty()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared", *args],
            cwd=cwd,
            env=env,
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(leader, answer.encode() + b"\n")  # typed ahead: the terminal keeps it until read
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err
    finally:
        os.close(leader)
        os.close(follower)


def test_apply_on_a_terminal_shows_the_counts_and_a_no_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estate, _ = _plan(tmp_path, capsys)
    state = tmp_path / "state.json"
    args = [
        "apply",
        "plan.json",
        "--simulate",
        str(estate),
        "--sim-latency",
        "0.01",
        "--sim-state-out",
        str(state),
    ]
    code, out, err = _on_a_terminal(args, tmp_path, "no")
    assert code == 0, err
    assert "apply: 5 VMs to change (rekey 4, repair 1); 1 with nothing to do" in err
    assert "Type 'yes' to go ahead" in err and "not applied: nothing was changed" in err
    assert out == ""
    assert not any(vm["runCommands"] for vm in json.loads(state.read_text()).values())


def test_sweep_apply_on_a_terminal_audits_asks_then_applies_that_plan(tmp_path: Path) -> None:
    estate = _write(tmp_path / "estate.json", _estate())
    args = ["sweep", "--apply", "--simulate", str(estate), "--sim-latency", "0.01", "--output", "json"]
    code, out, err = _on_a_terminal(args, tmp_path, "yes")
    assert code == 0, err
    assert "audit done: 5 VMs to change (rekey 4, repair 1)" in err
    result = json.loads(out)
    assert result["mode"] == "enforce"
    assert result["summary"] == {"remediated": 5, "healthy": 1}
