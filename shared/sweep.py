"""Sweep: list every VM in scope and take each to an outcome, with bounded concurrency.

Listing streams into bounded lanes, one per subscription (shared/lanes.py), that a fixed pool of
workers drains round-robin, so memory stays bounded for any estate size, Run Commands start while
later pages are still being listed, and every subscription's ARM budget is spent in parallel.

:func:`sweep_inventory` lists the whole scope through one Resource Graph query
(``Inventory.list_vms``). A failed query is not a failure of one subscription: Resource Graph does
not say which subscriptions it did not reach, so the error is reported for everything the query
covered (each subscription given, or ``managementGroups/<id>``, or ``tenant``), and the VMs listed
before it are still worked on. A subscription given that Resource Graph does not see at all is
reported on its own. :func:`sweep` lists per subscription through ARM (tests and the benchmark's
sequential baseline).

A Run Command answer that said nothing about the VM (``run-command-failed``, ``bad-output``) is
tried again within the run, a bounded number of times (shared/unreadable.py): the CLI has no queue
to come back later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Protocol

from shared.azure.compute import ComputeError
from shared.azure.inventory import InventoryError
from shared.lanes import DEFAULT_CAPACITY, SubscriptionLanes
from shared.model import Outcome, VmId
from shared.unreadable import check_until_readable
from shared.vm import VmFacts
from shared.workflow import Checker, detect_first

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """Outcomes per VM, plus the subscriptions that could not be listed (a whole-scope failure)."""

    outcomes: list[Outcome] = field(default_factory=list)
    # What could not be listed: a subscription id, ``managementGroups/<id>`` or ``tenant`` -> why.
    listing_errors: dict[str, str] = field(default_factory=dict)


class VmListing(Protocol):
    """``shared.azure.inventory.Inventory``: one listing of the whole scope."""

    def list_vms(self) -> AsyncIterator[VmFacts]: ...

    def listing_scope(self) -> list[str]: ...

    async def unlisted_subscriptions(self) -> list[str]: ...


# Why a subscription given is not listed when Resource Graph does not see it.
NOT_LISTED: Final = (
    "not-found: Resource Graph sees no such subscription (mistyped, or the identity cannot read it)"
)
# Put one listed VM in the lanes (each VM once, even if listed twice).
Put = Callable[[VmFacts], Awaitable[None]]


async def sweep(
    remediator: Checker,
    list_vms: Callable[[str], AsyncIterator[VmFacts]],
    subscriptions: Iterable[str],
    *,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None = None,
    limit: Callable[[str], int] | None = None,
    unreadable_backoff_s: float | None = None,
) -> SweepReport:
    """Run the workflow on every VM of ``subscriptions``, listed per subscription through ARM; each
    VM once, even if listed twice (an unreadable answer is retried after ``unreadable_backoff_s``,
    by default ``shared.unreadable.CLI_BACKOFF_S``, then twice that)."""

    async def produce(put: Put, report: SweepReport) -> None:
        for sub in subscriptions:
            try:
                async for vm in list_vms(sub):
                    await put(vm)
            except ComputeError as error:
                log.error("cannot list VMs of subscription %s: %s", sub, error)
                report.listing_errors[sub] = f"{error.reason}: {error}"

    return await _run(
        remediator,
        produce,
        concurrency=concurrency,
        on_outcome=on_outcome,
        limit=limit,
        unreadable_backoff_s=unreadable_backoff_s,
    )


async def sweep_inventory(
    remediator: Checker,
    inventory: VmListing,
    *,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None = None,
    limit: Callable[[str], int] | None = None,
    unreadable_backoff_s: float | None = None,
) -> SweepReport:
    """Run the workflow on every VM of the inventory's scope, listed in one Resource Graph query.

    ``limit`` is how many VMs of a subscription may be worked on at once
    (``ComputeGateway.pacer.concurrency``); None: no limit below ``concurrency``. An unreadable
    answer is retried as :func:`sweep` retries it.
    """

    async def produce(put: Put, report: SweepReport) -> None:
        try:
            for sub in await inventory.unlisted_subscriptions():
                log.error("Resource Graph sees no subscription %s", sub)
                report.listing_errors[sub] = NOT_LISTED
            async for vm in inventory.list_vms():
                await put(vm)
        except InventoryError as error:
            scope = inventory.listing_scope()
            log.error("cannot list the VMs of %s: %s", ", ".join(scope), error)
            for key in scope:
                report.listing_errors.setdefault(key, f"{error.reason}: {error}")

    return await _run(
        remediator,
        produce,
        concurrency=concurrency,
        on_outcome=on_outcome,
        limit=limit,
        unreadable_backoff_s=unreadable_backoff_s,
    )


async def _run(
    remediator: Checker,
    produce: Callable[[Put, SweepReport], Awaitable[None]],
    *,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None,
    limit: Callable[[str], int] | None,
    unreadable_backoff_s: float | None,
) -> SweepReport:
    report = SweepReport()
    lanes = SubscriptionLanes(capacity=max(DEFAULT_CAPACITY, 2 * concurrency), limit=limit)
    seen: set[VmId] = set()

    async def put(vm: VmFacts) -> None:
        if vm.vm_id in seen:
            return
        seen.add(vm.vm_id)
        await lanes.put(vm)

    async def listing() -> None:
        try:
            await produce(put, report)
        finally:
            await lanes.close()

    async def work() -> None:
        while (vm := await lanes.get()) is not None:
            try:
                outcome = await check_until_readable(
                    partial(remediator.check, vm.vm_id, listed=vm),
                    retry=partial(remediator.check, vm.vm_id, listed=vm, before_run_command=detect_first),
                    backoff_s=unreadable_backoff_s,
                )
            finally:
                await lanes.done(vm)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

    workers = [asyncio.create_task(work()) for _ in range(concurrency)]
    try:
        await listing()
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    return report
