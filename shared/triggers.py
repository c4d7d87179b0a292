"""What each Functions trigger does, as plain async functions (no ``azure.functions`` here).

``function_app.py`` only converts the runtime's objects to these arguments and back. Every call
takes the worker process's one credential and one set of clients for the running event loop
(``shared.clients``): a token request per token lifetime and pooled TLS connections, instead of a
credential, a token request and fresh connections per message. What an invocation holds of its own
(the workflow, the worker with its owner id, a log scanner) is built per call and closed with it.
Tests call these directly against the simulator and Azurite.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential

from shared.azure.compute import ComputeGateway
from shared.azure.inventory import Inventory
from shared.azure.logs import LogScanner
from shared.azure.network import NetworkGateway
from shared.azure.transient import TransientError
from shared.clients import SharedClients, shared_clients
from shared.intake import (
    MAX_ALERT_BYTES,
    IntakeError,
    IntakeResult,
    from_alert,
    from_event_grid,
    from_log_rows,
)
from shared.lastresort import DrainQueue, drain, record_poison
from shared.ledger import Ledger, LedgerError, TableMissing, storage_unavailable
from shared.model import Outcome, Trigger, WorkItem
from shared.retry_later import Answer, answer_or_retry_later
from shared.scope import Scope
from shared.settings import POISON_QUEUE, WORK_QUEUE, Settings
from shared.worker import Worker
from shared.workflow import Remediator
from shared.workqueue import QueueMissing, WorkQueue

log = logging.getLogger(__name__)

LOG_SCAN_MARKER = "log-scan"
_created: set[str] = set()  # queues and tables this process has made sure exist


@dataclass
class Runtime:
    """One invocation's view of the shared clients, and what it opened for itself (``stack``)."""

    settings: Settings
    credential: AsyncTokenCredential
    stack: AsyncExitStack
    clients: SharedClients

    @classmethod
    @asynccontextmanager
    async def open(cls, env: Mapping[str, str] | None = None) -> AsyncIterator[Runtime]:
        settings = Settings.from_env(env)
        clients = await shared_clients(settings, env)
        async with AsyncExitStack() as stack:
            try:
                yield cls(settings, clients.credential, stack, clients)
            except (TableMissing, QueueMissing):
                # Storage no longer has what this process made sure exists (a table or queue deleted,
                # an emulator restarted): check again on the next invocation rather than fail every
                # invocation from now on. This one still fails, so the host retries its message.
                _created.clear()
                raise

    async def queue(self, name: str = WORK_QUEUE) -> WorkQueue:
        queue = self.clients.queue(name)
        if f"queue:{name}" not in _created:  # infra creates it in Azure; Azurite starts empty
            await queue.create_if_needed()
            _created.add(f"queue:{name}")
        return queue

    async def ledger(self) -> Ledger:
        ledger = self.clients.ledger()
        key = f"table:{self.settings.ledger_table}"
        if key not in _created:
            try:
                await ledger.create_table_if_needed()
            except LedgerError as error:
                if not storage_unavailable(error):
                    raise
                # Table storage unreachable (a new instance started in an outage): the worker carries
                # its item past it (shared/worker.py); the table is checked again next time.
                log.warning("ledger table not checked: %s", error)
            else:
                _created.add(key)
        return ledger

    async def inventory(self) -> Inventory:
        return self.clients.inventory()

    async def compute(self) -> ComputeGateway:
        return self.clients.compute()

    async def network(self) -> NetworkGateway:
        gateway = NetworkGateway(self.credential, self.settings)
        self.stack.push_async_callback(gateway.close)
        return gateway


async def enqueue(runtime: Runtime, result: IntakeResult) -> int:
    for reason in result.ignored:
        log.info("intake ignored: %s", reason)
    if not result.items:
        return 0
    queue = await runtime.queue()
    return await queue.send_many(result.items)


