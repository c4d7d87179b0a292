"""``--from RESULT.json --only failed,deferred``: re-run just the VMs a previous run left in those outcomes.

RESULT.json is what ``--output json`` printed or ``--out FILE`` wrote (``shared.output.result_document``):
an object whose ``vms`` are ``{"id": …, "outcome": …}``. A file that is not that is a usage error
(exit 2), named with what is wrong, before anything runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId
from shared.unreadable import check_until_readable
from shared.workflow import Checker, detect_first

DEFAULT_ONLY = (OutcomeKind.FAILED, OutcomeKind.DEFERRED)


class ResumeError(ValueError):
    """The result file or ``--only`` cannot be used: the message says why."""


def parse_only(text: str) -> tuple[OutcomeKind, ...]:
    """``failed,deferred`` → those outcome words; an unknown word is an error."""
    kinds: list[OutcomeKind] = []
    for word in (w.strip() for w in text.split(",")):
        try:
            kind = OutcomeKind(word)
        except ValueError:
            known = ", ".join(k.value for k in OutcomeKind)
            raise ResumeError(f"--only: {word!r} is not an outcome (one or more of {known})") from None
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


def vms_to_resume(path: str, only: Iterable[OutcomeKind]) -> list[VmId]:
    """The VM ids of ``path``'s result whose outcome is in ``only``, each once, in file order."""
    wanted = set(only)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ResumeError(f"--from: cannot read {path}: {error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ResumeError(
            f"--from: {path} is not JSON: {error.msg} (line {error.lineno}, column {error.colno}); "
            "give the file --out wrote, or what --output json printed"
        ) from None
    except RecursionError:
        raise ResumeError(f"--from: {path} is nested too deeply to be a result") from None
    vms = document.get("vms") if isinstance(document, dict) else None
    if not isinstance(vms, list):
        raise ResumeError(f"--from: {path} is not a result of avma-remediator (no 'vms' list)")
    chosen: list[VmId] = []
    seen: set[VmId] = set()  # a list's `in` made a 10,000-VM result take minutes to read
    for index, row in enumerate(vms):
        where = f"--from: {path}: vms[{index}]"
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise ResumeError(f"{where} has no 'id'")
        try:
            kind = OutcomeKind(str(row.get("outcome")))
        except ValueError:
            raise ResumeError(f"{where}: {str(row.get('outcome'))[:40]!r} is not an outcome") from None
        if kind not in wanted:
            continue
        try:
            vm_id = VmId.parse(row["id"])
        except InvalidVmId as error:
            raise ResumeError(f"{where}: {error}") from None
        if vm_id not in seen:
            seen.add(vm_id)
            chosen.append(vm_id)
    return chosen


async def run_each(
    checker: Checker,
    vm_ids: Sequence[VmId],
    *,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Take each of ``vm_ids`` to an outcome, at most ``concurrency`` at once (``check --ids``,
    ``--from`` and ``apply``: VMs named up front rather than listed)."""
    outcomes: list[Outcome] = []
    queue: asyncio.Queue[VmId] = asyncio.Queue()
    for vm_id in vm_ids:
        queue.put_nowait(vm_id)

    async def work() -> None:
        while not queue.empty():
            # An answer that said nothing about the VM is tried again, detecting first, as the sweep does.
            vm_id = queue.get_nowait()
            outcome = await check_until_readable(
                partial(checker.check, vm_id),
                retry=partial(checker.check, vm_id, before_run_command=detect_first),
            )
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

    workers = [asyncio.ensure_future(work()) for _ in range(max(1, min(concurrency, len(vm_ids))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    return outcomes
