"""What the three parts of the ledger share: the table, its keys, errors, and the write retries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableErrorCode, UpdateMode
from azure.data.tables.aio import TableClient

from shared.model import OutcomeKind, VmId
from shared.settings import LEDGER_BACKOFF_S, LEDGER_TRIES, LEDGER_TRY_TIMEOUT_S, Settings

T = TypeVar("T")

log = logging.getLogger("shared.ledger")

STATE_PARTITION = "vm"
MARKER_PARTITION = "marker"  # progress of periodic jobs (the log scan's last window end)
_HISTORY_PREFIX = "h-"
_DAY_PREFIX = "d-"
_DAY_RANGE = ("d-", "d.")  # every day partition sorts between these ('.' follows '-')
# Outcomes that observed the VM's state; a deferral did not, so it leaves verifiedAt alone.
VERIFYING = frozenset(
    {
        OutcomeKind.HEALTHY,
        OutcomeKind.REMEDIATED,
        OutcomeKind.WOULD_REMEDIATE,
        OutcomeKind.SKIPPED,
        OutcomeKind.FAILED,
    }
)
DETAILS_MAX_CHARS = 8000  # an entity holds at most 1 MiB and a string 64 KiB; history stays compact
_TEXT_MAX_CHARS = 1000
_KEY_MAX_CHARS = 400  # Table keys may hold 1 KiB
_TICKS_AT_0001 = datetime(1, 1, 1, tzinfo=UTC)
_MAX_TICKS = 3155378975999999999  # .NET DateTime.MaxValue.Ticks
_UNIX_EPOCH_TICKS = 621355968000000000  # 1970-01-01 in .NET ticks (100 ns since 0001-01-01)
_LAST_DAY = date(9999, 12, 31)


class LedgerError(RuntimeError):
    """Table storage failed or is not configured; the message names the operation and target."""


class LeaseLost(LedgerError):
    """The lease expired and another worker took it over (or it was already released)."""


class TableMissing(LedgerError):
    """The ledger table does not exist: never deployed, deleted, or lost with the storage behind it
    (an emulator restarted in memory). Creating it again is the cure (``create_table_if_needed``)."""


def vm_key(vm_id: VmId) -> str:
    """The RowKey of a VM's state row: case-insensitive, and valid as a Table key."""
    return "|".join(vm_id.key)


def target_key(target: VmId | str) -> str:
    """The key of any history target: a VM id (parsed or as text) or anything else, never refused."""
    if isinstance(target, VmId):
        return vm_key(target)
    parsed = VmId.try_parse(target)
    if parsed is not None:
        return vm_key(parsed)
    text = str(target).strip().lower()
    # surrogatepass: a lone surrogate (JSON's "\ud800") has no UTF-8 form but still gets a key
    raw = text.encode("utf-8", "surrogatepass")
    encoded = "t|" + quote(raw, safe=":@=+,;$'()*").replace("%", "!")
    if len(encoded) > _KEY_MAX_CHARS:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        encoded = encoded[: _KEY_MAX_CHARS - 40] + "!!" + digest
    return encoded


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("times given to the ledger must be timezone-aware")
    return now.astimezone(UTC)


