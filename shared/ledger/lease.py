"""The lease: one workflow per VM, by ETag optimistic concurrency on the VM's state row."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.ledger._table import (
    STATE_PARTITION,
    LeaseLost,
    LedgerBase,
    _cap,
    _deadline,
    _details,
    _details_json,
    _iso,
    _lease_is_live,
    _no_table,
    _storage,
    _time,
    _utc,
    log,
    vm_key,
)
from shared.ledger.verdicts import Verdict, _verdict, verdict_columns
from shared.model import Outcome, VmId
from shared.settings import LEDGER_TRIES


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


def _pending(row: Mapping[str, Any]) -> dict[str, Any] | None:
    text = row.get("pendingIntent")
    if not isinstance(text, str) or not text:
        return None
    return {**_details(text), "at": _iso(row.get("pendingAt"))}


class LeaseStore(LedgerBase):
    """acquire / renew / release of the per-VM lease; release also stores the verdict."""

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
        # Two calls (a read, then a create or a conditional merge), never retried (a retry whose first
        # try landed would meet our own claim and leave it held until it expires), bounded as one
        # retried write is (LEDGER_TRIES per-try deadlines), the share Settings' budget counts for it.
        async with _deadline("acquire", vm_id, tries=LEDGER_TRIES):
            return await self._acquire(vm_id, owner, now, claim)

    async def _acquire(self, vm_id: VmId, owner: str, now: datetime, claim: dict[str, Any]) -> Lease | None:
        key, token, expires = claim["RowKey"], claim["leaseToken"], claim["leaseUntil"]
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

        tries = 0

        async def write() -> dict[str, Any] | None:
            nonlocal tries
            tries += 1
            written = await self._merge_if_ours(columns, lease.etag)
            if written is None and tries > 1:
                # 412 on a retry: the try whose answer was lost may have landed. Ours if the row still
                # carries this lease's token and the expiry that try wrote; else it was taken over.
                row = await self._table.get_entity(STATE_PARTITION, columns["RowKey"])
                if row.get("leaseToken") == lease.token and _time(row.get("leaseUntil")) == expires:
                    return {"etag": row.metadata["etag"]}
            return written

        # Retried within the write budget like the history rows; a retry that meets 412 tells our own
        # landed write from a takeover by the lease token. Lost: LeaseLost, and nothing is POSTed.
        written = await self._retrying("renew", lease.vm_id, write)
        if written is None:
            raise LeaseLost(f"lease on {lease.vm_id} expired and was taken over")
        lease.etag = str(written["etag"])
        lease.expires_at = expires

    async def _merge_if_ours(self, columns: dict[str, Any], etag: str) -> dict[str, Any] | None:
        """Merge ``columns`` into the VM's state row only if its ETag is still ``etag``; None when not."""
        try:
            return dict(
                await self._table.update_entity(
                    columns, mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError) as error:
            if isinstance(error, ResourceNotFoundError):
                _no_table(error, self._table.table_name)
            return None

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
            row.update(verdict_columns(lease.previous, outcome, now))
            row["pendingIntent"] = ""  # the verdict closes any intent announced under this lease

        async def write() -> dict[str, Any] | None:
            return await self._merge_if_ours(row, lease.etag)

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
