"""The CLI's scope narrower than a subscription (issue 10, items 4 and 9): ``--resource-group``,
``--name``, ``--tag``, ``--ids``, several VM ids for ``check``, and a named VM that does not exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from shared.filters import FilterError, VmFilter
from shared.model import VmId
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
OTHER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def _id(rg: str, name: str, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


# --- the predicate (pure): what a listing returns for a VM in, selected or not out ---


def _matches(vm_filter: VmFilter, vm: str, tags: dict[str, str] | None = None) -> bool:
    return vm_filter.matches(VmId.parse(vm), tags or {})


def test_resource_groups_and_names_compare_as_arm_does_and_repeat_as_alternatives() -> None:
    f = VmFilter.from_options(resource_groups=["RG-App", "rg-db"], names=["VM-1", "vm-2"])
    assert _matches(f, _id("rg-app", "vm-1"))
    assert _matches(f, _id("RG-DB", "Vm-2"))
    assert not _matches(f, _id("rg-web", "vm-1"))
    assert not _matches(f, _id("rg-app", "vm-3"))


@pytest.mark.parametrize(
    ("option", "tags", "selected"),
    [
        ("env", {"env": "prod"}, True),  # a key alone: any value
        ("env", {"ENV": ""}, True),  # tag names are case-insensitive; an empty value is a value
        ("env=", {"env": "test"}, True),  # az: KEY= is KEY (validate_tag gives an empty value)
        ("env=prod", {"env": "prod"}, True),
        ("env=prod", {"Env": "prod"}, True),
        ("env=prod", {"env": "Prod"}, False),  # tag values are case-sensitive
        ("env=prod", {"owner": "prod"}, False),
        ("env", {}, False),
        ("k=a=b", {"k": "a=b"}, True),  # split at the first '=', as az does
    ],
)
def test_tag_filters_follow_az(option: str, tags: dict[str, str], selected: bool) -> None:
    assert _matches(VmFilter.from_options(tags=[option]), _id("rg", "vm"), tags) is selected


def test_several_tags_must_all_match_and_values_of_one_key_are_alternatives() -> None:
    f = VmFilter.from_options(tags=["env=prod", "env=test", "owner"])
    assert _matches(f, _id("rg", "vm"), {"env": "test", "owner": "ops"})
    assert not _matches(f, _id("rg", "vm"), {"env": "test"})
    assert not _matches(f, _id("rg", "vm"), {"env": "dev", "owner": "ops"})
    # a key given alone and with a value: the key alone wins (any value)
    assert _matches(VmFilter.from_options(tags=["env", "env=prod"]), _id("rg", "vm"), {"env": "dev"})


@pytest.mark.parametrize(
    "options",
    [{"names": ["vm"]}, {"tags": ["=x"]}, {"tags": [""]}, {"resource_groups": [" "]}],
    ids=["name-without-group", "empty-tag-key", "empty-tag", "blank-group"],
)
def test_a_filter_that_cannot_mean_anything_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(FilterError):
        VmFilter.from_options(**options)


# --- on the simulator ---


def _estate(tmp_path: Path) -> Path:
    vms = [
        windows_vm(_id("rg-app", "app-01"), tags={"env": "prod"}),
        windows_vm(_id("rg-app", "app-02"), tags={"env": "test"}),
        windows_vm(_id("RG-DB", "db-01"), tags={"Env": "prod", "owner": "dba"}),
        windows_vm(_id("rg-web", "web-01")),
        # the same resource group in a subscription outside TARGET_SUBSCRIPTIONS: never reached
        windows_vm(_id("rg-app", "app-01", OTHER), tags={"env": "prod"}),
    ]
    path = tmp_path / "estate.json"
    path.write_text(json.dumps({"subscriptions": [SUB, OTHER], "vms": vms}))
    return path


def _run(
    argv: list[str], estate: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str, dict[str, Any]]:
    """``main`` against a simulator of ``estate``, TARGET_SUBSCRIPTIONS = SUB only (``--simulate``
    would put every estate subscription in scope); (code, JSON, stderr, final VM states)."""
    from shared.cli import _simulated_env
    from simulator import Estate, Simulator

    with Simulator(Estate.load(estate), latency_s=0.01) as sim:
        for key, value in _simulated_env(sim.env()).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("TARGET_SUBSCRIPTIONS", SUB)
        code = main([*argv, "--apply", "--yes", "--output", "json"])
        states = sim.state_dump()
    captured = capsys.readouterr()
    out = json.loads(captured.out) if captured.out else {}
    return code, out, captured.err, states


def _changed(states: dict[str, Any]) -> set[str]:
    return {vm_id for vm_id, s in states.items() if s.get("changed")}


@pytest.mark.parametrize(
    ("options", "selected"),
    [
        (["--resource-group", "rg-app"], {_id("rg-app", "app-01"), _id("rg-app", "app-02")}),
        (["-g", "rg-db", "-g", "RG-WEB"], {_id("RG-DB", "db-01"), _id("rg-web", "web-01")}),
        (["--resource-group", "rg-app", "--name", "APP-02"], {_id("rg-app", "app-02")}),
        (["--tag", "env=prod"], {_id("rg-app", "app-01"), _id("RG-DB", "db-01")}),
        (["--tag", "owner"], {_id("RG-DB", "db-01")}),
        (["--tag", "env=prod", "-g", "rg-app"], {_id("rg-app", "app-01")}),
    ],
    ids=["group", "groups", "group-and-name", "tag-value", "tag-key", "tag-and-group"],
)
def test_sweep_filters_select_exactly_their_vms_inside_the_configured_scope(
    options: list[str],
    selected: set[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _, states = _run(["sweep", *options], _estate(tmp_path), monkeypatch, capsys)
    assert code == 0
    assert {v["id"] for v in out["vms"]} == selected
    assert {v["outcome"] for v in out["vms"]} == {"remediated"}
    assert _changed(states) == selected  # nothing else was touched, the other subscription neither


def test_a_filter_that_matches_nothing_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err, states = _run(["sweep", "-g", "rg-typo"], _estate(tmp_path), monkeypatch, capsys)
    assert (code, out["vms"], _changed(states)) == (0, [], set())
    assert f"avma-remediator: no VM in {SUB} matches --resource-group rg-typo" in err


def test_ids_are_read_directly_and_never_widen_the_scope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sweep --ids``: no listing at all; a VM of a subscription outside TARGET_SUBSCRIPTIONS is
    ``skipped: out-of-scope`` with no Run Command, however it was named."""
    inside, outside = _id("rg-web", "web-01"), _id("rg-app", "app-01", OTHER)
    code, out, _, states = _run(["sweep", "--ids", inside, outside], _estate(tmp_path), monkeypatch, capsys)
    assert code == 0
    by_id = {v["id"]: (v["outcome"], v["reason"]) for v in out["vms"]}
    assert by_id == {inside: ("remediated", "avma-channel"), outside: ("skipped", "out-of-scope")}
    assert _changed(states) == {inside}


