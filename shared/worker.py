"""The queue worker: one work item in, one recorded outcome (or a recorded retry) out.

Per message: resolve a computer name to VM ids, take the VM's lease in the ledger (so duplicate or
concurrent deliveries never run two workflows on one VM), run the workflow, re-enqueue a deferral
with a growing delay until its deadline, record the verdict and the history row, release the lease.

Delivery guarantees (docs/reliability.md, "Delivery guarantees"):

- A delivery that finds the VM leased by another workflow is never dropped: it is re-enqueued with
  a delay no longer than the lease (``deferred: lease-held``, recorded) and runs afresh once the
  lease is released or has expired.
- Before every Run Command the lease is renewed (ETag); if it was lost, nothing is POSTed. Before a
  remediation POST an ``intent`` row goes to the history and the intent onto the VM's state row, so
  a worker killed after the POST leaves evidence, and the next holder re-detects the VM whatever its
  stored verdict says.
- The outcome is logged before the ledger write; the write is retried with backoff. If Table storage
  is still unreachable (a refused connection, a timeout, a 5xx: ``storage_unavailable``), the item
  is carried on as a fresh copy with a growing delay (``deferred: ledger-unavailable``, logged), so
  that an outage longer than ``maxDequeueCount`` deliveries does not end it ``failed: poison``; the
  copy writes that row once the ledger answers, then runs the workflow afresh. A definite refusal
  (401/403, a missing table), an outage past ``DEFER_DEADLINE_HOURS``, or a queue that cannot take the
  copy either makes the invocation raise: the host retries the message and, after
  ``maxDequeueCount``, moves it to the poison queue, whose handler records ``failed: poison``.
- A retry (or a lease wait) is put on the queue only after its row is written and the lease
  released, so a ledger failure never leaves a retry and a carried copy of the same delivery. A
  carried copy that meets the outage again counts on from its first missed delivery, whatever rows
  went through in between, so that the deadline holds for a ledger that takes some rows only.
"""

from __future__ import annotations

import json
import logging
import math
import random
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from shared.azure.transient import TransientError
from shared.ledger import LeaseLost, LedgerError, storage_unavailable
from shared.model import MAX_ATTEMPT, Outcome, OutcomeKind, Trigger, VmId, WorkItem
from shared.scope import Scope
from shared.settings import Settings
from shared.telemetry import log_outcome
from shared.unreadable import MAX_UNREADABLE_TRIES, give_up, is_unreadable
from shared.workflow import BeforeRunCommand, Recent, detect_first

log = logging.getLogger(__name__)

MAX_DEFER_DELAY_S = 6 * 3600
# No retry of a deferral waits longer than this share of DEFER_DEADLINE_HOURS. The delay doubles
# per attempt (DEFER_DELAY_SECONDS x 2^attempt), which alone gives a logarithmic number of looks: 10
# in 24 h with the defaults, the last ones 6 h apart (7 in the chaos run's 126 s), so that a VM whose
# agent is Ready only now and then (or that another tool keeps busy) was given up on after a few
# unlucky looks. Capped at 1/16 of the deadline (90 min by default), the window holds 20 (19).
DEADLINE_SHARE = 16
# Triggers whose item says "something may have changed on this VM": a fresh verdict answers them
# unless their evidence is newer than it. The sweep already skips fresh VMs; manual means "check now".
_EVIDENCE_TRIGGERS = frozenset({Trigger.VM_CREATED, Trigger.ALERT, Trigger.LOG_SCAN})


class Lease(Protocol):
    """A held lease (opaque to the worker)."""


class LedgerPort(Protocol):
    """What the worker needs from ``shared.ledger.Ledger``."""

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Any: ...

    async def release(self, lease: Any, outcome: Outcome | None) -> None: ...

    async def renew(self, lease: Any, *, intent: Mapping[str, Any] | None = None) -> None: ...

    async def record_intent(
        self,
        vm_id: VmId,
        *,
        phase: str,
        reason: str,
        details: Mapping[str, Any] | None,
        trigger: str,
        correlation_id: str,
        attempt: int,
    ) -> None: ...

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
        attempt: int = 0,
    ) -> None: ...


class QueuePort(Protocol):
    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None: ...