async def on_vm_event(event: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> IntakeResult:
    """Event Grid (either schema): a VM write becomes a ``vm-created`` work item."""
    result = from_event_grid(dict(event), now=datetime.now(UTC))
    async with Runtime.open(env) as runtime:
        await enqueue(runtime, result)
    return result


ALERT_QUEUE_DEADLINE_S = 5.0
"""How long the alert webhook may spend reaching the queue before it answers 503.

An action group waits about 10 s for the first answer and retries only 408, 429, 503 and 504
(MicrosoftDocs/azure-docs, articles/azure-monitor/alerts/action-groups.md, "Webhook"), so the
answer must come well within 10 s and a queue outage must be a 503, never a 500."""
ALERT_RETRY_AFTER_S = 20


async def on_alert(
    body: bytes, *, env: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Action-group webhook (common alert schema): 202 with the items, 400 malformed, 413 too big,
    503 with ``Retry-After`` when the queue cannot be reached within ``ALERT_QUEUE_DEADLINE_S``."""
    if len(body) > MAX_ALERT_BYTES:
        limit = f"payload of {len(body)} bytes exceeds the {MAX_ALERT_BYTES}-byte alert limit"
        return 413, {"error": limit}, {}
    settings = Settings.from_env(env)
    try:
        payload = json.loads(body)
        result = from_alert(payload, now=datetime.now(UTC), max_targets=settings.max_targets_per_alert)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and IntakeError are ValueErrors
        kind = "malformed alert" if isinstance(error, IntakeError) else "body is not JSON"
        return 400, {"error": f"{kind}: {str(error)[:500]}"}, {}

    async def queue_them() -> Answer:
        async with Runtime.open(env) as runtime:
            accepted = await enqueue(runtime, result)
        items = [i.to_dict() for i in result.items]
        return 202, {"accepted": accepted, "items": items, "ignored": result.ignored}, {}

    # On a 503 the alert's targets are logged at error level, so an alert the action group gives
    # up on is still on record.
    return await answer_or_retry_later(
        queue_them(),
        deadline_s=ALERT_QUEUE_DEADLINE_S,
        retry_after_s=ALERT_RETRY_AFTER_S,
        error="alert not queued: the work queue is unavailable ({why}); retry later",
        detail=", ".join(i.target for i in result.items),  # each target, for a re-check later
        level=logging.ERROR,
    )


async def log_scan(*, now: datetime | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Query the workspace for 0xC004FD02 since the last scan (with overlap) and enqueue the VMs."""
    now = now or datetime.now(UTC)
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        since = await ledger.get_marker(LOG_SCAN_MARKER)
        scanner = LogScanner(runtime.credential, runtime.settings)
        runtime.stack.push_async_callback(scanner.close)
        try:
            scan = await scanner.scan(since=since, now=now)
        except TransientError as error:
            # Throttled or briefly down: not a failure of the timer. The marker stays where it was,
            # so the next scan's window starts there and covers this one's.
            _log_transient("log scan", error, f"the marker stays at {since.isoformat() if since else 'none'}")
            return {"rows": 0, "enqueued": 0, "partialError": None, **_transient(error)}
        result = from_log_rows(scan.rows, now=now, source=f"log-scan:{scan.window[1].isoformat()}")
        sent = await enqueue(runtime, result)
        # A partial scan is not a complete one: keep the old marker so the next scan covers it again.
        if not scan.partial_error:
            await ledger.set_marker(LOG_SCAN_MARKER, scan.window[1])
    return {"rows": len(scan.rows), "enqueued": sent, "partialError": scan.partial_error}


async def sweep_scope(*, now: datetime | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every Windows VM in scope not verified within RECHECK_AFTER goes to the queue, in batches."""
    now = now or datetime.now(UTC)
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        fresh = await ledger.verified_since(now - timedelta(seconds=runtime.settings.recheck_after_s))
        inventory = await runtime.inventory()
        queue = await runtime.queue()
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        batch: list[WorkItem] = []
        seen = skipped = sent = 0
        transient: TransientError | None = None
        try:
            async for vm_id in inventory.windows_vms():
                seen += 1
                if vm_id in fresh:
                    skipped += 1
                    continue
                batch.append(
                    WorkItem(
                        Trigger.SWEEP,
                        vm_id=vm_id,
                        correlation_id=f"sweep:{stamp}",
                        source="sweep",
                        first_seen=stamp,
                    )
                )
                if len(batch) >= 256:
                    sent += await queue.send_many(batch)
                    batch = []
        except TransientError as error:
            # Throttled or briefly down part way: what was listed is queued, the rest waits for the
            # next sweep (each one lists every VM not verified recently, so it covers this one).
            transient = error
        if batch:
            sent += await queue.send_many(batch)
    summary: dict[str, Any] = {"windowsVms": seen, "recentlyVerified": skipped, "enqueued": sent}
    if transient is not None:
        _log_transient("sweep", transient, f"{seen} VMs listed and {sent} enqueued before it")
        return {**summary, **_transient(transient)}
    log.info("sweep: %d Windows VMs in scope, %d verified recently, %d enqueued", seen, skipped, sent)
    return summary


def _transient(error: TransientError) -> dict[str, Any]:
    return {"transientError": error.reason, "retryAfterS": error.retry_after_s}


def _log_transient(what: str, error: TransientError, state: str) -> None:
    """One line: a throttled timer is not a failed one, and the next run covers what this one missed."""
    wait = f"; the service asked to wait {error.retry_after_s:g} s" if error.retry_after_s else ""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    log.warning("%s not done (%s%s): %s; the next run covers it. %s", what, error.reason, wait, state, first)


async def work(body: str, *, env: Mapping[str, str] | None = None) -> list[Outcome]:
    """The queue worker: one message → the workflow under the VM's lease → ledger."""
    async with Runtime.open(env) as runtime:
        settings = runtime.settings
        gateway = await runtime.compute()
        inventory = await runtime.inventory()
        worker = Worker(
            remediator=Remediator(gateway, settings, network=await runtime.network()),
            ledger=await runtime.ledger(),
            queue=await runtime.queue(),
            resolver=inventory,
            settings=settings,
            scope=Scope.from_settings(settings, inventory),
        )
        return await worker.handle_message(body)


async def poison(body: str, *, env: Mapping[str, str] | None = None) -> None:
    """A message the host gave up on: record ``failed: poison`` so no work item disappears unrecorded.

    A row refused under the message's own target is written under ``last-resort-message`` instead;
    if the ledger cannot be written at all this raises, and after ``maxDequeueCount`` the host moves
    the message to ``vm-checks-poison-poison``, which :func:`drain_last_resort` reads."""
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        await record_poison(ledger, body)


async def status(*, recent: int = 20, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        return await ledger.status(recent=recent)


async def drain_last_resort(
    *, env: Mapping[str, str] | None = None, visibility_s: int | None = None
) -> dict[str, Any]:
    """The last-resort queue (``vm-checks-poison-poison``): each message recorded as ``failed: poison``,
    then deleted. Run on a timer; storage still down leaves the messages for the next run."""
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        queue = DrainQueue.last_resort(runtime.settings, runtime.credential)
        runtime.stack.push_async_callback(queue.close)
        if visibility_s is None:
            report = await drain(queue, ledger)
        else:
            report = await drain(queue, ledger, visibility_s=visibility_s)
    return report.to_dict()


__all__ = [
    "POISON_QUEUE",
    "WORK_QUEUE",
    "Runtime",
    "drain_last_resort",
    "log_scan",
    "on_alert",
    "on_vm_event",
    "poison",
    "status",
    "sweep_scope",
    "work",
]
