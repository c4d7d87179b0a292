"""The log scan: which VMs logged AVMA activation failures (0xC004FD02) since the last scan.

The Data Collection Rule sends the Application log into the workspace's ``Event`` table; the scan
asks Log Analytics (``azure.monitor.query.aio.LogsQueryClient``) for Security-SPP events that
mention 0xC004FD02, one row per VM. A partial result is kept and its error reported, because half
the VMs now beats none until the next scan; HTTP failures become :class:`LogScanError`, and
throttling (429) or a service briefly down (5xx, no connection) :class:`LogScanUnavailable`, a
:class:`~shared.azure.transient.TransientError` carrying the wait the service named. Like the
inventory, the client waits inside the invocation only for a short ``Retry-After``
(:class:`~shared.azure.transient.BoundedRetryPolicy`): azure-core alone sleeps any wait, however long.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, TypedDict

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import AioHttpTransport
from azure.monitor.query import LogsQueryPartialResult, LogsTable
from azure.monitor.query.aio import LogsQueryClient

from shared.azure.transient import BoundedRetryPolicy, TransientError, response_headers, wait_from_headers
from shared.azure.transport import PooledClient
from shared.model import VmId
from shared.settings import ConfigError, Settings

log = logging.getLogger(__name__)

# The whole query; the workspace goes in the request path, never in here. The scan window is the
# request's timespan. ``contains`` is case-insensitive in KQL, so "0xc004fd02" matches too. The code
# is looked for in EventData (the event's parameters, as XML) as well as in RenderedDescription,
# which stays empty when the agent does not render descriptions.
SPP_QUERY: Final = """Event
| where EventLog == "Application"
| where Source == "Microsoft-Windows-Security-SPP"
| where RenderedDescription contains "0xC004FD02" or EventData contains "0xC004FD02"
| summarize LastSeen=max(TimeGenerated), Events=count() by _ResourceId, Computer"""


class ScanRow(TypedDict):
    """One row of the scan, keyed by the query's column names (``_ResourceId`` is "" when unknown)."""

    _ResourceId: str
    Computer: str
    LastSeen: datetime
    Events: int


class LogScanError(Exception):
    """The query failed outright (HTTP error, no connection); the next scan covers the same window."""

    def __init__(self, message: str, *, code: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class LogScanUnavailable(LogScanError, TransientError):
    """Log Analytics throttled (``throttled``) or could not answer (``logs-unavailable``) for now;
    ``retry_after_s`` is the wait it named, None if it named none. The scan is simply not done: the
    next one covers the same window."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        code: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The VMs seen failing in ``window`` (start, end); ``partial_error`` is set when rows may be missing."""

    rows: list[ScanRow]
    partial_error: str | None
    window: tuple[datetime, datetime]

    def vm_ids(self) -> list[VmId]:
        """The rows that name their VM (``_ResourceId``), in row order, without duplicates."""
        seen: dict[VmId, None] = {}
        for row in self.rows:
            vm = VmId.try_parse(row["_ResourceId"])
            if vm is not None:
                seen.setdefault(vm, None)
        return list(seen)

    def computers_only(self) -> list[str]:
        """Computer names of rows without a usable ``_ResourceId``: resolve them through the inventory."""
        return [row["Computer"] for row in self.rows if VmId.try_parse(row["_ResourceId"]) is None]


class LogScanner(PooledClient[LogsQueryClient]):
    """Runs :data:`SPP_QUERY` over the configured workspace; one client and connection pool per scanner."""

    def __init__(
        self,
        credential: AsyncTokenCredential,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not settings.workspace_id:
            raise ConfigError(["LOG_ANALYTICS_WORKSPACE_ID: required for the log scan"])
        self._credential = credential
        super().__init__(settings, session)
        self._workspace_id = settings.workspace_id

    def _make_client(self, transport: AioHttpTransport) -> LogsQueryClient:
        """The audience is passed explicitly: with a custom endpoint the SDK would otherwise ask for a
        token for the endpoint URL, which Log Analytics rejects."""
        return LogsQueryClient(
            self._credential,
            endpoint=self._settings.log_analytics_endpoint,
            audience=self._settings.cloud.log_analytics_audience,
            transport=transport,
            retry_policy=BoundedRetryPolicy(),
        )

    def window(self, *, since: datetime | None, now: datetime) -> tuple[datetime, datetime]:
        """From the last scan minus the overlap (late-arriving events), else the lookback, to ``now``.

        A last scan in the future (clock skew) counts as ``now``.
        """
        for name, moment in (("since", since), ("now", now)):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        if since is None:
            return now - timedelta(seconds=self._settings.log_scan_lookback_s), now
        return min(since, now) - timedelta(seconds=self._settings.log_scan_overlap_s), now

    async def scan(self, *, since: datetime | None, now: datetime) -> ScanResult:
        """The VMs whose SPP events mention 0xC004FD02 within :meth:`window`."""
        window = self.window(since=since, now=now)
        try:
            response = await self._sdk().query_workspace(self._workspace_id, SPP_QUERY, timespan=window)
        except HttpResponseError as error:
            code = str(error.error.code) if error.error is not None and error.error.code else ""
            message, status = str(error.message or error)[:500], error.status_code
            if status == 429 or (status is not None and status >= 500):
                raise LogScanUnavailable(
                    message,
                    reason="throttled" if status == 429 else "logs-unavailable",
                    code=code,
                    status=status,
                    retry_after_s=wait_from_headers(response_headers(error)),
                ) from error
            raise LogScanError(message, code=code, status=status) from error
        except (ServiceRequestError, ServiceResponseError) as error:
            raise LogScanUnavailable(str(error)[:300], reason="logs-unavailable") from error
        partial_error: str | None = None
        if isinstance(response, LogsQueryPartialResult):
            tables = list(response.partial_data or [])
            problem = response.partial_error
            partial_error = f"{problem.code}: {problem.message}" if problem is not None else "PartialError"
        else:
            tables = list(response.tables)
        rows = [row for table in tables[:1] for row in _rows(table)]
        if partial_error is not None:
            log.warning(
                "log scan of %s to %s returned partial results (%d rows kept): %s",
                window[0].isoformat(),
                window[1].isoformat(),
                len(rows),
                partial_error,
            )
        return ScanResult(rows=rows, partial_error=partial_error, window=window)


def _rows(table: LogsTable) -> list[ScanRow]:
    """Typed rows of the summarised table; a row the query could not have produced is logged and skipped."""
    where = {name: i for i, name in enumerate(table.columns)}
    missing = [name for name in ScanRow.__annotations__ if name not in where]
    if missing:
        log.warning("log scan: the result has no column %s; rows ignored", ", ".join(missing))
        return []
    out: list[ScanRow] = []
    for row in table.rows:
        values = list(row)
        resource_id, computer = values[where["_ResourceId"]], values[where["Computer"]]
        last_seen, events = values[where["LastSeen"]], values[where["Events"]]
        if not isinstance(last_seen, datetime) or isinstance(events, bool):
            log.warning("log scan: unreadable row for computer %r", computer)
            continue
        try:
            count = int(events)
        except (TypeError, ValueError):
            log.warning("log scan: unreadable event count for computer %r", computer)
            continue
        out.append(
            {
                "_ResourceId": str(resource_id or ""),
                "Computer": str(computer or ""),
                "LastSeen": last_seen,
                "Events": count,
            }
        )
    return out
