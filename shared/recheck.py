"""``POST /api/check``: queue a re-check of one VM, or of a short list, by an operator.

The body is ``{"vmId": "<VM resource id>"}`` or ``{"vmIds": [...]}`` (at most :data:`MAX_CHECK_VMS`).
Every id is checked before anything is queued: a malformed id (400) or a VM outside this deployment's
scope (403, the same rule as the worker's, ``shared/scope.py``) refuses the whole request and queues
nothing, so an answer is never "some of it". Accepted items are ``manual`` work items (202), which
the worker runs in full even when the VM has a fresh verdict, under one correlation id that the
answer returns and that the ledger's history and the outcome records carry.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from shared.model import InvalidVmId, Trigger, VmId, WorkItem
from shared.retry_later import Answer, answer_or_retry_later
from shared.scope import Scope

log = logging.getLogger(__name__)

MAX_CHECK_VMS = 50
MAX_CHECK_BYTES = 64 * 1024
CHECK_DEADLINE_S = 10.0
RETRY_AFTER_S = 30
SOURCE = "api/check"


class CheckRequestError(ValueError):
    """The body is not a check request; the message says what is wrong (answered with 400)."""


def parse_check_request(body: bytes) -> list[VmId]:
    """The VMs a body names, in order, without repeats; :class:`CheckRequestError` otherwise."""
    if len(body) > MAX_CHECK_BYTES:
        raise CheckRequestError(f"body of {len(body)} bytes exceeds {MAX_CHECK_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise CheckRequestError(f"body is not JSON: {str(error)[:200]}") from error
    if not isinstance(data, dict) or set(data) - {"vmId", "vmIds"} or len(data) != 1:
        raise CheckRequestError('expected {"vmId": "<VM resource id>"} or {"vmIds": ["<id>", ...]}')
    texts = [data["vmId"]] if "vmId" in data else data["vmIds"]
    if not isinstance(texts, list) or not texts:
        raise CheckRequestError("vmIds must be a non-empty list of VM resource ids")
    if len(texts) > MAX_CHECK_VMS:
        raise CheckRequestError(f"{len(texts)} VMs: at most {MAX_CHECK_VMS} per request")
    vms: list[VmId] = []
    problems: list[str] = []
    for index, text in enumerate(texts):
        try:
            vm = VmId.parse(text)
        except InvalidVmId as error:
            problems.append(f"[{index}]: {error}")
            continue
        if vm not in vms:
            vms.append(vm)
    if problems:
        raise CheckRequestError("malformed VM id(s), nothing queued: " + "; ".join(problems))
    return vms


async def check_vms(body: bytes, *, env: Mapping[str, str] | None = None) -> Answer:
    """202 with the correlation id, 400 malformed, 403 out of scope, 503 with ``Retry-After``."""
    try:
        vms = parse_check_request(body)
    except CheckRequestError as error:
        return 400, {"error": str(error)}, {}
    return await answer_or_retry_later(
        _queue_checks(vms, env),
        deadline_s=CHECK_DEADLINE_S,
        retry_after_s=RETRY_AFTER_S,
        error="could not queue the check ({why}); retry later (a VM queued twice is checked once)",
        detail=", ".join(str(vm) for vm in vms),
    )


async def _queue_checks(vms: list[VmId], env: Mapping[str, str] | None) -> Answer:
    """403 naming each VM out of scope (nothing queued), else 202 with every VM queued."""
    from shared.triggers import Runtime  # shared.triggers never imports this module

    correlation = f"check:{uuid.uuid4()}"
    async with Runtime.open(env) as runtime:
        settings = runtime.settings
        lookup = await runtime.inventory() if settings.management_group else None
        scope = Scope.from_settings(settings, lookup)
        refused = [(vm, why) for vm in vms if (why := await scope.refusal(vm)) is not None]
        if refused:
            outside = [{"vmId": str(vm), "why": why} for vm, why in refused]
            message = f"{len(refused)} of {len(vms)} VM(s) outside {scope.describe()}; nothing queued"
            return 403, {"error": message, "outOfScope": outside}, {}
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        items = [
            WorkItem(Trigger.MANUAL, vm, correlation_id=correlation, source=SOURCE, first_seen=stamp)
            for vm in vms
        ]
        queue = await runtime.queue()
        await queue.send_many(items)
    log.info("check %s queued for %d VM(s)", correlation, len(vms))
    return 202, {"correlationId": correlation, "queued": [str(vm) for vm in vms]}, {}
