"""-v anywhere (issue 10, item 5): -v shows the tool's own steps per VM with timings (gate, detect,
decision, remediate, verify), -vv adds the Azure SDK's HTTP logging."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import build_parser, main, verbosity
from simulator import Estate

ROOT = Path(__file__).resolve().parent.parent


def _avma_vm() -> str:
    return next(
        v["id"]
        for v in Estate.default().to_dict()["vms"]
        if v["id"].endswith("/rg-migrated-apps/providers/Microsoft.Compute/virtualMachines/avma-2019-dc")
    )


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["-v", "sweep"], 1),
        (["sweep", "-v"], 1),
        (["sweep", "--simulate", "-vv"], 2),
        (["-v", "check", "x", "-v"], 2),
        (["simulator", "-v", "serve", "-v"], 2),
        (["intake", "-", "--verbose"], 1),
        (["sweep"], 0),
    ],
)
def test_v_is_accepted_anywhere_and_counts(argv: list[str], level: int) -> None:
    assert verbosity(build_parser().parse_args(argv)) == level


def test_the_workflow_logs_each_step_with_its_timing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shared.workflow")
    vm = _avma_vm()
    assert (
        main(["check", vm, "--simulate", "--sim-latency", "0.01", "--apply", "-v", "--output", "json"]) == 0
    )
    steps = [r.getMessage() for r in caplog.records if r.name == "shared.workflow"]
    name = "rg-migrated-apps/avma-2019-dc"
    # ARM names the edition, so the first Run Command is a conditional re-key (issue 12): decided
    # before it is sent, on the facts it must find
    assert [m.split(": ")[1] for m in steps] == [
        "gate",
        "decision",
        "rekey-if",
        "verify",
        "outcome",
    ]
    assert all(m.startswith(f"{name}: ") for m in steps)
    timed = [m for m in steps if re.search(r"\(\d+\.\d\d s\)$", m)]
    assert [m.split(": ")[1] for m in timed] == ["gate", "rekey-if"]  # the steps that call ARM
    assert steps[1] == (
        f"{name}: decision: conditional rekey (avma-channel), if the guest shows Windows Server 2019 Datacenter's facts"
    )
    assert "KMS_CLIENT status 1; KMS reachable; every step ok" in steps[2]
    assert steps[3] == f"{name}: verify: remediated: avma-channel"
    records = [r for r in caplog.records if r.name == "shared.workflow"]
    assert {getattr(r, "vm_id", None) for r in records} == {vm}


def _stderr(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "shared", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_v_after_the_subcommand_shows_the_steps_and_vv_the_sdk_http_logging() -> None:
    vm = _avma_vm()
    one = _stderr(["check", vm, "--simulate", "--sim-latency", "0.01", "-v"])
    assert "DEBUG shared.workflow: rg-migrated-apps/avma-2019-dc: detect: AVMA status 5" in one
    assert "decision: rekey (avma-channel)" in one
    assert "http_logging_policy" not in one
    two = _stderr(["-v", "check", vm, "--simulate", "--sim-latency", "0.01", "-v"])
    assert "decision: rekey (avma-channel)" in two
    assert "INFO azure.core.pipeline.policies.http_logging_policy: Request URL:" in two