def test_ids_read_directly_do_not_list_the_subscription(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.cli import _simulated_env
    from simulator import Estate, Simulator

    estate = Estate.from_dict({"vms": [windows_vm(_id("rg-web", "web-01")), windows_vm(_id("rg-app", "x"))]})
    with Simulator(estate, latency_s=0.01) as sim:
        for key, value in _simulated_env(sim.env()).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        assert main(["sweep", "--ids", _id("rg-web", "web-01"), "--output", "json"]) == 0
        paths = [r["path"].lower() for r in sim.request_log()]
    assert json.loads(capsys.readouterr().out)["summary"] == {"would-remediate": 1}
    assert not [p for p in paths if p.endswith("/providers/microsoft.compute/virtualmachines")], paths


def test_check_takes_several_ids_and_reports_one_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named VM that ARM does not know (404) is an error for the caller: exit 1 and one line for it,
    while the other named VMs are handled; the JSON keeps DESIGN's word, with a hint."""
    typo = _id("rg-app", "app-0l")
    argv = ["check", _id("rg-app", "app-01"), "--ids", typo, _id("RG-DB", "db-01")]
    code, out, err, states = _run(argv, _estate(tmp_path), monkeypatch, capsys)
    assert code == 1
    by_id = {v["id"]: v for v in out["vms"]}
    assert (by_id[typo]["outcome"], by_id[typo]["reason"]) == ("skipped", "not-found")
    assert "No VM with this id exists" in by_id[typo]["hint"]
    assert {by_id[i]["outcome"] for i in (_id("rg-app", "app-01"), _id("RG-DB", "db-01"))} == {"remediated"}
    assert f"avma-remediator: VM {typo} does not exist (ARM answered 404)" in err.splitlines()
    assert _changed(states) == {_id("rg-app", "app-01"), _id("RG-DB", "db-01")}


def test_check_of_one_vm_that_does_not_exist_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = _id("rg-app", "nosuchvm")
    code, out, err, _ = _run(["check", missing], _estate(tmp_path), monkeypatch, capsys)
    assert code == 1
    assert [(v["outcome"], v["reason"]) for v in out["vms"]] == [("skipped", "not-found")]
    assert f"avma-remediator: VM {missing} does not exist (ARM answered 404)" in err


def test_the_same_vm_named_twice_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = _id("rg-app", "app-01")
    code, out, _, _ = _run(["check", vm, vm.upper()], _estate(tmp_path), monkeypatch, capsys)
    assert code == 0 and len(out["vms"]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--ids", _id("rg", "vm"), "-g", "rg"], "--ids names the VMs exactly"),
        (["sweep", "--ids", _id("rg", "vm"), "--subscription", SUB], "--ids names the VMs exactly"),
        (["sweep", "--name", "vm"], "--name needs --resource-group"),
        (["sweep", "--tag", "=prod"], "the tag name is empty"),
        (["sweep", "--ids", "not-an-id"], "not a virtual machine resource id"),
        (["check", _id("rg", "vm"), "--computer", "HOST1"], "VM_ID or --computer"),
    ],
)
def test_scope_options_that_contradict_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--simulate"]) == 2  # before any simulator or credential
    assert message in capsys.readouterr().err
