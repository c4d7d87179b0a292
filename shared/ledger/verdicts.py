"""The verdict: each VM's last outcome on its state row, and the queries that read it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from shared.ledger._table import (
    _DAY_RANGE,
    STATE_PARTITION,
    LedgerBase,
    _cap,
    _history_entry,
    _int,
    _lease_is_live,
    _no_table,
    _storage,
    _time,
    _utc,
    vm_key,
)
from shared.model import Outcome, OutcomeKind, VmId

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


def verdict_columns(previous: Verdict | None, outcome: Outcome, now: datetime) -> dict[str, Any]:
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


class VerdictStore(LedgerBase):
    """Reads of the state rows: one VM's verdict, the VMs verified since a time, and the status."""

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
        """VMs whose state was observed at or after ``cutoff``: the sweep skips them. Not a VM with a
        pending intent: a workflow announced a Run Command after that verdict and never closed it,
        so the verdict may no longer be the VM's state (and no delivery may be left to say so)."""
        found: set[VmId] = set()
        with _storage("query verified", cutoff.isoformat()):
            rows = self._table.query_entities(
                "PartitionKey eq @pk and verifiedAt ge @cutoff",
                parameters={"pk": STATE_PARTITION, "cutoff": _utc(cutoff)},
                select=["vmId", "pendingIntent"],
                results_per_page=1000,
            )
            async for row in rows:
                if row.get("pendingIntent"):
                    continue
                vm_id = VmId.try_parse(row.get("vmId"))
                if vm_id is not None:
                    found.add(vm_id)
        return found

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

    async def scan_state(
        self,
        *,
        odata: str,
        parameters: Mapping[str, Any],
        after: str | None,
        keep: Callable[[Mapping[str, Any]], bool],
        limit: int,
        max_scanned: int,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """State rows in key order after ``after`` that match ``odata`` and ``keep``: at most ``limit``
        of them, reading at most ``max_scanned`` rows (``GET /api/status`` pages, shared/status.py).

        The second value is the key to continue after, or ``None`` when no row is left to read.
        """
        clauses = ["PartitionKey eq @pk"]
        values: dict[str, Any] = {**parameters, "pk": STATE_PARTITION}
        if after:
            clauses.append("RowKey gt @after")
            values["after"] = after
        if odata:
            clauses.append(odata)
        found: list[dict[str, Any]] = []
        last: str | None = None
        scanned = 0
        with _storage("status page", self._table.table_name):
            rows = self._table.query_entities(
                " and ".join(clauses), parameters=values, results_per_page=min(max(limit + 1, 100), 1000)
            )
            async for row in rows:
                scanned += 1
                if keep(row):
                    if len(found) >= limit:
                        return found, last  # one more matches: the next page starts after this one's last
                    found.append(dict(row))
                last = str(row["RowKey"])
                if scanned >= max_scanned:
                    return found, last
        return found, None
