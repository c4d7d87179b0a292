"""An HTTP endpoint whose storage cannot be reached answers 503 with ``Retry-After``, within a deadline.

``POST /api/check`` (shared/recheck.py), ``GET /api/status`` (shared/status.py) and the alert
webhook (shared/triggers.py) do their work
inside :func:`answer_or_retry_later`: when Queue or Table storage (or Resource Graph, for a
management-group scope) is down, refuses connections, throttles, or does not answer before the
deadline, the caller gets a 503 with ``Retry-After`` in seconds instead of a 500 after minutes of
the storage SDK's own retries. Nothing here decides what the work is; it only bounds it.

A 401 or 403 answer is not an outage: storage (or ARM) refused the app's identity, because a role
assignment is missing or the storage account's network rules keep the app out
(``AuthorizationPermissionMismatch``, ``AuthorizationFailure``: Storage's error codes,
learn.microsoft.com/rest/api/storageservices/common-rest-api-error-codes). Waiting does not cure it,
so it is a 500 saying so, logged at error level, never a 503 that tells the caller to come back:
an action group retries a 503 twice and then stops calling the endpoint for 15 minutes
(MicrosoftDocs/azure-docs articles/azure-monitor/alerts/action-groups.md, "Webhook"), and an
operator told "retry later" would wait for an outage that is not there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError

from shared.azure.transient import TransientError
from shared.ledger import LedgerError
from shared.workqueue import QueueError

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any], dict[str, str]]
"""HTTP status, JSON body, headers."""

UNAVAILABLE: tuple[type[BaseException], ...] = (
    TransientError,
    QueueError,
    LedgerError,
    AzureError,
    TimeoutError,
)
"""What "storage (or ARM) is unavailable" looks like to the engine: each is worth a retry later."""

REFUSED_STATUSES = frozenset({401, 403})
"""Answers that refuse the app's identity: configuration to fix, not an outage to wait out."""

REFUSED = (
    "refused ({why}): the app's identity lacks a role it needs, or the storage account's network "
    "rules keep the app out; fix that (docs/operations.md), retrying will not help"
)


async def answer_or_retry_later(
    work: Awaitable[Answer],
    *,
    deadline_s: float,
    retry_after_s: int,
    error: str,
    detail: str = "",
    level: int = logging.WARNING,
    refused: str = REFUSED,
) -> Answer:
    """``work``'s answer, or 503 when it raises one of :data:`UNAVAILABLE` or outlasts ``deadline_s``,
    or 500 when what it raised was a 401 or 403 answer (:func:`refusal`), wrapped or not.

    ``error`` is the 503's message and ``refused`` the 500's, with ``{why}`` where the cause goes
    (``"timed out"`` or the failure's first line, with the HTTP status and error code of a refusal);
    the 503 is logged at ``level``, the 500 at error level, each with ``detail`` (what was not done,
    e.g. the VMs a check would have queued, the targets of an alert)."""
    try:
        async with asyncio.timeout(deadline_s):
            return await work
    except Exception as failure:
        denied = refusal(failure)
        if denied is None and not isinstance(failure, UNAVAILABLE):
            raise
        if denied is not None:
            code = getattr(denied, "error_code", None)  # set by the storage SDKs
            code = getattr(code, "value", code)  # Tables gives an enum
            status = f"HTTP {denied.status_code}{f' {code}' if code else ''}"
            message = refused.format(why=f"{status}: {_first_line(failure)}")
            log.error("%s%s", message, f": {detail[:4000]}" if detail else "")
            return 500, {"error": message}, {}
        why = "timed out" if isinstance(failure, TimeoutError) else _first_line(failure)
        message = error.format(why=why)
        log.log(level, "%s%s", message, f": {detail[:4000]}" if detail else "")
        return 503, {"error": message}, {"Retry-After": str(retry_after_s)}


def refusal(failure: BaseException) -> HttpResponseError | None:
    """The 401 or 403 answer behind ``failure``: itself, or what it was raised ``from`` (the ledger,
    the work queue and the inventory wrap the SDK's error in their own), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = failure
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HttpResponseError) and current.status_code in REFUSED_STATUSES:
            return current
        current = current.__cause__
    return None


def _first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (text or type(error).__name__)[:300]
