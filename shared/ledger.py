"""The ledger: a lease per VM, its last verdict and an append-only history, in Azure Table storage.

Why it exists: queue deliveries are at-least-once and many workers run at once, so a lease (ETag
optimistic concurrency) makes sure one VM never has two workflows, hence never two Run Commands;
the last verdict lets the sweep skip VMs verified within ``RECHECK_AFTER``; the history proves what
was done to each VM, why, and under which correlation id.

Table design (one table, ``settings.ledger_table``; identity-based in Azure, Azurite locally):

==================  =========================  =============================  =======================
row                 PartitionKey               RowKey                         written by
==================  =========================  =============================  =======================
state (one per VM)  ``vm``                     VM key                         acquire / renew / release
history by target   ``h-<target key>``         ``<inverted ticks>-<random>``  record / record_event
history by day      ``d-<inverted day>``       the same RowKey                record / record_event
==================  =========================  =============================  =======================

- **VM key**: ``<subscription>|<resource group>|<name>``, lower-cased, so ids that differ only in
  case (ARM ignores case) share one row. The parts cannot hold ``/ \\ # ?`` or control characters
  (``VmId`` validates them) nor ``|``, so the key is valid and unambiguous. A target that is not a
  VM id (a computer name, garbage from a poison message) becomes ``t|`` + its lower-cased text
  percent-encoded with ``!`` for ``%`` (long ones end in a hash), so its row is never refused.
- **State rows share one partition** so that ``verified_since`` and ``status`` are one query each.
  Columns: ``vmId``, ``leaseOwner``/``leaseToken``/``leaseUntil`` (an empty owner or a past
  ``leaseUntil`` means free), ``outcome``/``reason``/``hint``/``decidedAt``, ``verifiedAt`` (only
  for outcomes that observed the VM; a deferral keeps the previous one), ``runs``,
  ``consecutiveDeferrals``, ``consecutiveFailures``.
- **Lease**: no row → ``create_entity`` (409: another worker created it first); a free or expired
  lease → merge with the row's ETag and ``IfNotModified`` (412: another worker won). A live lease is
  never re-entered, not even by the same owner: two deliveries handled by one host are still two.
  Renew and release are conditional on the ETag of our own last write, so a worker whose lease
  expired and was taken over can neither extend nor free the new holder's lease.
- **History** rows are only ever inserted. Each is written twice with the same RowKey: in the
  target's partition (``history``) and in the day's partition (``status``' recent list). Inverted
  .NET ticks make the newest sort first inside a partition, and the inverted day number makes the
  newest day sort first across partitions, so "most recent N" is one range query that stops early.
  Day partitions also make a retention clean-up a per-partition delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableErrorCode, UpdateMode
from azure.data.tables.aio import TableClient

from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import LEDGER_BACKOFF_S, LEDGER_TRIES, LEDGER_TRY_TIMEOUT_S, Settings

T = TypeVar("T")

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Verdict:
    """The last outcome stored for a VM; ``verified_at`` is the last time its state was observed."""

    vm_id: str
    outcome: OutcomeKind
    reason: str
    hint: str
    decided_at: datetime | None
    verified_at: datetime | None
    runs: int
    consecutive_deferrals: int
    consecutive_failures: int
    os_disk_id: str = ""  # the OS disk the VM had when this verdict was reached ("" if not read)


@dataclass(slots=True)
class Lease:
    """A held lease. Owned by one task; ``renew`` and ``release`` update it in place."""

    vm_id: VmId
    owner: str
    token: str
    expires_at: datetime
    previous: Verdict | None  # the verdict stored before this lease (None for a VM never seen)
    etag: str = field(repr=False)
    released: bool = False
    # The intent a previous holder announced before a Run Command and never closed with a verdict:
    # it died (or could not record) mid-workflow, so the stored verdict may not be the VM's state.
    interrupted: dict[str, Any] | None = None


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
    encoded = "t|" + quote(text, safe=":@=+,;$'()*").replace("%", "!")
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


def _lease_is_live(row: Mapping[str, Any], now: datetime) -> bool:
    until = _time(row.get("leaseUntil"))
    return bool(row.get("leaseOwner")) and until is not None and until > now


def _verdict(row: Mapping[str, Any]) -> Verdict | None:
    try:
        outcome = OutcomeKind(str(row.get("outcome")))
    except ValueError:
        return None  # a row that was leased but never given a verdict
    return Verdict(
        vm_id=str(row.get("vmId", "")),
        outcome=outcome,
        reason=str(row.get("reason", "")),
        hint=str(row.get("hint", "")),
        decided_at=_time(row.get("decidedAt")),
        verified_at=_time(row.get("verifiedAt")),
        runs=_int(row.get("runs")),
        consecutive_deferrals=_int(row.get("consecutiveDeferrals")),
        consecutive_failures=_int(row.get("consecutiveFailures")),
        os_disk_id=str(row.get("osDiskId") or ""),
    )


def _pending(row: Mapping[str, Any]) -> dict[str, Any] | None:
    text = row.get("pendingIntent")
    if not isinstance(text, str) or not text:
        return None
    return {**_details(text), "at": _iso(row.get("pendingAt"))}


def _transient(error: BaseException) -> bool:
    """Worth another try: a timeout or a storage failure that is not a definite answer."""
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, ResourceExistsError | ResourceModifiedError | ResourceNotFoundError):
        return False
    return isinstance(error, AzureError)


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


class Ledger:
    """Async access to the ledger table. Safe to share between tasks; one per worker process."""

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
    ) -> Ledger:
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

    # ------------------------------------------------------------------ lease

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Lease | None:
        """Claim the VM for one workflow; ``None`` when another delivery holds a live lease."""
        now = _utc(now)
        key = vm_key(vm_id)
        token = uuid.uuid4().hex
        expires = now + self._lease
        claim: dict[str, Any] = {
            "PartitionKey": STATE_PARTITION,
            "RowKey": key,
            "vmId": str(vm_id),
            "leaseOwner": _cap(owner, 200) or "?",
            "leaseToken": token,
            "leaseUntil": expires,
        }
        with _storage("acquire", vm_id):
            try:
                row = await self._table.get_entity(STATE_PARTITION, key)
            except ResourceNotFoundError as missing:
                _no_table(missing, self._table.table_name)
                try:
                    written = await self._table.create_entity(claim)
                except ResourceExistsError:
                    log.info("lease on %s: lost the race to create it", vm_id)
                    return None
                return Lease(vm_id, owner, token, expires, None, str(written["etag"]))
            interrupted = _pending(row)
            if _lease_is_live(row, now):
                log.info("lease on %s is held by %s", vm_id, row.get("leaseOwner"))
                return None
            try:
                written = await self._table.update_entity(
                    claim,
                    mode=UpdateMode.MERGE,
                    etag=row.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            except ResourceNotFoundError as error:
                _no_table(error, self._table.table_name)
                return None  # the row was deleted meanwhile: someone else is in charge of it
            except ResourceModifiedError:
                log.info("lease on %s: another worker claimed it first", vm_id)
                return None
        if interrupted is not None:
            log.warning(
                "lease on %s: the previous workflow ended without a verdict after %s", vm_id, interrupted
            )
        return Lease(
            vm_id, owner, token, expires, _verdict(row), str(written["etag"]), interrupted=interrupted
        )

    async def renew(
        self, lease: Lease, *, intent: Mapping[str, Any] | None = None, now: datetime | None = None
    ) -> None:
        """Extend a held lease by the full lease length; :class:`LeaseLost` if it is no longer ours.

        ``intent`` (what is about to be done, e.g. before a remediation Run Command) is kept on the
        state row until a verdict is stored: a later holder then knows this workflow never finished.
        """
        if lease.released:
            raise LeaseLost(f"lease on {lease.vm_id} was already released")
        now = _utc(now)
        expires = now + self._lease
        columns: dict[str, Any] = {
            "PartitionKey": STATE_PARTITION,
            "RowKey": vm_key(lease.vm_id),
            "leaseUntil": expires,
        }
        if intent is not None:
            columns.update({"pendingIntent": _details_json(intent) or "{}", "pendingAt": now})
        with _storage("renew", lease.vm_id):
            try:
                written = await self._table.update_entity(
                    columns,
                    mode=UpdateMode.MERGE,
                    etag=lease.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except (ResourceModifiedError, ResourceNotFoundError) as error:
                if isinstance(error, ResourceNotFoundError):
                    _no_table(error, self._table.table_name)
                raise LeaseLost(f"lease on {lease.vm_id} expired and was taken over") from error
        lease.etag = str(written["etag"])
        lease.expires_at = expires

    async def release(self, lease: Lease, outcome: Outcome | None, *, now: datetime | None = None) -> None:
        """Free the lease and store the verdict, only if the lease is still ours (by ETag).

        A lease that expired and was taken over is left to its new holder, and this verdict is not
        stored (the history row written by :meth:`record` still has it); the VM is then simply
        rechecked sooner, which is the safe direction.
        """
        if lease.released:
            return
        if outcome is not None:
            named = VmId.try_parse(outcome.vm_id)
            if named is not None and named != lease.vm_id:
                raise ValueError(f"outcome of {outcome.vm_id} given to the lease on {lease.vm_id}")
        now = _utc(now)
        row: dict[str, Any] = {
            "PartitionKey": STATE_PARTITION,
            "RowKey": vm_key(lease.vm_id),
            "leaseOwner": "",
            "leaseToken": "",
            "leaseUntil": now,
        }
        if outcome is not None:
            row.update(self._verdict_columns(lease.previous, outcome, now))
            row["pendingIntent"] = ""  # the verdict closes any intent announced under this lease

        async def write() -> dict[str, Any] | None:
            try:
                return dict(
                    await self._table.update_entity(
                        row,
                        mode=UpdateMode.MERGE,
                        etag=lease.etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                )
            except (ResourceModifiedError, ResourceNotFoundError) as error:
                if isinstance(error, ResourceNotFoundError):
                    _no_table(error, self._table.table_name)
                return None

        written = await self._retrying("release", lease.vm_id, write)
        if written is None:
            lease.released = True
            log.warning(
                "lease on %s expired and was taken over before release; verdict %s not stored",
                lease.vm_id,
                outcome.kind.value if outcome else None,
            )
            return
        lease.released = True
        lease.etag = str(written["etag"])

    @staticmethod
    def _verdict_columns(previous: Verdict | None, outcome: Outcome, now: datetime) -> dict[str, Any]:
        kind = outcome.kind
        columns: dict[str, Any] = {
            "outcome": kind.value,
            "reason": _cap(outcome.reason),
            "hint": _cap(outcome.hint, 4000),
            "decidedAt": now,
            "runs": (previous.runs if previous else 0) + 1,
            "consecutiveDeferrals": (previous.consecutive_deferrals if previous else 0) + 1
            if kind is OutcomeKind.DEFERRED
            else 0,
            "consecutiveFailures": (previous.consecutive_failures if previous else 0) + 1
            if kind is OutcomeKind.FAILED
            else 0,
        }
        if kind in VERIFYING:
            columns["verifiedAt"] = now
        disk = outcome.details.get("osDiskId")
        if isinstance(disk, str) and disk:
            columns["osDiskId"] = _cap(disk)
        return columns

    # ------------------------------------------------------------------ history

    async def record(
        self,
        vm_id: VmId,
        *,
        outcome: Outcome,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None = None,
    ) -> None:
        """Append one history row for a workflow's outcome (or a duplicate delivery)."""
        await self._append(
            vm_id,
            entry="outcome",
            kind=outcome.kind.value,
            reason=outcome.reason,
            hint=outcome.hint,
            details=outcome.details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    async def record_intent(
        self,
        vm_id: VmId,
        *,
        phase: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None = None,
    ) -> None:
        """Append an ``intent`` row before a Run Command that may change the VM: a crash after the
        POST then still leaves evidence of what was sent, when, and why."""
        await self._append(
            vm_id,
            entry="intent",
            kind="intent",
            reason=f"{phase}:{reason}" if reason else phase,
            hint="",
            details=details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    async def record_event(
        self,
        target: str,
        kind: str,
        reason: str,
        *,
        hint: str = "",
        details: Mapping[str, Any] | None = None,
        trigger: str = "",
        correlation_id: str = "",
        attempt: int = 0,
        now: datetime | None = None,
    ) -> None:
        """Append a row about anything, e.g. ``failed: poison`` for a computer name or an
        unparsable target: the target is never refused, so the event is never lost."""
        await self._append(
            target,
            entry="event",
            kind=kind,
            reason=reason,
            hint=hint,
            details=details,
            trigger=trigger,
            correlation_id=correlation_id,
            attempt=attempt,
            now=now,
        )

    def _row_key(self, now: datetime | None) -> tuple[datetime, str]:
        """Inverted ticks (newest first) plus a random suffix; strictly decreasing per ledger."""
        if now is None:
            nanos = time.time_ns()
            at = datetime.fromtimestamp(nanos / 1e9, UTC)
            ticks = max(_UNIX_EPOCH_TICKS + nanos // 100, self._last_ticks + 1)
            self._last_ticks = ticks
        else:
            at = _utc(now)
            ticks = (at - _TICKS_AT_0001) // timedelta(microseconds=1) * 10
        return at, f"{_MAX_TICKS - ticks:019d}-{uuid.uuid4().hex[:16]}"

    async def _append(
        self,
        target: VmId | str,
        *,
        entry: str,
        kind: str,
        reason: str,
        hint: str,
        details: Mapping[str, Any] | None,
        trigger: str,
        correlation_id: str,
        attempt: int,
        now: datetime | None,
    ) -> None:
        at, row_key = self._row_key(now)
        row: dict[str, Any] = {
            "RowKey": row_key,
            "at": at,
            "target": _cap(target),
            "entry": entry,
            "outcome": _cap(kind, 100),
            "reason": _cap(reason),
            "hint": _cap(hint, 4000),
            "details": _details_json(details),
            "trigger": _cap(trigger, 100),
            "correlationId": _cap(correlation_id, 200),
            "attempt": _int(attempt),
        }
        day = f"{_DAY_PREFIX}{(_LAST_DAY - at.date()).days:07d}"
        # The target's copy first: it is the one an operator reads for a VM. The RowKey is fixed
        # before the tries, so a try whose answer was lost makes the next one meet 409: written.
        for partition in (_HISTORY_PREFIX + target_key(target), day):
            entity = {**row, "PartitionKey": partition}

            async def write(entity: dict[str, Any] = entity) -> None:
                with contextlib.suppress(ResourceExistsError):
                    await self._table.create_entity(entity)

            await self._retrying("record", target, write)

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

    # ------------------------------------------------------------------ queries

    async def last_verdict(self, vm_id: VmId) -> Verdict | None:
        """The VM's stored verdict, or ``None`` if it never got one."""
        with _storage("read verdict", vm_id):
            try:
                row = await self._table.get_entity(STATE_PARTITION, vm_key(vm_id))
            except ResourceNotFoundError as error:
                _no_table(error, self._table.table_name)
                return None
        return _verdict(row)

    async def verified_since(self, cutoff: datetime) -> set[VmId]:
        """VMs whose state was observed at or after ``cutoff``: the sweep skips them."""
        found: set[VmId] = set()
        with _storage("query verified", cutoff.isoformat()):
            rows = self._table.query_entities(
                "PartitionKey eq @pk and verifiedAt ge @cutoff",
                parameters={"pk": STATE_PARTITION, "cutoff": _utc(cutoff)},
                select=["vmId"],
                results_per_page=1000,
            )
            async for row in rows:
                vm_id = VmId.try_parse(row.get("vmId"))
                if vm_id is not None:
                    found.add(vm_id)
        return found

    async def history(self, target: VmId | str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """A VM's (or any target's) history rows, newest first."""
        entries: list[dict[str, Any]] = []
        if limit is not None and limit <= 0:
            return entries
        with _storage("read history", target):
            rows = self._table.query_entities(
                "PartitionKey eq @pk",
                parameters={"pk": _HISTORY_PREFIX + target_key(target)},
                results_per_page=min(limit or 1000, 1000),
            )
            async for row in rows:
                entries.append(_history_entry(row))
                if limit is not None and len(entries) >= limit:
                    break
        return entries

    async def status(self, *, recent: int = 20, now: datetime | None = None) -> dict[str, Any]:
        """Counts of VMs by their last outcome word, live leases, and the ``recent`` newest actions."""
        now = _utc(now)
        counts = {kind.value: 0 for kind in OutcomeKind}
        vms = leased = 0
        with _storage("status", self._table.table_name):
            rows = self._table.query_entities(
                "PartitionKey eq @pk",
                parameters={"pk": STATE_PARTITION},
                select=["outcome", "leaseOwner", "leaseUntil"],
                results_per_page=1000,
            )
            async for row in rows:
                vms += 1
                word = row.get("outcome")
                if word in counts:
                    counts[word] += 1
                if _lease_is_live(row, now):
                    leased += 1
            latest: list[dict[str, Any]] = []
            if recent > 0:
                history = self._table.query_entities(
                    "PartitionKey gt @lo and PartitionKey lt @hi",
                    parameters={"lo": _DAY_RANGE[0], "hi": _DAY_RANGE[1]},
                    results_per_page=min(recent, 1000),
                )
                async for row in history:
                    latest.append(_history_entry(row))
                    if len(latest) >= recent:
                        break
        return {"vms": vms, "counts": counts, "inProgress": leased, "recent": latest}
