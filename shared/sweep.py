"""Sweep: list every VM in scope and take each to an outcome, with bounded concurrency.

Listing streams into a bounded queue that a fixed pool of workers drains, so memory stays flat
for any estate size and Run Commands start while later pages are still being listed. A Run Command
answer that said nothing about the VM (``run-command-failed``, ``bad-output``) is tried again within
the run, a bounded number of times (shared/unreadable.py): the CLI has no queue to come back later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from shared.azure.compute import ComputeError
from shared.model import Outcome, VmId
from shared.unreadable import check_until_readable
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, detect_first

log = logging.getLogger(__name__)


class Checker(Protocol):
    """``Remediator.check``, or the CLI's scope-checking wrapper around it."""

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome: ...


@dataclass
class SweepReport:
    """Outcomes per VM, plus the subscriptions that could not be listed (a whole-scope failure)."""

    outcomes: list[Outcome] = field(default_factory=list)
    listing_errors: dict[str, str] = field(default_factory=dict)


async def sweep(
    remediator: Checker,
    list_vms: Callable[[str], AsyncIterator[VmFacts]],
    subscriptions: Iterable[str],
    *,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None = None,
    unreadable_backoff_s: float | None = None,
) -> SweepReport:
    """Run the workflow on every VM of ``subscriptions``; each VM once, even if listed twice (an
    unreadable answer is retried after ``unreadable_backoff_s``, by default
    ``shared.unreadable.CLI_BACKOFF_S``, then twice that)."""
    report = SweepReport()
    queue: asyncio.Queue[VmFacts | None] = asyncio.Queue(maxsize=concurrency * 2)
    seen: set[VmId] = set()

    async def produce() -> None:
        for sub in subscriptions:
            try:
                async for vm in list_vms(sub):
                    if vm.vm_id in seen:
                        continue
                    seen.add(vm.vm_id)
                    await queue.put(vm)
            except ComputeError as error:
                log.error("cannot list VMs of subscription %s: %s", sub, error)
                report.listing_errors[sub] = f"{error.reason}: {error}"

    async def work() -> None:
        while True:
            vm = await queue.get()
            if vm is None:
                return
            outcome = await check_until_readable(
                partial(remediator.check, vm.vm_id, listed=vm),
                retry=partial(remediator.check, vm.vm_id, listed=vm, before_run_command=detect_first),
                backoff_s=unreadable_backoff_s,
            )
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

    workers = [asyncio.create_task(work()) for _ in range(concurrency)]
    try:
        await produce()
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    return report