class ResolverPort(Protocol):
    async def resolve_computer(self, computer: str) -> list[VmId]: ...


class CheckPort(Protocol):
    async def check(
        self,
        vm_id: VmId,
        *,
        before_run_command: BeforeRunCommand | None = None,
        recent: Recent | None = None,
    ) -> Outcome: ...


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
            # and as an outcome record, which the workbook and docs/operations.md count
            malformed = Outcome("unparsable-message", OutcomeKind.FAILED, "malformed-message")
            log_outcome(malformed, trigger="queue", correlation_id="")
            return []
        return await self.handle(item, now=now)

    async def handle(self, item: WorkItem, *, now: datetime | None = None) -> list[Outcome]:
        now = now or datetime.now(UTC)
        item = item.clamped(now)
        # A new outage carries on this delivery's count and first missed time even once its row is
        # written: a ledger that takes that row but not the VM's (a 5xx on one partition) must still
        # reach DEFER_DEADLINE_HOURS, not be carried for ever from a fresh "since" (review r9c).
        carried = item
        try:
            if item.ledger_missed:
                await self._record_missed(item)
                item = replace(item, ledger_missed=0, ledger_missed_since="")
            return await self._handle(item, now)
        except LedgerError as error:
            if not storage_unavailable(error):
                raise
            return [await self._outlast_storage(carried, error, now)]

    async def _record_missed(self, item: WorkItem) -> None:
        """The row of the deliveries Table storage could not take, now that it answers again."""
        await self._ledger.record_event(
            item.target,
            kind=OutcomeKind.DEFERRED.value,
            reason="ledger-unavailable",
            trigger=item.reason.value,
            correlation_id=item.correlation_id,
            details={"copies": item.ledger_missed, "since": item.ledger_missed_since},
            attempt=item.attempt,
        )

    async def _outlast_storage(self, item: WorkItem, error: LedgerError, now: datetime) -> Outcome:
        """Table storage is unreachable while the queue works: carry the item on as a fresh copy with
        a growing delay, instead of raising into the host's ``maxDequeueCount`` and the poison queue.

        Nothing of this delivery needs undoing: a verdict is only stored with its history row, an
        interrupted remediation leaves its intent on the VM's state row (the copy detects afresh), and
        the lease this delivery may still hold expires. Past DEFER_DEADLINE_HOURS of outage, or when the
        queue refuses the copy too, the error is raised: the host's retries and the poison queue then
        take over (docs/reliability.md)."""
        since = _parse_time(item.ledger_missed_since) or now
        if (now - since).total_seconds() >= self._settings.defer_deadline_s:
            log.error("ledger down for %s since %s: the item goes to the host", item.target[:200], since)
            raise error
        delay = self._retry_delay(item.ledger_missed)
        copy = replace(
            item,
            ledger_missed=min(item.ledger_missed + 1, MAX_ATTEMPT),
            ledger_missed_since=since.isoformat(),
        )
        try:
            await self._queue.send(copy, delay_s=delay)
        except Exception as send_error:
            log.error("ledger and queue both failed for %s: %s", item.target[:200], send_error)
            raise error from send_error
        outcome = Outcome(
            item.target,
            OutcomeKind.DEFERRED,
            "ledger-unavailable",
            details={
                "error": str(error)[:300],
                "retryInS": delay,
                "copies": copy.ledger_missed,
                "since": copy.ledger_missed_since,
            },
        )
        _log(item, outcome)
        return outcome

    async def _handle(self, item: WorkItem, now: datetime) -> list[Outcome]:
        if item.vm_id is None:
            return await self._resolve(item)
        try:
            refused = await self._out_of_scope(item, item.vm_id)
        except TransientError as error:
            # A management group's membership is asked of Resource Graph, which throttles: no answer
            # about the VM yet, and nothing was done. Deferred like a throttled name lookup.
            return [await self._defer_transient(item, error)]
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
        _log(item, outcome)
        return outcome

    async def _resolve(self, item: WorkItem) -> list[Outcome]:
        assert item.computer is not None
        try:
            vms = await self._resolver.resolve_computer(item.computer)
        except ValueError as error:  # a name the inventory refuses to query with
            vms = []
            log.warning("computer name %r rejected: %s", item.computer[:80], error)
        except TransientError as error:
            return [await self._defer_transient(item, error)]
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
            _log(item, outcome)
            return [outcome]
        for vm_id in vms:  # one item per VM; each gets its own lease and outcome
            await self._queue.send(replace(item, vm_id=vm_id, computer=None))
        return []

    async def _defer_transient(self, item: WorkItem, error: TransientError) -> Outcome:
        """A dependency refused for now (a throttled or unavailable lookup, before any lease): re-enqueue
        with a growing delay, at least the wait the service named, until the deadline; then failed.
        Recorded either way, under the item's target."""
        now = datetime.now(UTC)
        first = _parse_time(item.first_seen) or now
        details: dict[str, Any] = {"error": str(error)[:300]}
        retry, delay = item, 0.0
        if item.computer is not None:
            details["computer"] = item.computer
        if self._deferred_long_enough(item):
            kind, reason = OutcomeKind.FAILED, f"deadline-exceeded:{error.reason}"
            details.update(attempts=item.attempt + 1, deferredS=item.deferred_s)
        else:
            wait = error.retry_after_s or 0.0
            delay = min(max(self._retry_delay(item.attempt), wait), MAX_DEFER_DELAY_S)
            retry = replace(
                item,
                attempt=_next(item),
                first_seen=first.isoformat(),
                deferred_s=_counted(item, delay),
            )
            kind, reason = OutcomeKind.DEFERRED, error.reason
            details.update(retryInS=delay, nextAttempt=_next(item))
        deferred = Outcome(item.target, kind, reason, details=details)
        _log(item, deferred)
        await self._ledger.record_event(
            item.target,
            kind=kind.value,
            reason=reason,
            trigger=item.reason.value,
            correlation_id=item.correlation_id,
            details=details,
        )
        if kind is OutcomeKind.DEFERRED:  # sent once its row is written (module docstring)
            await self._queue.send(retry, delay_s=delay)
        return deferred

    async def _check(self, item: WorkItem, vm_id: VmId, now: datetime) -> Outcome:
        trigger, correlation = item.reason.value, item.correlation_id
        lease = await self._ledger.acquire(vm_id, owner=self.owner, now=now)
        if lease is None:
            # Another workflow holds the VM. It may be a worker that died after its POST, whose lease
            # only time frees: come back when it is free and detect again, never drop the delivery.
            return await self._wait_for_lease(item, vm_id, "lease-held")
        outcome: Outcome | None = None
        retry: tuple[WorkItem, float] | None = None
        lost = False
        try:
            interrupted: dict[str, Any] | None = getattr(lease, "interrupted", None)
            recent = None if interrupted else self._recent(item, lease, now)
            try:
                outcome = await self._remediator.check(
                    vm_id, before_run_command=self._guard(item, vm_id, lease), recent=recent
                )
            except LeaseLost:
                # Renewal found the lease taken over (it had expired): nothing was POSTed.
                lost = True
            else:
                if interrupted:
                    outcome.details["interrupted"] = interrupted
                if outcome.kind is OutcomeKind.DEFERRED:
                    outcome, retry = self._defer(item, vm_id, outcome, now)
                # The log line first: if the ledger cannot take the row, the outcome is still on record.
                _log(item, outcome)
                try:
                    await self._ledger.record(
                        vm_id,
                        outcome=outcome,
                        trigger=trigger,
                        correlation_id=correlation,
                        attempt=item.attempt,
                    )
                except BaseException:
                    # No history row: store no verdict either, keep the intent on the state row, and let
                    # the message be retried; the next delivery detects the VM's real state again. A
                    # cancellation (BaseException) is no different: the row may not have been written.
                    outcome = None
                    raise
        finally:
            stored = outcome
            if outcome is not None and outcome.reason == "recently-verified":
                stored = None  # the verdict it relied on stays as it was (verifiedAt included)
            await self._ledger.release(lease, stored)
        # What continues this delivery (a retry, a lease wait) is sent only once the ledger has done
        # with it, the release included: a release Table storage refuses carries the item on instead
        # (``handle``), and two continuations of one delivery would each run to the deadline (r9c).
        if lost:
            return await self._wait_for_lease(item, vm_id, "lease-lost")
        assert outcome is not None
        if retry is not None:
            await self._queue.send(retry[0], delay_s=retry[1])
        return outcome

    def _guard(self, item: WorkItem, vm_id: VmId, lease: Any) -> BeforeRunCommand:
        """The hook the workflow awaits before each Run Command POST."""

        async def before(phase: str, details: Mapping[str, Any]) -> None:
            if item.unreadable:
                # An earlier answer for this item said nothing about the VM: that Run Command may
                # have been a conditional re-key that installed the key. Detect first (nothing is
                # POSTed for the re-key, so no intent for it), then decide on what the VM shows now.
                await detect_first(phase, details)
            intent = {"phase": phase, "owner": self.owner, "correlationId": item.correlation_id}
            # LeaseLost here means another delivery may be running: abort without POSTing.
            await self._ledger.renew(lease, intent=intent if phase == "remediate" else None)
            if phase == "remediate":
                await self._ledger.record_intent(
                    vm_id,
                    phase=phase,
                    reason=str(details.get("reason", "")),
                    details=dict(details),
                    trigger=item.reason.value,
                    correlation_id=item.correlation_id,
                    attempt=item.attempt,
                )

        return before

    def _recent(self, item: WorkItem, lease: Any, now: datetime) -> Recent | None:
        """The stored verdict, when it makes a Run Command for this item needless (issue 9)."""
        if item.reason not in _EVIDENCE_TRIGGERS:
            return None
        previous = getattr(lease, "previous", None)
        verified = getattr(previous, "verified_at", None)
        disk = getattr(previous, "os_disk_id", "")
        if not isinstance(verified, datetime) or not disk:
            return None
        if getattr(previous, "outcome", None) not in (OutcomeKind.HEALTHY, OutcomeKind.REMEDIATED):
            return None  # only a good state is worth trusting; anything else is looked at again
        age = (now - verified).total_seconds()
        if age < 0 or age >= self._settings.recheck_after_s:
            return None
        if item.reason is Trigger.VM_CREATED:
            # A VM write (resize, tag, extension, policy) says nothing about the guest's licensing
            # unless the OS disk changed (re-image, swap), which the workflow compares after its read.
            return Recent(verified_at=verified, os_disk_id=disk)
        # When the evidence happened (the log row's own time, the alert's firing), else when the
        # item was produced, which is later still: a verdict reached after it has seen it.
        evidence = _parse_time(item.evidence_at) or _parse_time(item.first_seen)
        if evidence is None or evidence > verified:
            return None  # the alert or log row came after the verdict: look again
        return Recent(verified_at=verified, os_disk_id=disk)

    async def _wait_for_lease(self, item: WorkItem, vm_id: VmId, reason: str) -> Outcome:
        """Re-enqueue until the lease holder is done (or its lease expired), recording the retry."""
        trigger, correlation = item.reason.value, item.correlation_id
        # Not a deferral of this item's own (the attempt count and deadline stay as they are): one
        # DEFER_DELAY, spread by jitter so that duplicates do not meet again, never past the lease.
        delay = max(1.0, min(self._settings.defer_delay_s * random.uniform(1.0, 2.0), self._settings.lease_s))  # noqa: S311 (jitter)
        retry = replace(item, vm_id=vm_id, computer=None)
        waiting = Outcome(
            str(vm_id),
            OutcomeKind.DEFERRED,
            reason,
            details={"attempt": item.attempt, "retryInS": round(delay, 3)},
        )
        _log(item, waiting)
        await self._ledger.record(
            vm_id, outcome=waiting, trigger=trigger, correlation_id=correlation, attempt=item.attempt
        )
        await self._queue.send(retry, delay_s=delay)  # once its row is written (module docstring)
        return waiting

    def _defer(
        self, item: WorkItem, vm_id: VmId, outcome: Outcome, now: datetime
    ) -> tuple[Outcome, tuple[WorkItem, float] | None]:
        """Re-enqueue with exponential delay until the deadline (the delays summed); then the
        deferral becomes a failure.

        A Run Command answer that said nothing about the VM (``run-command-failed``, ``bad-output``)
        is retried the same way, and is terminal on the item's ``MAX_UNREADABLE_TRIES``-th
        (shared/unreadable.py). The retry runs the whole workflow, detection first. Returns the
        outcome to record and the retry to send once it is recorded (none when terminal)."""
        first = _parse_time(item.first_seen) or now
        hours = self._settings.defer_deadline_s / 3600
        unreadable = item.unreadable + 1 if is_unreadable(outcome) else item.unreadable
        if self._deferred_long_enough(item):
            details = {
                **outcome.details,
                "deferredReason": outcome.reason,
                "attempts": item.attempt + 1,
                "deferredS": item.deferred_s,
            }
            failed = Outcome(
                str(vm_id),
                OutcomeKind.FAILED,
                f"deadline-exceeded:{outcome.reason}",
                hint=f"Still '{outcome.reason}' after {hours:g} h of retries. {outcome.hint}",
                details=details,
            )
            return failed, None
        if is_unreadable(outcome) and unreadable >= MAX_UNREADABLE_TRIES:
            return give_up(outcome, unreadable), None
        # At least the wait ARM named (a 429's or 503's Retry-After): a retry sent sooner is refused
        # again (request-limits-and-throttling.md), and costs the VM one of its looks.
        delay = min(max(self._retry_delay(item.attempt), _named_wait(outcome)), MAX_DEFER_DELAY_S)
        retry = replace(
            item,
            vm_id=vm_id,
            computer=None,
            attempt=_next(item),
            first_seen=first.isoformat(),
            unreadable=unreadable,
            deferred_s=_counted(item, delay),
        )
        deferred = Outcome(
            outcome.vm_id,
            outcome.kind,
            outcome.reason,
            outcome.hint,
            {**outcome.details, "retryInS": delay, "nextAttempt": _next(item)},
        )
        return deferred, (retry, delay)

    def _deferred_long_enough(self, item: WorkItem) -> bool:
        """Whether the item's retries have waited ``DEFER_DEADLINE_HOURS`` in all: the delays the
        engine scheduled, summed (``deferredS``), not the time since the item appeared. Time spent
        waiting for the engine itself (a queue backlog of thousands, a storage outage, a dead
        worker's lease) would otherwise cost the item its retries: in the chaos runs healthy VMs
        ended ``deadline-exceeded`` at their first deferral, or after a 1 s retry that came back 47 s
        later behind the queue. Each retry comes back no sooner than its delay, so the item has been
        deferred at least this long."""
        return item.deferred_s >= self._settings.defer_deadline_s

    def _retry_delay(self, attempt: int) -> float:
        """DEFER_DELAY_SECONDS x 2^attempt, at most 1/DEADLINE_SHARE of the deadline (never less than
        DEFER_DELAY_SECONDS) and MAX_DEFER_DELAY_S."""
        base = self._settings.defer_delay_s
        backoff = base * (2 ** min(max(attempt, 0), 30))
        cap = max(self._settings.defer_deadline_s / DEADLINE_SHARE, base)
        return float(min(backoff, cap, MAX_DEFER_DELAY_S))


def _log(item: WorkItem, outcome: Outcome) -> None:
    """The outcome's log record (``avma-outcome``), with the item it answers."""
    log_outcome(
        outcome,
        trigger=item.reason.value,
        correlation_id=item.correlation_id,
        attempt=item.attempt,
        first_seen=item.first_seen,
    )


def _named_wait(outcome: Outcome) -> float:
    """The ``retryAfterS`` the workflow put in a deferral's details (shared/workflow.py), else 0."""
    wait = outcome.details.get("retryAfterS")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not math.isfinite(wait):
        return 0.0
    return max(0.0, float(wait))


def _next(item: WorkItem) -> int:
    """The retry's attempt: one more, but never past ``MAX_ATTEMPT``, where every reader clamps it
    (a retry sent with 1,001 was read back as 1,000, so its record never matched what was sent)."""
    return min(item.attempt + 1, MAX_ATTEMPT)


def _counted(item: WorkItem, delay_s: float) -> float:
    """The item's deferral time with one more retry of ``delay_s`` (at least a second, so that a
    DEFER_DELAY_SECONDS of 0 still reaches the deadline)."""
    return round(item.deferred_s + max(delay_s, 1.0), 3)


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
