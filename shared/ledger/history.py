"""The history: append-only rows per target and per day (intents, outcomes, events)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import ResourceExistsError

from shared.ledger._table import (
    _DAY_PREFIX,
    _HISTORY_PREFIX,
    _LAST_DAY,
    _MAX_TICKS,
    _TICKS_AT_0001,
    _UNIX_EPOCH_TICKS,
    LedgerBase,
    _cap,
    _details_json,
    _history_entry,
    _int,
    _storage,
    _utc,
    target_key,
)
from shared.model import Outcome, VmId


class HistoryStore(LedgerBase):
    """Appends (outcome, intent, event rows, each retried) and the per-target history read."""

    async def record(
        self,
        vm_id: VmId,
        *,
        outcome: Outcome,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None = None,
    ) -> None:
        """Append one history row for a workflow's outcome (or a duplicate delivery)."""
        await self._append(
            vm_id,
            entry="outcome",
            kind=outcome.kind.value,
            reason=outcome.reason,
            hint=outcome.hint,
            details=outcome.details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    async def record_intent(
        self,
        vm_id: VmId,
        *,
        phase: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None = None,
    ) -> None:
        """Append an ``intent`` row before a Run Command that may change the VM: a crash after the
        POST then still leaves evidence of what was sent, when, and why."""
        await self._append(
            vm_id,
            entry="intent",
            kind="intent",
            reason=f"{phase}:{reason}" if reason else phase,
            hint="",
            details=details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    async def record_event(
        self,
        target: str,
        kind: str,
        reason: str,
        *,
        hint: str = "",
        details: Mapping[str, Any] | None = None,
        trigger: str = "",
        correlation_id: str = "",
        attempt: int = 0,
        now: datetime | None = None,
    ) -> None:
        """Append a row about anything, e.g. ``failed: poison`` for a computer name or an
        unparsable target: the target is never refused, so the event is never lost."""
        await self._append(
            target,
            entry="event",
            kind=kind,
            reason=reason,
            hint=hint,
            details=details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    def _row_key(self, now: datetime | None) -> tuple[datetime, str]:
        """Inverted ticks (newest first) plus a random suffix; strictly decreasing per ledger."""
        if now is None:
            nanos = time.time_ns()
            at = datetime.fromtimestamp(nanos / 1e9, UTC)
            ticks = max(_UNIX_EPOCH_TICKS + nanos // 100, self._last_ticks + 1)
            self._last_ticks = ticks
        else:
            at = _utc(now)
            ticks = (at - _TICKS_AT_0001) // timedelta(microseconds=1) * 10
        return at, f"{_MAX_TICKS - ticks:019d}-{uuid.uuid4().hex[:16]}"

    async def _append(
        self,
        target: VmId | str,
        *,
        entry: str,
        kind: str,
        reason: str,
        hint: str,
        details: Mapping[str, Any] | None,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None,
    ) -> None:
        at, row_key = self._row_key(now)
        row: dict[str, Any] = {
            "RowKey": row_key,
            "at": at,
            "target": _cap(target),
            "entry": entry,
            "outcome": _cap(kind, 100),
            "reason": _cap(reason),
            "hint": _cap(hint, 4000),
            "details": _details_json(details),
            "trigger": _cap(trigger, 100),
            "correlationId": _cap(correlation_id, 200),
            "attempt": _int(attempt),
        }
        day = f"{_DAY_PREFIX}{(_LAST_DAY - at.date()).days:07d}"
        # The target's copy first: it is the one an operator reads for a VM. The RowKey is fixed
        # before the tries, so a try whose answer was lost makes the next one meet 409: written.
        for partition in (_HISTORY_PREFIX + target_key(target), day):
            entity = {**row, "PartitionKey": partition}

            async def write(entity: dict[str, Any] = entity) -> None:
                with contextlib.suppress(ResourceExistsError):
                    await self._table.create_entity(entity)

            await self._retrying("record", target, write)

    async def history(self, target: VmId | str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """A VM's (or any target's) history rows, newest first."""
        entries: list[dict[str, Any]] = []
        if limit is not None and limit <= 0:
            return entries
        with _storage("read history", target):
            rows = self._table.query_entities(
                "PartitionKey eq @pk",
                parameters={"pk": _HISTORY_PREFIX + target_key(target)},
                results_per_page=min(limit or 1000, 1000),
            )
            async for row in rows:
                entries.append(_history_entry(row))
                if limit is not None and len(entries) >= limit:
                    break
        return entries
