"""``--from RESULT.json --only failed,deferred`` (issue 10, item 11): re-run just those VMs; a file
that is not a result is a usage error (exit 2) before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"


def _id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


OK, NOAGENT, BUSY, PS2, FIX = (_id(n) for n in ("vm-ok", "vm-noagent", "vm-busy", "vm-ps2", "vm-fix"))


def _estate(tmp_path: Path) -> Path:
    estate = tmp_path / "estate.json"
    vms: list[dict[str, Any]] = [
        windows_vm(OK, channel="KMS_CLIENT"),
        windows_vm(NOAGENT, agent=False),
        windows_vm(BUSY, busySeconds=3600),
        windows_vm(
            PS2,
            channel="KMS_CLIENT",
            status=0,
            caption="Microsoft Windows Server 2008 R2 Standard ",
            build=7601,
            edition="ServerStandard",
            sku=7,
        ),
        windows_vm(FIX),
    ]
    vms[3]["guest"]["psVersion"] = "2.0"
    estate.write_text(json.dumps({"subscriptions": [SUB], "vms": vms}))
    return estate


def test_from_a_result_reruns_just_the_failed_and_deferred_vms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = _estate(tmp_path)
    first = tmp_path / "result.json"
    sim = ["--simulate", str(estate), "--sim-latency", "0.01"]
    assert main(["sweep", *sim, "--apply", "--output", "json", "--out", str(first)]) == 1
    capsys.readouterr()
    outcomes = {v["id"]: v["outcome"] for v in json.loads(first.read_text())["vms"]}
    assert outcomes == {
        OK: "healthy",
        NOAGENT: "deferred",
        BUSY: "deferred",
        PS2: "failed",
        FIX: "remediated",
    }
    state = tmp_path / "state.json"
    main(["sweep", *sim, "--from", str(first), "--output", "json", "--sim-state-out", str(state)])
    again = json.loads(capsys.readouterr().out)
    assert sorted(v["id"] for v in again["vms"]) == sorted([NOAGENT, BUSY, PS2])
    runs = {vm_id: vm["runCommands"] for vm_id, vm in json.loads(state.read_text()).items()}
    assert runs[OK] == runs[FIX] == 0  # not re-run
    main(["sweep", *sim, "--from", str(first), "--only", "deferred", "--output", "json"])
    assert sorted(v["id"] for v in json.loads(capsys.readouterr().out)["vms"]) == sorted([NOAGENT, BUSY])
    # What --output json printed works as well as what --out wrote.
    printed = tmp_path / "printed.json"
    main(["sweep", *sim, "--from", str(first), "--only", "failed", "--output", "json"])
    printed.write_text(capsys.readouterr().out)
    main(["sweep", *sim, "--from", str(printed), "--only", "failed", "--output", "json"])
    assert [v["id"] for v in json.loads(capsys.readouterr().out)["vms"]] == [PS2]


@pytest.mark.parametrize(
    ("content", "only", "message"),
    [
        (None, None, "cannot read"),
        ("{not json", None, "is not JSON"),
        ("[]", None, "no 'vms' list"),
        ('{"vms": [{"outcome": "failed"}]}', None, "vms[0] has no 'id'"),
        ('{"vms": [{"id": "x", "outcome": "broken"}]}', None, "'broken' is not an outcome"),
        (
            '{"vms": [{"id": "/subscriptions/x", "outcome": "failed"}]}',
            None,
            "not a virtual machine resource id",
        ),
        ('{"vms": []}', "failed,sad", "--only: 'sad' is not an outcome"),
    ],
)
def test_a_file_that_is_not_a_result_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, only: str | None, message: str
) -> None:
    result = tmp_path / "result.json"
    if content is not None:
        result.write_text(content)
    argv = ["sweep", "--simulate", "--from", str(result), *(["--only", only] if only else [])]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_from_with_subscription_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--simulate", "--from", "r.json", "--subscription", SUB]) == 2
    assert "--from names the VMs itself" in capsys.readouterr().err
