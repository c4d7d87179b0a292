"""Review r12d: the CLI's scope check (shared/cli.py ``_Scoped.check``, 5e48e22) defers a VM whose
scope Resource Graph could not answer for now, for a reason the CLI retries within the run
(shared/inrun_retry.py ``IN_RUN_RETRIED``): throttled (429) and unavailable (5xx, no answer) alike.
A refusal (403, a bad query) is still a failure, never retried, and nothing is checked either way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.azure.inventory import InventoryError, InventoryUnavailable
from shared.cli import _Scoped
from shared.inrun_retry import RetryPolicy
from shared.model import Outcome, OutcomeKind, VmId

VM = VmId.parse(
    "/subscriptions/5b0e8d2c-1f6a-4c39-9d7e-2a4b6c8d0e1f/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
)


class _Scope:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def check(self, vm_id: VmId) -> Outcome | None:
        raise self.error

    def describe(self) -> str:
        return "management group mg"


class _Remediator:
    settings: Any = None
    checked = 0

    async def check(self, vm_id: VmId, **_: Any) -> Outcome:
        self.checked += 1
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "ok")


def _outcome(error: Exception) -> tuple[Outcome, int]:
    remediator = _Remediator()
    outcome = asyncio.run(_Scoped(remediator, _Scope(error)).check(VM))  # type: ignore[arg-type]
    return outcome, remediator.checked


@pytest.mark.parametrize(
    ("error", "reason", "wait"),
    [
        (InventoryUnavailable("429", reason="throttled", status=429, retry_after_s=4.0), "throttled", 4.0),
        (InventoryUnavailable("503", reason="arm-unavailable", status=503), "arm-unavailable", None),
        (InventoryUnavailable("connection reset", reason="arm-unavailable"), "arm-unavailable", None),
    ],
)
def test_a_scope_resource_graph_cannot_answer_for_now_is_a_deferral_retried_within_the_run(
    error: InventoryUnavailable, reason: str, wait: float | None
) -> None:
    outcome, checked = _outcome(error)
    assert (outcome.kind, outcome.reason, checked) == (OutcomeKind.DEFERRED, reason, 0)
    assert RetryPolicy().retries_now(outcome)
    assert outcome.details.get("retryAfterS") == wait
    assert outcome.details["scope"] == "management group mg"


@pytest.mark.parametrize("reason", ["forbidden", "arm-error"])
def test_a_scope_resource_graph_refused_fails_the_vm_and_is_not_retried(reason: str) -> None:
    outcome, checked = _outcome(InventoryError("refused", reason=reason, status=403))
    assert (outcome.kind, outcome.reason, checked) == (OutcomeKind.FAILED, "scope-unknown", 0)
    assert not RetryPolicy().retries_now(outcome)
