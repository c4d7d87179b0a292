"""Review of issue 9 item 7 (r9b): mutants of the worker's deferrals that main's suite let live.

- The worker's detect-first hook fires for an item with an earlier *unreadable* answer only. Made
  to fire on any retry (``attempt`` > 0), every retry of an AVMA VM whose edition ARM names (a
  throttled read, a busy slot, a lease wait) would spend two Run Commands (detection, re-key)
  where the one-Run-Command path (issue 12) spends one, each holding the VM's single slot.
- Each retry counts at least a second against the deadline (``deferredS``). Counted as its bare
  delay, ``DEFER_DELAY_SECONDS=0`` (a setting the validation accepts) gave a sum that never grows:
  an item that stays busy was retried for ever, never ``deadline-exceeded``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared import triggers
from simulator import Simulator
from tests.test_function_app import app_env, sim
from tests.test_worker_delivery import fresh_item, newest, scripts

__all__ = ["app_env", "sim"]


async def test_a_retry_after_a_readable_deferral_is_still_one_conditional_rekey(
    app_env: dict[str, str], sim: Simulator
) -> None:
    # the retry of an item deferred for a reason that said something (throttled, busy): no
    # unreadable answer, so nothing to detect first
    [outcome] = await triggers.work(fresh_item("web-01", "retry-1", attempt=2, deferredS=3.0))
    assert (outcome.kind.value, outcome.reason) == ("remediated", "avma-channel")
    assert scripts(sim, "web-01") == ["rekey-if"]
    assert await newest(app_env, "web-01") == "remediated:avma-channel"


async def test_with_no_defer_delay_a_busy_item_still_reaches_its_deadline(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.workqueue import WorkQueue

    monkeypatch.setenv("DEFER_DELAY_SECONDS", "0")
    monkeypatch.setenv("DEFER_DEADLINE_HOURS", "0.001")  # 3.6 s of retry delays
    sent: list[dict[str, Any]] = []

    async def keep(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        sent.append(item.to_dict())

    monkeypatch.setattr(WorkQueue, "send", keep)
    body = fresh_item("busy-04", "no-delay")
    for _ in range(8):
        [outcome] = await triggers.work(body)
        if outcome.kind.value == "failed":
            break
        body = json.dumps(sent[-1])
    assert (outcome.kind.value, outcome.reason) == ("failed", "deadline-exceeded:run-command-busy")
    assert len(sent) == 4  # 1 s counted per retry: 4 s >= 3.6 s


# --- the CLI's later passes: each pass carries the count the one before it reached ---------------


async def test_each_later_pass_carries_the_unreadable_answers_of_the_passes_before_it() -> None:
    """``rechecking`` serves every later in-run pass (shared/inrun_retry.py calls the same check once
    per pass). A VM unreadable once in the sweep and once in pass 1 (then busy each time) is on its
    third and fourth unreadable answer in pass 2: terminal after two Run Commands there, not four.
    Not carrying pass 1's count into pass 2 survived main's suite."""
    from shared.model import Outcome, OutcomeKind, VmId
    from shared.unreadable import rechecking
    from shared.workflow import detect_first

    vm = VmId.parse(
        "/subscriptions/5b0e8d2c-1f6a-4c39-9d7e-2a4b6c8d0e1f/resourceGroups/rg/providers/"
        "Microsoft.Compute/virtualMachines/vm1"
    )

    def answer(reason: str) -> Outcome:
        return Outcome(str(vm), OutcomeKind.DEFERRED, reason, details={"phase": "detect"})

    script = [answer("bad-output"), answer("run-command-busy")] + [answer("bad-output")] * 6
    hooks: list[Any] = []

    class Checker:
        async def check(self, vm_id: VmId, *, before_run_command: Any = None) -> Outcome:
            hooks.append(before_run_command)
            return script.pop(0)

    swept = Outcome(
        str(vm),
        OutcomeKind.DEFERRED,
        "run-command-busy",
        details={"earlierTries": [{"reason": "bad-output"}]},
    )
    check = rechecking(Checker(), [swept], backoff_s=0)
    first = await check(vm)  # pass 1: its second unreadable answer, then busy
    assert (first.reason, len(first.details["earlierTries"])) == ("run-command-busy", 2)
    calls = len(hooks)
    second = await check(vm)  # pass 2: the third, then the fourth
    assert (second.kind, second.reason, second.details["tries"]) == (OutcomeKind.FAILED, "bad-output", 4)
    assert len(hooks) - calls == 2
    assert all(hook is detect_first for hook in hooks)  # every try after an unreadable answer
