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

DETAIL_PART_CHARS = 8000
"""``detail`` is logged whole, in records of at most this many characters (split between items,
at ``", "``): Application Insights keeps 32,768 characters of a message (azure-monitor-opentelemetry-
exporter ``export/logs/_exporter.py`` truncates there), and an alert's targets run to 13,000 for 100
VM ids, which a single capped record would cut to the first few."""

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
    the 503 is logged at ``level``, the 500 at error level, each with all of ``detail`` (what was not
    done, e.g. the VMs a check would have queued, the targets of an alert: :data:`DETAIL_PART_CHARS`)."""
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
            _log(logging.ERROR, message, detail)
            return 500, {"error": message}, {}
        why = "timed out" if isinstance(failure, TimeoutError) else _first_line(failure)
        message = error.format(why=why)
        _log(level, message, detail)
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


def _log(level: int, message: str, detail: str) -> None:
    parts = _parts(detail, DETAIL_PART_CHARS) if detail else []
    if not parts:
        log.log(level, "%s", message)
    for n, part in enumerate(parts, 1):
        log.log(level, "%s%s: %s", message, f" (part {n} of {len(parts)})" if len(parts) > 1 else "", part)


def _parts(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut after an item (``", "``) where one ends."""
    parts: list[str] = []
    while len(text) > limit:
        cut = text.rfind(", ", 0, limit)
        cut = cut if cut > 0 else limit
        parts.append(text[:cut])
        text = text[cut:].removeprefix(", ")
    return [*parts, text] if text else parts


def _first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (text or type(error).__name__)[:300]
