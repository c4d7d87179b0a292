"""Transient errors of the read-only dependencies (Resource Graph, Log Analytics): typed, with a wait.

A dependency that throttles (429) or is briefly down (5xx, no connection) has not said anything
about the work item: the item is deferred, not failed. :class:`TransientError` is what the
adapters raise for such an answer, with the wait the service asked for (``retry_after_s``) when it
named one, so that the caller's deferral honours it.

azure-core's retry policy sleeps whatever ``Retry-After`` says, with no upper bound
(``AsyncRetryPolicy._sleep_for_retry``): a throttled query answered ``Retry-After: 3600`` would hold
the invocation an hour, past the host's ``functionTimeout``, and the message would then be retried
as a failure. :class:`BoundedRetryPolicy` lets the SDK wait only for short waits and otherwise
hands the answer back, so that the wait becomes a deferral of the queue message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import AsyncRetryPolicy

# A longer wait is the queue's job (a delayed message), not the invocation's.
MAX_IN_PROCESS_WAIT_S: Final = 30.0
_HMS: Final = re.compile(r"(\d+):(\d{2}):(\d{2})(?:\.\d+)?")


class TransientError(Exception):
    """A dependency refused for now. ``reason`` is an outcome word (``throttled``, ``arm-unavailable``,
    ``logs-unavailable``); ``retry_after_s`` is the wait the service named, or None."""

    reason: str = "unavailable"
    retry_after_s: float | None = None


def wait_from_headers(headers: Mapping[str, str] | None, *, now: datetime | None = None) -> float | None:
    """The wait a throttled answer names, in seconds, or None when it names none.

    ``Retry-After`` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3), else ``retry-after-ms`` or
    ``x-ms-retry-after-ms`` (the headers azure-core's ``get_retry_after`` reads too:
    azure-sdk-for-python sdk/core/azure-core/azure/core/pipeline/policies/_utils.py), else Resource
    Graph's ``x-ms-user-quota-resets-after`` (``hh:mm:ss``, guidance-for-throttled-requests.md).
    Never raises; a non-finite value names no wait.
    """
    if not headers:
        return None
    retry_after = str(_get(headers, "Retry-After") or "").strip()
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            pass
        else:
            # "inf" and "nan" parse as floats: no wait a retry could honour (a forged or broken
            # header), so none is named; an HTTP-date is never a float, so stop here either way.
            return max(0.0, seconds) if math.isfinite(seconds) else None
        try:
            when = parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        try:
            millis = float(str(_get(headers, name) or "").strip())
        except ValueError:
            continue
        if math.isfinite(millis):
            return max(0.0, millis / 1000.0)
    resets = str(_get(headers, "x-ms-user-quota-resets-after") or "").strip()
    match = _HMS.fullmatch(resets)
    if match:
        hours, minutes, seconds = (int(g) for g in match.groups())
        return float(hours * 3600 + minutes * 60 + seconds)
    return None


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict from a test or a transport that keeps the case it was sent in
        low = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == low), None)
    return value


def response_headers(error: Any) -> Mapping[str, str]:
    """The headers of an ``HttpResponseError``'s response (azure-core types it without them)."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    return headers if isinstance(headers, Mapping) else {}


class BoundedRetryPolicy(AsyncRetryPolicy[Any, Any]):
    """azure-core's retries, except that a ``Retry-After`` longer than ``max_wait_s`` is not slept
    inside the invocation: the answer goes back to the adapter, which raises a transient error
    carrying the wait. The wait is read by :func:`wait_from_headers`, which never raises (azure-core's
    own ``parse_retry_after`` raises ``ValueError`` on a ``Retry-After`` it cannot read, out of the
    invocation)."""

    def __init__(self, *, max_wait_s: float = MAX_IN_PROCESS_WAIT_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_wait_s = max_wait_s

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        if response.http_response.status_code < 400:
            return False  # as azure-core's own first test, before any header is read (every answer)
        wait = wait_from_headers(response.http_response.headers)
        if wait is not None and wait > self.max_wait_s:
            return False
        return bool(super().is_retry(settings, response))

    def get_retry_after(self, response: PipelineResponse[Any, Any]) -> float | None:
        return wait_from_headers(response.http_response.headers)
