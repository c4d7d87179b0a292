"""Review of issue 9 (items 1 and 5): a workflow cancelled while its outcome row is being written.

The worker's rule (shared/worker.py, docs/reliability.md "Storage trouble never erases the audit
trail"): when the history row cannot be written, no verdict is stored and the intent stays pending,
so the next holder detects again. The guard caught ``Exception`` only. A cancelled task (an
``asyncio.timeout`` around the invocation, a host draining its invocations, an interpreter shutting
down) raises ``CancelledError``, a ``BaseException``: the ``finally`` still released the lease
*with* the verdict, clearing the pending intent, while no outcome row was written. The state row
then claimed a verdict the history never showed (and a later ``recently-verified`` answered
from it), exactly what the rule is there to prevent.

Fakes stand in for the ledger and the workflow: what matters is what the worker hands to
``release`` when ``record`` does not complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.model import Outcome, OutcomeKind, Trigger, VmId, WorkItem
from shared.settings import Settings
from shared.worker import Worker
from shared.workflow import BeforeRunCommand, Recent

VM = VmId.parse(
    "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/"
    "Microsoft.Compute/virtualMachines/web-01"
)


class _Lease:
    previous = None
    interrupted: dict[str, Any] | None = None


class _Ledger:
    def __init__(self, failure: BaseException) -> None:
        self.failure = failure
        self.released: list[Outcome | None] = []

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Any:
        return _Lease()

    async def release(self, lease: Any, outcome: Outcome | None) -> None:
        self.released.append(outcome)

    async def renew(self, lease: Any, *, intent: Mapping[str, Any] | None = None) -> None:
        return None

    async def record_intent(self, vm_id: VmId, **kwargs: Any) -> None:
        return None

    async def record(self, vm_id: VmId, **kwargs: Any) -> None:
        raise self.failure

    async def record_event(self, target: str, **kwargs: Any) -> None:
        return None


class _Healthy:
    async def check(
        self, vm_id: VmId, *, before_run_command: BeforeRunCommand | None = None, recent: Recent | None = None
    ) -> Outcome:
        if before_run_command is not None:
            await before_run_command("detect", {})
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "licensed", details={"osDiskId": "disk-1"})


class _Queue:
    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None:
        return None


class _Resolver:
    async def resolve_computer(self, computer: str) -> list[VmId]:
        return []


def _worker(ledger: _Ledger) -> Worker:
    settings = Settings.from_env({})
    return Worker(
        remediator=_Healthy(), ledger=ledger, queue=_Queue(), resolver=_Resolver(), settings=settings
    )


ITEM = WorkItem(Trigger.SWEEP, vm_id=VM, correlation_id="c-1", first_seen=datetime.now(UTC).isoformat())


@pytest.mark.parametrize("failure", [RuntimeError("table down"), asyncio.CancelledError()])
async def test_no_verdict_is_stored_when_the_outcome_row_was_not_written(failure: BaseException) -> None:
    ledger = _Ledger(failure)
    with pytest.raises(type(failure)):
        await _worker(ledger).handle(ITEM)
    assert ledger.released == [None]  # the lease freed, no verdict, the intent (if any) left pending
