"""Hints that promise a retry must be true (issue 10, item 6): the CLI retries within the run, with a
bounded backoff shown on stderr, and what is still deferred at the end says "run again later"."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from shared.hints import _RERUN, rerun_hint
from shared.inrun_retry import IN_RUN_RETRIED, RetryPolicy, RetryWait, retry_deferred
from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import Settings
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
SETTINGS = Settings.from_env({})


def _id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


class _Script:
    """A check that answers from a script of outcomes per VM, recording each call."""

    def __init__(self, answers: dict[str, list[tuple[OutcomeKind, str]]]) -> None:
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[str] = []

    async def __call__(self, vm_id: VmId) -> Outcome:
        self.calls.append(str(vm_id))
        kind, reason = self.answers[str(vm_id)].pop(0)
        return Outcome(str(vm_id), kind, reason)


def _retry(
    first: list[Outcome], script: _Script, policy: RetryPolicy
) -> tuple[list[Outcome], list[float], list[RetryWait]]:
    slept: list[float] = []
    waits: list[RetryWait] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    result = asyncio.run(
        retry_deferred(first, script, policy, SETTINGS, concurrency=4, on_wait=waits.append, sleep=sleep)
    )
    return result, slept, waits


def test_busy_and_throttled_are_retried_with_growing_waits_until_they_clear() -> None:
    a, b, c = _id("a"), _id("b"), _id("c")
    first = [
        Outcome(a, OutcomeKind.DEFERRED, "run-command-busy"),
        Outcome(b, OutcomeKind.DEFERRED, "throttled"),
        Outcome(c, OutcomeKind.HEALTHY, "kms-client-licensed"),
    ]
    script = _Script(
        {
            a: [(OutcomeKind.DEFERRED, "run-command-busy"), (OutcomeKind.REMEDIATED, "avma-channel")],
            b: [(OutcomeKind.HEALTHY, "kms-client-licensed")],
        }
    )
    result, slept, waits = _retry(first, script, RetryPolicy())
    assert [(o.vm_id, o.kind, o.reason) for o in result] == [
        (a, OutcomeKind.REMEDIATED, "avma-channel"),
        (b, OutcomeKind.HEALTHY, "kms-client-licensed"),
        (c, OutcomeKind.HEALTHY, "kms-client-licensed"),
    ]
    assert slept == [5.0, 15.0]  # the default policy: 5 s, then x3
    assert [w.describe() for w in waits] == [
        "retry 1 of 3 in 5 s: 2 VMs deferred (run-command-busy 1, throttled 1)",
        "retry 2 of 3 in 15 s: 1 VM deferred (run-command-busy 1)",
    ]
    assert script.calls == [a, b, a]  # the healthy VM is never asked again
    assert (result[0].details["tries"], result[1].details["tries"]) == (3, 2)
    assert "tries" not in result[2].details


def test_the_backoff_is_bounded_and_what_is_left_says_run_again_later() -> None:
    a = _id("a")
    script = _Script({a: [(OutcomeKind.DEFERRED, "run-command-busy")] * 3})
    result, slept, _ = _retry([Outcome(a, OutcomeKind.DEFERRED, "run-command-busy")], script, RetryPolicy())
    assert slept == [5.0, 15.0, 45.0] and sum(slept) == RetryPolicy().total_wait_s  # about a minute
    (left,) = result
    assert (left.kind, left.reason, left.details["tries"]) == (OutcomeKind.DEFERRED, "run-command-busy", 4)
    assert (
        left.hint
        == "Another Run Command is running on the VM; still so after 4 tries in this run: run again later."
    )


@pytest.mark.parametrize(
    "reason", ["agent-not-ready", "vm-starting", "kms-unreachable", "run-command-timeout"]
)
def test_the_vms_own_state_and_the_timeouts_are_not_waited_for(reason: str) -> None:
    a = _id("a")
    script = _Script({})
    result, slept, waits = _retry([Outcome(a, OutcomeKind.DEFERRED, reason)], script, RetryPolicy())
    assert (script.calls, slept, waits) == ([], [], [])
    assert "run again" in result[0].hint and "tries" not in result[0].details


def test_no_retry_when_the_policy_has_none() -> None:
    a = _id("a")
    result, slept, _ = _retry(
        [Outcome(a, OutcomeKind.DEFERRED, "throttled")], _Script({}), RetryPolicy(retries=0)
    )
    assert slept == [] and result[0].hint == "ARM throttled the requests (HTTP 429): run again later."


@pytest.mark.parametrize("reason", sorted({*_RERUN, *IN_RUN_RETRIED, "kms-unreachable", "something-new"}))
def test_no_cli_hint_of_a_deferral_promises_a_retry(reason: str) -> None:
    """The app's hints say "retried later" (its queue does retry); what a CLI run leaves never does."""
    for tries in (1, 4):
        hint = rerun_hint(reason, SETTINGS, tries=tries)
        assert "run again" in hint, hint
        assert "retried" not in hint and "retry" not in hint.replace("retries", ""), hint


# --- on the simulator: a foreign Run Command that ends while the run waits ---


def _estate(tmp_path: Path, busy_s: float) -> Path:
    path = tmp_path / "estate.json"
    path.write_text(json.dumps({"vms": [windows_vm(_id("busy"), busySeconds=busy_s)]}))
    return path


def _check(
    tmp_path: Path, busy_s: float, wait_s: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, Any, str]:
    argv = ["check", _id("busy"), "--simulate", str(_estate(tmp_path, busy_s)), "--sim-latency", "0.05"]
    code = main([*argv, "--apply", "--retry-wait", wait_s, "--output", "json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out)["vms"][0], captured.err


def test_a_busy_vm_is_remediated_by_the_runs_own_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """busySeconds 0.4: the first Run Command meets 409 Conflict; the retry after 0.5 s finds it free."""
    code, vm, err = _check(tmp_path, 0.4, "0.5", capsys)
    assert (code, vm["outcome"], vm["tries"]) == (0, "remediated", 2)
    assert "retry 1 of 3 in 0.5 s: 1 VM deferred (run-command-busy 1)" in err


def test_a_vm_busy_past_every_retry_exits_3_and_says_run_again_later(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, vm, err = _check(tmp_path, 60, "0.05", capsys)
    assert code == 3
    assert (vm["outcome"], vm["reason"], vm["tries"]) == ("deferred", "run-command-busy", 4)
    assert vm["hint"].endswith("still so after 4 tries in this run: run again later.")
    assert [line.split("] ", 1)[1] for line in err.splitlines() if "] retry " in line] == [
        "retry 1 of 3 in 0.05 s: 1 VM deferred (run-command-busy 1)",
        "retry 2 of 3 in 0.15 s: 1 VM deferred (run-command-busy 1)",
        "retry 3 of 3 in 0.45 s: 1 VM deferred (run-command-busy 1)",
    ]
    assert "avma-remediator: 1 VM still deferred: run again later" in err