def _cap(text: object, limit: int = _TEXT_MAX_CHARS) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _details_json(details: Mapping[str, Any] | None) -> str:
    """Compact JSON, always valid; an oversized payload is kept as a truncated string inside JSON."""
    if not details:
        return ""
    try:
        text = json.dumps(dict(details), separators=(",", ":"), sort_keys=True, default=str)
    except (TypeError, ValueError) as error:  # circular references, non-string keys
        text = json.dumps({"unserializable": _cap(f"{error}: {details!r}", DETAILS_MAX_CHARS // 2)})
    if len(text) > DETAILS_MAX_CHARS:
        text = json.dumps({"truncated": True, "chars": len(text), "head": text[: DETAILS_MAX_CHARS // 2]})
    return text


def _details(text: object) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _time(value: object) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _transient(error: BaseException) -> bool:
    """Worth another try: a timeout or a storage failure that is not a definite answer."""
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, ResourceExistsError | ResourceModifiedError | ResourceNotFoundError):
        return False
    return isinstance(error, AzureError)


# Answers that say "not now" rather than "no": a timeout, a throttle, a server error.
_UNAVAILABLE_STATUS = frozenset({408, 429})


def storage_unavailable(error: BaseException) -> bool:
    """Whether a ledger failure means Table storage could not be reached or did not answer (a
    refused connection, a timeout, 408, 429, a 5xx) rather than a definite refusal (401 or 403, a
    missing table, 404, 409, 412, a row it will not take), which another try does not change."""
    if not isinstance(error, LedgerError) or isinstance(error, LeaseLost | TableMissing):
        return False
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, TimeoutError | ServiceRequestError | ServiceResponseError):
            return True
        if isinstance(cause, HttpResponseError) and cause.status_code is not None:
            return cause.status_code >= 500 or cause.status_code in _UNAVAILABLE_STATUS
        cause = cause.__cause__
    return False


def _lease_is_live(row: Mapping[str, Any], now: datetime) -> bool:
    until = _time(row.get("leaseUntil"))
    return bool(row.get("leaseOwner")) and until is not None and until > now


def _history_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "at": _iso(row.get("at")),
        "target": row.get("target", ""),
        "entry": row.get("entry", ""),
        "outcome": row.get("outcome", ""),
        "reason": row.get("reason", ""),
        "hint": row.get("hint", ""),
        "details": _details(row.get("details")),
        "trigger": row.get("trigger", ""),
        "correlationId": row.get("correlationId", ""),
        "attempt": _int(row.get("attempt")),
    }


def _table_missing(error: AzureError) -> bool:
    """Table storage said ``TableNotFound``. The SDK sets ``error_code`` for reads but not for
    inserts (``create_entity``), whose 404 body still names the code."""
    if not isinstance(error, ResourceNotFoundError):
        return False
    code = getattr(error, "error_code", None)
    return code == TableErrorCode.TABLE_NOT_FOUND or "TableNotFound" in str(error)


def _no_table(error: ResourceNotFoundError, table: str) -> None:
    """A missing table is a deployment fault, not a missing row: never read it as "no lease/verdict"."""
    if _table_missing(error):
        raise TableMissing(
            f"ledger table {table!r} does not exist (deploy the infrastructure, or create_table_if_needed)"
        ) from error


@contextlib.contextmanager
def _storage(operation: str, target: object) -> Iterator[None]:
    """Turn any storage failure into a LedgerError naming what was being done."""
    try:
        yield
    except AzureError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        kind = TableMissing if _table_missing(error) else LedgerError
        raise kind(f"ledger {operation} failed for {str(target)[:200]}: {first_line}") from error


@contextlib.asynccontextmanager
async def _deadline(operation: str, target: object, tries: int = 1) -> AsyncIterator[None]:
    """Bound a ledger operation that is not retried (the lease's acquire) to ``tries`` per-try
    deadlines: without it a Table endpoint that never answers holds it for the SDK's read timeout
    on each of its own retries (minutes), outside the budget ``Settings`` checks at start."""
    limit = tries * LEDGER_TRY_TIMEOUT_S
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError as error:
        raise LedgerError(
            f"ledger {operation} failed for {str(target)[:200]}: no answer within {limit:g} s"
        ) from error


class LedgerBase:
    """The table client and what every part uses: construction, closing, retried writes, markers."""

    # Writes that must not be lost (history rows, the release with its verdict) are tried
    # LEDGER_TRIES times, each within LEDGER_TRY_TIMEOUT_S, with doubling backoff from this.
    retry_backoff_s: float = LEDGER_BACKOFF_S

    def __init__(
        self,
        table: TableClient,
        *,
        lease_s: float,
        owned_credential: AsyncTokenCredential | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self._table = table
        self._lease = timedelta(seconds=lease_s)
        self._owned_credential = owned_credential
        self._last_ticks = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, credential: AsyncTokenCredential | None = None, **client_options: Any
    ) -> Self:
        """A connection string when one is set (Azurite, local runs), else the table service URI with
        an identity (no keys in Azure). Without a credential: the user-assigned identity named by
        ``AzureWebJobsStorage__clientId``, else the default chain (owned and closed by the ledger)."""
        if settings.storage_connection:
            table = TableClient.from_connection_string(
                settings.storage_connection, settings.ledger_table, **client_options
            )
            return cls(table, lease_s=settings.lease_s)
        if not settings.table_service_uri:
            raise LedgerError(
                "no table storage configured: set AzureWebJobsStorage (connection string) "
                "or AzureWebJobsStorage__tableServiceUri (identity-based)"
            )
        owned: AsyncTokenCredential | None = None
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

            if settings.storage_client_id:
                owned = ManagedIdentityCredential(client_id=settings.storage_client_id)
            else:
                owned = DefaultAzureCredential(authority=settings.cloud.authority_host)
            credential = owned
        table = TableClient(
            settings.table_service_uri.rstrip("/"),
            settings.ledger_table,
            credential=credential,
            **client_options,
        )
        return cls(table, lease_s=settings.lease_s, owned_credential=owned)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._table.close()
        if self._owned_credential is not None:
            await self._owned_credential.close()

    async def create_table_if_needed(self) -> None:
        """Create the table on first use (the deployment normally has; a 409 is fine)."""
        with _storage("create table", self._table.table_name), contextlib.suppress(ResourceExistsError):
            await self._table.create_table()

    async def _retrying(self, operation: str, target: object, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one storage write, retried with backoff on transient failures (never on a definite
        answer such as 409 or 412); the last failure is raised as a :class:`LedgerError`."""
        delay = self.retry_backoff_s
        for tries in range(1, LEDGER_TRIES + 1):
            try:
                with _storage(operation, target):
                    try:
                        async with asyncio.timeout(LEDGER_TRY_TIMEOUT_S):
                            return await attempt()
                    except TimeoutError as error:
                        raise AzureError(f"no answer within {LEDGER_TRY_TIMEOUT_S:g} s") from error
            except TableMissing:
                raise
            except LedgerError as error:
                cause = error.__cause__
                if tries == LEDGER_TRIES or cause is None or not _transient(cause):
                    raise
                log.warning("%s (try %d of %d); retrying in %.2g s", error, tries, LEDGER_TRIES, delay)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ markers

    async def get_marker(self, name: str) -> datetime | None:
        """When a periodic job (e.g. the log scan) last completed; None if it never did."""
        with _storage("get marker", name):
            try:
                row = await self._table.get_entity(MARKER_PARTITION, name)
            except ResourceNotFoundError as error:
                _no_table(error, self._table.table_name)
                return None
        return _time(row.get("at"))

    async def set_marker(self, name: str, at: datetime) -> None:
        """Record that a periodic job completed up to ``at`` (UTC)."""
        entity = {"PartitionKey": MARKER_PARTITION, "RowKey": name, "at": _utc(at)}
        with _storage("set marker", name):
            await self._table.upsert_entity(entity, mode=UpdateMode.REPLACE)
