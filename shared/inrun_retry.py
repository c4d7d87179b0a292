"""The CLI's in-run retry of deferred VMs: one policy, one place, for every deferral reason.

The app retries a deferral by re-enqueueing it (shared/worker.py, ``DEFER_DELAY_SECONDS`` doubling
until ``DEFER_DEADLINE_HOURS``). A CLI run has no queue, so it retries here, within the run: after
the first pass over every VM, the VMs still deferred for a reason worth asking again are checked
again in passes, each after a longer wait (``RetryPolicy``: 5 s, 15 s, 45 s by default, about a
minute in all), while the progress line says how many wait and why. What is still deferred after
the last pass gets a hint that says to run again later (``shared.hints.rerun_hint``) and the run
exits 3 (``EXIT_RETRY_LATER``).

Which reasons are retried within the run (``IN_RUN_RETRIED``): answers to our own request that
usually clear within seconds or a minute: ``run-command-busy`` (another Run Command on the VM; one
runs at a time), ``throttled`` (HTTP 429 past azure-core's own retries), ``arm-unavailable`` (a 5xx),
``lease-held``/``lease-lost`` (another workflow on the VM, when the CLI shares the app's ledger),
and ``run-command-failed``/``bad-output`` once those are deferrals (issue 9). Not retried within the
run: the VM's own state as ARM reports it (``agent-not-ready``, ``vm-starting``,
``power-state-unknown``), which lasts minutes (a boot) or until someone acts (an agent that is
stopped or absent), longer than a run should hold its end for; ``kms-unreachable``, which needs a
route fixed; and the timeouts (``run-command-timeout``, ``arm-timeout``), which have already spent
their full deadline (a Run Command that timed out may still be running in the VM).

Every retry is a whole new check: gate, detection, decision, and only then a remediation, so a VM
whose earlier Run Command did run is judged on its state now, never re-keyed blindly.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from shared.hints import rerun_hint
from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import Settings

IN_RUN_RETRIED = frozenset(
    {
        "run-command-busy",
        "throttled",
        "arm-unavailable",
        "lease-held",
        "lease-lost",
        "run-command-failed",
        "bad-output",
    }
)
DEFAULT_FIRST_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to ``retries`` more passes, the n-th after ``first_wait_s × factor**(n-1)`` (capped)."""

    first_wait_s: float = DEFAULT_FIRST_WAIT_S
    factor: float = 3.0
    max_wait_s: float = 60.0
    retries: int = 3
    reasons: frozenset[str] = IN_RUN_RETRIED

    def wait_s(self, retry: int) -> float:
        return float(min(self.first_wait_s * self.factor ** (retry - 1), self.max_wait_s))

    @property
    def total_wait_s(self) -> float:
        return sum(self.wait_s(n) for n in range(1, self.retries + 1))

    def retries_now(self, outcome: Outcome) -> bool:
        """Whether this outcome is a deferral this policy asks again about within the run."""
        return (
            self.retries > 0
            and outcome.kind is OutcomeKind.DEFERRED
            and outcome.reason in self.reasons
            and VmId.try_parse(outcome.vm_id) is not None
        )


@dataclass(frozen=True, slots=True)
class RetryWait:
    """A pass about to start: which one, after how long, and how many VMs wait for which reason."""

    retry: int
    retries: int
    wait_s: float
    reasons: dict[str, int]

    @property
    def vms(self) -> int:
        return sum(self.reasons.values())

    def describe(self) -> str:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(self.reasons.items()))
        return (
            f"retry {self.retry} of {self.retries} in {self.wait_s:g} s: "
            f"{self.vms} VM{'s' if self.vms != 1 else ''} deferred ({why})"
        )


async def retry_deferred(
    outcomes: Sequence[Outcome],
    check: Callable[[VmId], Awaitable[Outcome]],
    policy: RetryPolicy,
    settings: Settings,
    *,
    concurrency: int,
    on_wait: Callable[[RetryWait], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[Outcome]:
    """``outcomes`` with the retriable deferrals checked again, in passes, by ``check``.

    The result keeps the order of ``outcomes``. A VM checked more than once carries ``tries`` in its
    details; every deferral left at the end carries the CLI's "run again later" hint, except one
    whose hint already names the network resource at fault (``kmsPath``).
    """
    result = list(outcomes)
    tries = [1] * len(result)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def again(index: int) -> None:
        async with gate:
            outcome = await check(VmId.parse(result[index].vm_id))
        tries[index] += 1
        result[index] = outcome

    for retry in range(1, policy.retries + 1):
        due = [i for i, outcome in enumerate(result) if policy.retries_now(outcome)]
        if not due:
            break
        wait = policy.wait_s(retry)
        if on_wait is not None:
            reasons = Counter(result[i].reason for i in due)
            on_wait(RetryWait(retry, policy.retries, wait, dict(reasons)))
        await sleep(wait)
        await asyncio.gather(*(again(i) for i in due))

    for i, outcome in enumerate(result):
        details = dict(outcome.details)
        if tries[i] > 1 and "tries" not in outcome.details:  # a given-up unreadable answer has its own
            details["tries"] = tries[i]
        if outcome.kind is OutcomeKind.DEFERRED and "kmsPath" not in outcome.details:
            # A deferral with Azure's diagnosis of the KMS path keeps the workflow's hint: it names
            # the resource at fault and its fix, which the generic "run again later" would drop.
            result[i] = replace(
                outcome, hint=rerun_hint(outcome.reason, settings, tries=tries[i]), details=details
            )
        elif tries[i] > 1:
            result[i] = replace(outcome, details=details)
    return result


def still_deferred(outcomes: Sequence[Outcome]) -> int:
    """How many VMs a run leaves deferred (the run then exits 3 unless something failed)."""
    return sum(1 for o in outcomes if o.kind is OutcomeKind.DEFERRED)
