"""The last-resort queue: what the poison handler itself could not record, recorded once storage is back.

The Functions host moves a message to ``<queue>-poison`` after ``maxDequeueCount`` failed
deliveries, for any queue trigger, the poison queue's own trigger included. When
``vm-checks-poison``'s handler cannot write the ledger (a Table outage of a few minutes, or a row
Table storage refuses) its messages end in ``vm-checks-poison-poison``, which no trigger reads.
:func:`drain` reads it on a timer: each message is recorded as ``failed: poison`` (details
``lastResort: true``) and deleted only after its row is written. When the row under the message's
own target is refused, it is recorded under ``last-resort-message`` with the body instead; when
that fails too, storage is still down: the drain stops, and the messages it holds become visible
again for the next run. Nothing is deleted unrecorded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError

from shared.model import Outcome, OutcomeKind, WorkItem
from shared.settings import POISON_QUEUE, Settings
from shared.telemetry import log_outcome
from shared.workqueue import QueueError, WorkQueue

log = logging.getLogger(__name__)

LAST_RESORT_QUEUE: Final = POISON_QUEUE + "-poison"  # the host's "<queue>-poison", applied twice
FALLBACK_TARGET: Final = "last-resort-message"
POISON_HINT: Final = "The worker failed on this item repeatedly; see the function's logs for the exception."
LAST_RESORT_HINT: Final = (
    "The poison handler could not record this item either (storage trouble, or a row Table "
    "storage refused); it was drained from " + LAST_RESORT_QUEUE + "."
)
# One run handles at most this many messages (a backlog is drained over several runs, each well
# inside functionTimeout), holding each invisible this long while it is recorded.
MAX_PER_RUN: Final = 512
VISIBILITY_S: Final = 300


class RecorderPort(Protocol):
    """What the drain needs from ``shared.ledger.Ledger``."""

    async def record_event(
        self,
        target: str,
        kind: str,
        reason: str,
        *,
        hint: str = "",
        details: dict[str, Any] | None = None,
        trigger: str = "",
        correlation_id: str = "",
        attempt: int = 0,
    ) -> None: ...


@dataclass
class Message:
    id: str
    pop_receipt: str
    body: str
    dequeue_count: int
    inserted_on: str = ""


@dataclass
class DrainReport:
    recorded: int = 0
    fallback: int = 0
    stopped: str = ""  # why the run stopped early (storage still down), "" when it ran out of messages
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"recorded": self.recorded, "fallback": self.fallback, "stopped": self.stopped}


class DrainQueue(WorkQueue):
    """A queue read by this process: receive and delete (the work queue only sends)."""

    @classmethod
    def last_resort(cls, settings: Settings, credential: AsyncTokenCredential | None) -> DrainQueue:
        return cls(WorkQueue.from_settings(settings, credential, name=LAST_RESORT_QUEUE)._client)

    async def receive(self, *, max_messages: int, visibility_s: int) -> AsyncIterator[Message]:
        try:
            async for message in self._client.receive_messages(
                messages_per_page=min(max_messages, 32),
                max_messages=max_messages,
                visibility_timeout=visibility_s,
            ):
                inserted = message.inserted_on.isoformat() if message.inserted_on else ""
                yield Message(
                    message.id,
                    message.pop_receipt or "",
                    message.content if isinstance(message.content, str) else str(message.content),
                    int(message.dequeue_count or 0),
                    inserted,
                )
        except ResourceNotFoundError:  # never created: nothing ever landed there
            return
        except AzureError as error:
            raise QueueError(f"cannot read {LAST_RESORT_QUEUE}: {error}") from error

    async def delete(self, message: Message) -> None:
        try:
            await self._client.delete_message(message.id, message.pop_receipt)
        except AzureError as error:
            raise QueueError(f"cannot delete a message of {LAST_RESORT_QUEUE}: {error}") from error


def describe(body: str) -> tuple[str, str, str, int]:
    """(target, trigger, correlation id, attempt) of a work item's body, or of an unparsable one."""
    try:
        item = WorkItem.from_dict(json.loads(body))
    except (ValueError, TypeError, RecursionError):
        return "unparsable-message", "queue", "", 0
    return item.target, item.reason.value, item.correlation_id, item.attempt


async def record_poison(
    ledger: RecorderPort, body: str, *, hint: str = POISON_HINT, extra: dict[str, Any] | None = None
) -> bool:
    """``failed: poison`` for ``body``; under :data:`FALLBACK_TARGET` when its own target's row is
    refused. True when the fallback was used. Raises when neither row can be written."""
    target, trigger, correlation, attempt = describe(body)
    details = {"body": body[:1000], **(extra or {})}
    fallback = False
    try:
        await ledger.record_event(
            target,
            OutcomeKind.FAILED.value,
            "poison",
            hint=hint,
            details=details,
            trigger=trigger,
            correlation_id=correlation,
            attempt=attempt,
        )
    except Exception as error:  # noqa: BLE001 - any refusal: try the row nothing in the body can spoil
        log.warning(
            "poison row for %r refused (%s); recording under %s", target[:200], error, FALLBACK_TARGET
        )
        await ledger.record_event(
            FALLBACK_TARGET,
            OutcomeKind.FAILED.value,
            "poison",
            hint=hint,
            details={**details, "target": target[:300], "error": str(error)[:300]},
            trigger=trigger[:100],
            correlation_id=correlation[:200],
            attempt=attempt,
        )
        fallback = True
    log_outcome(
        Outcome(target, OutcomeKind.FAILED, "poison"),
        trigger=trigger,
        correlation_id=correlation,
        attempt=attempt,
    )
    return fallback


async def drain(
    queue: DrainQueue,
    ledger: RecorderPort,
    *,
    max_messages: int = MAX_PER_RUN,
    visibility_s: int = VISIBILITY_S,
) -> DrainReport:
    """Record and delete what is in the last-resort queue, up to ``max_messages``."""
    report = DrainReport()
    async for message in queue.receive(max_messages=max_messages, visibility_s=visibility_s):
        extra = {"lastResort": True, "queue": LAST_RESORT_QUEUE, "dequeueCount": message.dequeue_count}
        if message.inserted_on:
            extra["insertedOn"] = message.inserted_on
        try:
            fallback = await record_poison(ledger, message.body, hint=LAST_RESORT_HINT, extra=extra)
        except Exception as error:  # noqa: BLE001 - storage still down: leave it, and the rest, for the next run
            report.stopped = f"{type(error).__name__}: {str(error)[:300]}"
            log.error("last-resort drain stopped, storage still failing: %s", report.stopped)
            break
        await queue.delete(message)
        report.recorded += 1
        report.fallback += int(fallback)
        report.targets.append(describe(message.body)[0])
    if report.recorded or report.stopped:
        log.error(
            "last-resort queue %s: %d messages recorded as failed: poison (%d under %s)%s",
            LAST_RESORT_QUEUE,
            report.recorded,
            report.fallback,
            FALLBACK_TARGET,
            f"; stopped: {report.stopped}" if report.stopped else "",
        )
    return report
