"""The queue worker: one work item in, one recorded outcome (or a recorded retry) out.

Per message: resolve a computer name to VM ids, take the VM's lease in the ledger (so duplicate or
concurrent deliveries never run two workflows on one VM), run the workflow, re-enqueue a deferral
with a growing delay until its deadline, record the verdict and the history row, release the lease.
Anything that cannot be recorded raises, so the Functions host retries the message and, after
``maxDequeueCount``, moves it to the poison queue, whose handler records ``failed: poison``.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from shared.azure.transient import TransientError
from shared.model import Outcome, OutcomeKind, VmId, WorkItem
from shared.scope import Scope
from shared.settings import Settings
from shared.telemetry import log_outcome

log = logging.getLogger(__name__)

MAX_DEFER_DELAY_S = 6 * 3600


class Lease(Protocol):
    """A held lease (opaque to the worker)."""


class LedgerPort(Protocol):
    """What the worker needs from ``shared.ledger.Ledger``."""

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Any: ...

    async def release(self, lease: Any, outcome: Outcome | None) -> None: ...

    async def record(
        self, vm_id: VmId, *, outcome: Outcome, trigger: str, correlation_id: str, attempt: int
    ) -> None: ...

    async def record_event(
        self,
        target: str,
        *,
        kind: str,
        reason: str,
        trigger: str,
        correlation_id: str,
        details: dict[str, Any],
    ) -> None: ...


class QueuePort(Protocol):
    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None: ...


class ResolverPort(Protocol):
    async def resolve_computer(self, computer: str) -> list[VmId]: ...


class CheckPort(Protocol):
    async def check(self, vm_id: VmId) -> Outcome: ...


class Worker:
    """Handles one queue message at a time; safe to run many at once across instances."""

    def __init__(
        self,
        *,
        remediator: CheckPort,
        ledger: LedgerPort,
        queue: QueuePort,
        resolver: ResolverPort,
        settings: Settings,
        owner: str | None = None,
        scope: Scope | None = None,
    ) -> None:
        self._remediator = remediator
        self._ledger = ledger
        self._queue = queue
        self._resolver = resolver
        self._settings = settings
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"
        # Without a lookup, a management-group scope refuses every VM: never assumed, always checked.
        self._scope = scope or Scope.from_settings(settings)

    async def handle_message(self, body: str, *, now: datetime | None = None) -> list[Outcome]:
        """A raw queue message: a malformed one is recorded (never retried forever, never lost)."""
        try:
            item = WorkItem.from_dict(json.loads(body))
        except (ValueError, TypeError, RecursionError) as error:
            # JSONDecodeError is a ValueError. A deeply nested body ("[[[[…", a few KB) exhausts the
            # decoder's recursion limit: malformed too, recorded here rather than raised five times.
            await self._ledger.record_event(
                "unparsable-message",
                kind=OutcomeKind.FAILED.value,
                reason="malformed-message",
                trigger="queue",
                correlation_id="",
                details={"error": str(error)[:300], "body": body[:500]},
            )
            log.error("malformed work item recorded and dropped: %s", error)
            return []
        return await self.handle(item, now=now)

    async def handle(self, item: WorkItem, *, now: datetime | None = None) -> list[Outcome]:
        now = now or datetime.now(UTC)
        item = item.clamped(now)
        if item.vm_id is None:
            return await self._resolve(item)
        refused = await self._out_of_scope(item, item.vm_id)
        if refused is not None:
            return [refused]
        return [await self._check(item, item.vm_id, now)]

    async def _out_of_scope(self, item: WorkItem, vm_id: VmId) -> Outcome | None:
        """``skipped: out-of-scope``, recorded, for a VM this deployment must not touch; no lease taken."""
        outcome = await self._scope.check(vm_id)
        if outcome is None:
            return None
        trigger, correlation = item.reason.value, item.correlation_id
        await self._ledger.record(
            vm_id, outcome=outcome, trigger=trigger, correlation_id=correlation, attempt=item.attempt
        )
        log_outcome(outcome, trigger=trigger, correlation_id=correlation, attempt=item.attempt)
        return outcome

    async def _resolve(self, item: WorkItem) -> list[Outcome]:
        assert item.computer is not None
        try:
            vms = await self._resolver.resolve_computer(item.computer)
        except ValueError as error:  # a name the inventory refuses to query with
            vms = []
            log.warning("computer name %r rejected: %s", item.computer[:80], error)
        except TransientError as error:
            # Throttled or briefly down: no answer about the name. Deferred with a growing delay, at
            # least the wait the service named, until the deadline; then failed. Recorded either way.
            now = datetime.now(UTC)
            first = _parse_time(item.first_seen) or now
            details: dict[str, Any] = {"computer": item.computer, "error": str(error)[:300]}
            if now - first >= timedelta(seconds=self._settings.defer_deadline_s):
                kind, reason = OutcomeKind.FAILED, f"deadline-exceeded:{error.reason}"
                details["attempts"] = item.attempt + 1
            else:
                backoff = self._settings.defer_delay_s * (2 ** min(max(item.attempt, 0), 30))
                delay = min(max(backoff, error.retry_after_s or 0.0), MAX_DEFER_DELAY_S)
                retry = replace(item, attempt=item.attempt + 1, first_seen=first.isoformat())
                await self._queue.send(retry, delay_s=delay)
                kind, reason = OutcomeKind.DEFERRED, error.reason
                details.update(retryInS=delay, nextAttempt=item.attempt + 1)
            deferred = Outcome(item.target, kind, reason, details=details)
            log_outcome(deferred, trigger=item.reason.value, correlation_id=item.correlation_id)
            await self._ledger.record_event(
                item.target,
                kind=kind.value,
                reason=reason,
                trigger=item.reason.value,
                correlation_id=item.correlation_id,
                details=details,
            )
            return [deferred]
        if not vms:
            outcome = Outcome(
                item.target, OutcomeKind.SKIPPED, "not-found", details={"computer": item.computer}
            )
            await self._ledger.record_event(
                item.target,
                kind=outcome.kind.value,
                reason=outcome.reason,
                trigger=item.reason.value,
                correlation_id=item.correlation_id,
                details={"computer": item.computer},
            )
            log_outcome(outcome, trigger=item.reason.value, correlation_id=item.correlation_id)
            return [outcome]
        for vm_id in vms:  # one item per VM; each gets its own lease and outcome
            await self._queue.send(replace(item, vm_id=vm_id, computer=None))
        return []

    async def _check(self, item: WorkItem, vm_id: VmId, now: datetime) -> Outcome:
        trigger, correlation = item.reason.value, item.correlation_id
        lease = await self._ledger.acquire(vm_id, owner=self.owner, now=now)
        if lease is None:
            # Another delivery of the same VM is being worked on; it records the outcome.
            duplicate = Outcome(
                str(vm_id), OutcomeKind.SKIPPED, "duplicate", details={"attempt": item.attempt}
            )
            await self._ledger.record(
                vm_id, outcome=duplicate, trigger=trigger, correlation_id=correlation, attempt=item.attempt
            )
            log_outcome(duplicate, trigger=trigger, correlation_id=correlation, attempt=item.attempt)
            return duplicate
        outcome: Outcome | None = None
        try:
            outcome = await self._remediator.check(vm_id)
            if outcome.kind is OutcomeKind.DEFERRED:
                outcome = await self._defer(item, vm_id, outcome, now)
            await self._ledger.record(
                vm_id, outcome=outcome, trigger=trigger, correlation_id=correlation, attempt=item.attempt
            )
            log_outcome(
                outcome,
                trigger=trigger,
                correlation_id=correlation,
                attempt=item.attempt,
                first_seen=item.first_seen,
            )
            return outcome
        finally:
            await self._ledger.release(lease, outcome)

    async def _defer(self, item: WorkItem, vm_id: VmId, outcome: Outcome, now: datetime) -> Outcome:
        """Re-enqueue with exponential delay until the deadline; then the deferral becomes a failure."""
        first = _parse_time(item.first_seen) or now
        hours = self._settings.defer_deadline_s / 3600
        if now - first >= timedelta(seconds=self._settings.defer_deadline_s):
            details = {**outcome.details, "deferredReason": outcome.reason, "attempts": item.attempt + 1}
            return Outcome(
                str(vm_id),
                OutcomeKind.FAILED,
                f"deadline-exceeded:{outcome.reason}",
                hint=f"Still '{outcome.reason}' after {hours:g} h of retries. {outcome.hint}",
                details=details,
            )
        delay = min(self._settings.defer_delay_s * (2**item.attempt), MAX_DEFER_DELAY_S)
        retry = replace(
            item, vm_id=vm_id, computer=None, attempt=item.attempt + 1, first_seen=first.isoformat()
        )
        await self._queue.send(retry, delay_s=delay)
        return Outcome(
            outcome.vm_id,
            outcome.kind,
            outcome.reason,
            outcome.hint,
            {**outcome.details, "retryInS": delay, "nextAttempt": item.attempt + 1},
        )


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
