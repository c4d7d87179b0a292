"""An HTTP endpoint whose storage cannot be reached answers 503 with ``Retry-After``, within a deadline.

``POST /api/check`` (shared/recheck.py), ``GET /api/status`` (shared/status.py) and the alert
webhook (shared/triggers.py) do their work
inside :func:`answer_or_retry_later`: when Queue or Table storage (or Resource Graph, for a
management-group scope) is down, refuses connections, throttles, or does not answer before the
deadline, the caller gets a 503 with ``Retry-After`` in seconds instead of a 500 after minutes of
the storage SDK's own retries. Nothing here decides what the work is; it only bounds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from azure.core.exceptions import AzureError

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


async def answer_or_retry_later(
    work: Awaitable[Answer],
    *,
    deadline_s: float,
    retry_after_s: int,
    error: str,
    detail: str = "",
    level: int = logging.WARNING,
) -> Answer:
    """``work``'s answer, or 503 when it raises one of :data:`UNAVAILABLE` or outlasts ``deadline_s``.

    ``error`` is the 503's message, with ``{why}`` where the cause goes (``"timed out"`` or the
    failure's first line); it is logged at ``level`` with ``detail`` (what was not done, e.g. the
    VMs a check would have queued, the targets of an alert)."""
    try:
        async with asyncio.timeout(deadline_s):
            return await work
    except UNAVAILABLE as failure:
        why = "timed out" if isinstance(failure, TimeoutError) else _first_line(failure)
        message = error.format(why=why)
        log.log(level, "%s%s", message, f": {detail[:4000]}" if detail else "")
        return 503, {"error": message}, {"Retry-After": str(retry_after_s)}


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0][:300] if text else type(error).__name__
