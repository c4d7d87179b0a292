"""Run Command answers that say nothing about the VM: retried, a bounded number of times.

Two answers of a Run Command tell the engine nothing about the guest's licensing:

- ``run-command-failed``: the command was accepted and its operation ended ``Failed`` in Azure
  (``InternalExecutionError`` "An internal execution error occurred.", a Compute operation that
  Azure PowerShell itself retries; shared/azure/compute.py ``RunCommandOperationFailed``). A request
  ARM *refused* with a 4xx is not this: it stays a terminal ``failed: run-command-failed``.
- ``bad-output``: the command succeeded but its output has no readable result line (cut to Run
  Command's last 4,096 bytes, garbled, or not our script's).

Neither is a finding, and a second command very likely reads the VM, so each is a deferral
(``deferred: run-command-failed`` / ``deferred: bad-output``, the error in the details), retried
with backoff: the Functions app re-enqueues the work item (shared/worker.py, the usual growing
delay and ``DEFER_DEADLINE_HOURS``), the CLI (its sweep, and ``check``/``apply`` through
``shared.resume.run_each``) tries again within the run (:func:`check_until_readable`). Only the
:data:`MAX_UNREADABLE_TRIES`-th such answer for one work item is terminal: ``failed`` with the same
reason, ``tries`` in the details.

Why four. In the default chaos run about 1.7 % of Run Commands give such an answer
(``operationFailed`` 0.5 %, ``outputTruncated`` and ``outputGarbled`` 0.6 % each, independent of one
another), in the test's smaller run about 6 % (``every`` 50, 45 and 45: 1 - 0.98 × 0.978² ≈ 6.3 %;
periodic, not independent, so the figures below are a guide there). A healthy VM's work item ends
``failed`` only if all its tries meet one: with three tries 0.017³ ≈ 5·10⁻⁶ per item, over the run's
some 5,000 items a 2.5 % chance that the run reports a wrong ``failed`` (6 % for the test's 250 items
at 6.3 %); with four, 8·10⁻⁸ and 1.6·10⁻⁵ per item, 0.04 % and 0.4 % per run (less in fact: a VM's
verdict is its last item's; and 1.7 % is an upper bound, as a cut or garbled output often keeps its
result line). In Azure such answers are rarer still. A VM whose answers are unreadable for good (an
extension that always fails, output that never fits) costs three Run Commands more before it is
reported, spaced by ``DEFER_DELAY_SECONDS`` (5, 10 and 20 minutes by default: the failure is on
record some 35 minutes after the first try, instead of some twenty Run Commands until the 24 h
deadline, each holding the VM's single Run Command slot).

Safety: every retry is a whole workflow, and it detects before anything else, so a remediation whose
POST was accepted and whose answer was unreadable is never repeated blindly: the detection sees what
the script did (Licensed on the KMS channel: ``healthy``; still on AVMA: the decision table again).
That holds for the conditional re-key too (the first Run Command of a VM whose edition ARM names,
shared/guessed_rekey.py), which may have installed the key before its answer was lost: the retry's
hook (:func:`shared.workflow.detect_first`; the worker's, for an item with ``unreadable`` > 0) answers
it ``DetectFirst``, so the retry sends a detection instead, and the unreadable re-key is counted
against the bound as any other unreadable answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from shared.hints import unreadable_hint
from shared.model import Outcome, OutcomeKind, VmId
from shared.workflow import BeforeRunCommand, detect_first

UNREADABLE = frozenset({"run-command-failed", "bad-output"})
MAX_UNREADABLE_TRIES = 4
CLI_BACKOFF_S = 2.0  # the CLI's first wait before trying again; doubled for each next one (2, 4, 8 s)


class HookedCheck(Protocol):
    """A checker that takes a before-Run-Command hook (the CLI's ``Interruptible``)."""

    async def check(self, vm_id: VmId, *, before_run_command: BeforeRunCommand | None = None) -> Outcome: ...


def is_unreadable(outcome: Outcome) -> bool:
    """A deferral for an answer that said nothing about the VM (counted against the bound)."""
    return outcome.kind is OutcomeKind.DEFERRED and outcome.reason in UNREADABLE


def give_up(outcome: Outcome, tries: int, *, earlier: list[dict[str, Any]] | None = None) -> Outcome:
    """The terminal ``failed`` after ``tries`` unreadable answers (the last one is ``outcome``)."""
    details: dict[str, Any] = {**outcome.details, "tries": tries}
    if earlier:
        details["earlierTries"] = earlier
    hint = unreadable_hint(outcome.reason, tries)
    return Outcome(outcome.vm_id, OutcomeKind.FAILED, outcome.reason, hint, details)


def _summary(outcome: Outcome) -> dict[str, Any]:
    summary: dict[str, Any] = {"reason": outcome.reason}
    for key in ("phase", "code", "error"):
        if key in outcome.details:
            summary[key] = outcome.details[key]
    return summary


async def check_until_readable(
    check: Callable[[], Awaitable[Outcome]],
    *,
    retry: Callable[[], Awaitable[Outcome]] | None = None,
    earlier: Sequence[Mapping[str, Any]] | None = None,
    backoff_s: float | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome:
    """Run ``check`` (one whole workflow) until its answer is readable, at most
    :data:`MAX_UNREADABLE_TRIES` times, waiting ``backoff_s`` (:data:`CLI_BACKOFF_S` if not given)
    before the second, doubled for each next one.

    Every try after an unreadable answer is ``retry`` (``check`` when not given): the callers pass
    the same check with :func:`shared.workflow.detect_first` as its hook, since the unreadable
    command may have been a conditional re-key that installed the key. ``earlier`` are unreadable
    answers this VM already gave in the run (a later in-run pass, shared/inrun_retry.py): they count
    against the bound, and the first call is then ``retry`` too.

    The CLI has no queue to come back later, so it retries within the run; the earlier tries are
    kept in the outcome's details (``earlierTries``), so that a ``healthy`` reached after an
    unreadable remediation still shows that the remediation ran.
    """
    first_wait = CLI_BACKOFF_S if backoff_s is None else backoff_s
    again = retry if retry is not None else check
    seen: list[dict[str, Any]] = [dict(e) for e in earlier or ()]
    call = again if seen else check
    while True:
        outcome = await call()
        if not is_unreadable(outcome):
            if seen:
                outcome.details["earlierTries"] = seen
            return outcome
        tries = len(seen) + 1
        if tries >= MAX_UNREADABLE_TRIES:
            return give_up(outcome, tries, earlier=seen)
        seen.append(_summary(outcome))
        await sleep(first_wait * 2 ** (tries - 1))
        call = again


def rechecking(
    checker: HookedCheck, outcomes: Sequence[Outcome], *, backoff_s: float | None = None
) -> Callable[[VmId], Awaitable[Outcome]]:
    """The check for the CLI's later in-run passes (``shared.inrun_retry.retry_deferred``) under the
    same bound: each VM's unreadable answers of earlier passes (``earlierTries`` of its last
    outcome) are carried, so that its fourth in the run is terminal whatever pass it falls in, and a
    check after one detects first."""
    carried: dict[str, list[dict[str, Any]]] = {}
    for outcome in outcomes:
        vm = VmId.try_parse(outcome.vm_id)
        if vm is not None and outcome.details.get("earlierTries"):
            carried[str(vm)] = list(outcome.details["earlierTries"])

    async def check(vm_id: VmId) -> Outcome:
        outcome = await check_until_readable(
            partial(checker.check, vm_id),
            retry=partial(checker.check, vm_id, before_run_command=detect_first),
            earlier=carried.get(str(vm_id)),
            backoff_s=backoff_s,
        )
        carried[str(vm_id)] = list(outcome.details.get("earlierTries", []))
        return outcome

    return check
