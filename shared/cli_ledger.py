"""The CLI on the app's ledger: the same per-VM lease and the same history rows as the worker.

When the storage settings the app reads are present (``AzureWebJobsStorage``, or the identity-based
``AzureWebJobsStorage__tableServiceUri``; shared/settings.py), the CLI never runs beside the app's
workflow on one VM: each check first takes the VM's lease in the ledger exactly as the queue worker
does (shared/worker.py, ``Worker._check``), and a lease held by someone else ends
``deferred: lease-held`` (the worker's word) with nothing done to the VM. Before each Run Command the
lease is renewed (a lost lease aborts before the POST: ``deferred: lease-lost``), and before a
remediation the intent goes to the history and the state row, as the worker writes it. The outcome
is written as a history row (trigger ``manual``, correlation id ``cli:<command>:<time>``) and stored
as the VM's verdict on release, so a CLI ``check`` shows in the app's ``/api/status``.

One exception, for safety: a ``would-remediate`` of a CLI audit goes to the history but does not
replace the VM's verdict. The app's sweep skips VMs verified within ``RECHECK_AFTER_HOURS``, and an
audit run by hand must not hold back an app in ``enforce`` mode from fixing the VM for a day.

Without those settings the CLI says once, on stderr, that it runs without the ledger (``WithoutLedger``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from azure.core.credentials_async import AsyncTokenCredential

from shared.ledger import Lease, LeaseLost, Ledger, LedgerError
from shared.model import Outcome, OutcomeKind, Trigger, VmId
from shared.settings import Settings
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, Checker

log = logging.getLogger(__name__)

NO_LEDGER_NOTE = (
    "running without the ledger (no AzureWebJobsStorage or AzureWebJobsStorage__tableServiceUri): no "
    "per-VM lease is taken, so do not run this beside the app on the same VMs, and nothing shows in "
    "/api/status"
)


class Workflow(Checker, Protocol):
    """``Remediator.check``: the per-VM workflow, with the hook the lease needs, and its settings."""

    @property
    def settings(self) -> Settings: ...


class WithoutLedger:
    """The workflow with no ledger, saying so once, when the first VM is about to be checked (a run
    that stops before any VM, on a listing error say, has nothing to say about a lease)."""

    def __init__(self, workflow: Workflow, say: Callable[[str], None]) -> None:
        self._workflow = workflow
        self._say: Callable[[str], None] | None = say

    @property
    def settings(self) -> Settings:
        return self._workflow.settings

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        say, self._say = self._say, None
        if say is not None:
            say(NO_LEDGER_NOTE)
        return await self._workflow.check(vm_id, listed=listed, before_run_command=before_run_command)


def has_ledger(settings: Settings) -> bool:
    """Whether the settings name the app's table storage (connection string or table service URI)."""
    return bool(settings.storage_connection or settings.table_service_uri)


async def open_ledger(settings: Settings, credential: AsyncTokenCredential) -> Ledger:
    """The app's ledger, its table made sure to exist (as the app's ``Runtime.ledger`` does).

    Raises :class:`LedgerError` when it cannot be reached: the CLI then stops before any VM, since
    running without the lease beside the app is what the settings say not to do.
    """
    ledger = Ledger.from_settings(settings, credential)
    try:
        await ledger.create_table_if_needed()
    except BaseException:
        await ledger.close()
        raise
    return ledger


def cli_owner() -> str:
    """The lease owner a CLI run writes (``leaseOwner``): which machine and process holds the VM."""
    return f"cli:{socket.gethostname()[:60]}:{os.getpid()}"


def correlation_id(command: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"cli:{command}:{stamp}"


class LedgeredCheck:
    """The workflow under the VM's lease, recorded in the ledger, as the app's worker runs it."""

    def __init__(
        self,
        workflow: Workflow,
        ledger: Ledger,
        *,
        owner: str,
        correlation: str,
        trigger: str = Trigger.MANUAL.value,
    ) -> None:
        self._workflow = workflow
        self._ledger = ledger
        self.owner = owner
        self._correlation = correlation
        self._trigger = trigger

    @property
    def settings(self) -> Settings:
        return self._workflow.settings

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        """``before_run_command`` (the caller's hook, e.g. the CLI's signal handling) runs first,
        then the lease is renewed, right before the POST."""
        try:
            lease = await self._ledger.acquire(vm_id, owner=self.owner)
        except LedgerError as error:
            log.warning("cannot take the lease on %s: %s", vm_id, error)
            return Outcome(
                str(vm_id), OutcomeKind.DEFERRED, "ledger-unavailable", details={"error": str(error)[:300]}
            )
        if lease is None:
            held = Outcome(str(vm_id), OutcomeKind.DEFERRED, "lease-held")
            await self._record(vm_id, held)
            return held
        outcome: Outcome | None = None
        try:
            try:
                outcome = await self._workflow.check(
                    vm_id, listed=listed, before_run_command=self._guard(lease, before_run_command)
                )
            except LeaseLost:
                outcome = Outcome(str(vm_id), OutcomeKind.DEFERRED, "lease-lost")
            if lease.interrupted:
                outcome.details["interrupted"] = lease.interrupted
            await self._record(vm_id, outcome)
            return outcome
        finally:
            await self._release(lease, outcome)

    def _guard(self, lease: Lease, outer: BeforeRunCommand | None) -> BeforeRunCommand:
        """Renew before each Run Command, and record the intent before a remediation (the worker's)."""

        async def before(phase: str, details: Mapping[str, Any]) -> None:
            if outer is not None:
                await outer(phase, details)
            intent = {"phase": phase, "owner": self.owner, "correlationId": self._correlation}
            await self._ledger.renew(lease, intent=intent if phase == "remediate" else None)
            if phase == "remediate":
                await self._ledger.record_intent(
                    lease.vm_id,
                    phase=phase,
                    reason=str(details.get("reason", "")),
                    details=dict(details),
                    trigger=self._trigger,
                    correlation_id=self._correlation,
                    attempt=0,
                )

        return before

    async def _record(self, vm_id: VmId, outcome: Outcome) -> None:
        try:
            await self._ledger.record(
                vm_id, outcome=outcome, trigger=self._trigger, correlation_id=self._correlation, attempt=0
            )
        except LedgerError as error:  # the outcome is still printed; the ledger just lacks the row
            log.warning("the ledger did not take the outcome of %s: %s", vm_id, error)
            outcome.details["ledgerError"] = str(error)[:300]

    async def _release(self, lease: Lease, outcome: Outcome | None) -> None:
        stored = outcome
        if outcome is not None and outcome.kind is OutcomeKind.WOULD_REMEDIATE:
            stored = None  # see the module docstring: an audit by hand never holds back the app
        try:
            await self._ledger.release(lease, stored)
        except LedgerError as error:
            log.warning("cannot release the lease on %s (it expires on its own): %s", lease.vm_id, error)
            if outcome is not None:
                outcome.details["ledgerError"] = str(error)[:300]
