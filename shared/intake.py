"""Intake: a trigger's payload in, work items out, and a reason for everything left out.

Pure (no I/O, no clock, no ``azure.functions``): the caller passes ``now``, so every payload kind
is unit-tested from real samples. A payload that is not what it claims to be raises
:class:`IntakeError` naming the JSON path at fault; a well-formed payload that simply concerns
something else (a delete, a storage account, a resolved alert) gives no items and says why in
``ignored``, so an operator can tell "nothing to do" from "wired wrong".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from shared.model import InvalidVmId, Trigger, VmId, WorkItem, is_computer_name, parse_time, printable

MAX_ALERT_BYTES = 256 * 1024
"""Azure Monitor's size cap for a common-schema alert; the HTTP adapter rejects bigger bodies."""

COMMON_ALERT_SCHEMA = "azureMonitorCommonAlertSchema"
WRITE_SUCCESS = "Microsoft.Resources.ResourceWriteSuccess"
VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
VM_WRITE = "Microsoft.Compute/virtualMachines/write"

_RESOURCE_ID_DIMENSIONS = frozenset({"_resourceid", "resourceid"})
_COMPUTER = "computer"
_VM_SHAPED = re.compile(r"/providers/microsoft\.compute/virtualmachines/[^/]+/?\Z", re.IGNORECASE)
_WORKSPACE = re.compile(r"/providers/microsoft\.operationalinsights/workspaces/[^/]+/?\Z", re.IGNORECASE)
_MAX_TEXT = 500  # WorkItem.from_dict keeps at most this much of ``source``
# A log row's own time: the scan's ``LastSeen`` (max(TimeGenerated)), or a raw row's TimeGenerated.
_ROW_TIMES = ("lastseen", "timegenerated")


class IntakeError(ValueError):
    """The payload is malformed or of no kind intake knows; the message names the JSON path."""


@dataclass
class IntakeResult:
    """Work items to enqueue, and a human-readable reason for everything that was dropped."""

    items: list[WorkItem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# --- typed accessors: JSON arrives as ``object``; these narrow it or raise naming the path ---


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 200) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, so a hostile payload cannot flood the logs."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _obj(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise IntakeError(f"{path}: expected a JSON object, got {_kind(value)}")
    return value


def _list(value: object, path: str) -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise IntakeError(f"{path}: expected a JSON array, got {_kind(value)}")
    return value


def _opt_obj(parent: Mapping[str, object], key: str, path: str) -> Mapping[str, object]:
    """An object that may be absent or ``null`` (the alert samples have ``"properties": null``)."""
    value = parent.get(key)
    return {} if value is None else _obj(value, f"{path}.{key}")


def _opt_list(parent: Mapping[str, object], key: str, path: str) -> Sequence[object]:
    value = parent.get(key)
    return () if value is None else _list(value, f"{path}.{key}")


def _str(parent: Mapping[str, object], key: str, path: str, *, empty_ok: bool = False) -> str:
    if key not in parent:
        raise IntakeError(f"{path}.{key}: missing")
    value = parent[key]
    if not isinstance(value, str):
        raise IntakeError(f"{path}.{key}: expected a string, got {_kind(value)}")
    if not empty_ok and not value.strip():
        raise IntakeError(f"{path}.{key}: must not be empty")
    return value


def _opt_str(parent: Mapping[str, object], key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise IntakeError(f"{path}.{key}: expected a string, got {_kind(value)}")
    return value


def _stamp(now: datetime) -> str:
    """``now`` as ISO 8601 UTC; a naive datetime is a caller bug, not a payload problem."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _evidence(value: object, now: datetime) -> str:
    """When the evidence happened, as ISO 8601 UTC, or "" when ``value`` is no time; never after ``now``.

    A time that cannot be read is no evidence time: the item's ``firstSeen`` (later than any real
    evidence time) then stands in, which can only make a fresh verdict count for less.
    """
    moment = value if isinstance(value, datetime) else parse_time(value) if isinstance(value, str) else None
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Full precision: a time cut to the second could pass for one older than the verdict.
    try:
        return min(moment, now).astimezone(UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:  # an offset that takes the time out of the calendar in UTC
        return ""


def _computer_name(value: object) -> str | None:
    """The name without surrounding spaces, or ``None`` when any whitespace or control is left in it."""
    if not isinstance(value, str):
        return None
    name = value.strip(" ")
    return name if is_computer_name(name) else None


def _not_a_vm(text: str) -> str:
    """Why ``text`` is no VM id; for a VM-shaped id, exactly what is wrong (a placeholder subscription)."""
    if _WORKSPACE.search(text.strip()):
        return f"{_short(text)} is a Log Analytics workspace, not a VM"
    if _VM_SHAPED.search(text):
        try:
            VmId.parse(text)
        except InvalidVmId as error:
            return f"{_short(text)} is not a valid virtual machine id: {error}"
    return f"{_short(text)} is not a virtual machine id"


class _Targets:
    """Collects targets once each: VM ids compared as ARM does, computer names casefolded."""

    def __init__(
        self,
        *,
        reason: Trigger,
        correlation_id: str,
        source: str,
        stamp: str,
        prefix: str = "",
        evidence_at: str = "",
    ) -> None:
        self._reason, self._stamp, self._prefix = reason, stamp, prefix
        self._evidence_at = evidence_at
        self._correlation_id = printable(correlation_id)[:_MAX_TEXT]
        self._source = printable(source)[:_MAX_TEXT]
        self._vm_from: dict[VmId, str] = {}
        self._computer_from: dict[str, str] = {}
        self.vm_items: list[WorkItem] = []
        self.computer_items: list[WorkItem] = []
        self.ignored: list[str] = []

    def add_vm(
        self, vm: VmId, where: str, *, correlation_id: str = "", source: str = "", evidence_at: str = ""
    ) -> None:
        if vm in self._vm_from:
            # The payload's own time (an alert's firedDateTime) when the row gives none, as for the
            # first mention: an alert naming its VM twice (dimension and alertTargetIDs) keeps it.
            self._newer_evidence(self.vm_items, lambda i: i.vm_id == vm, evidence_at or self._evidence_at)
            self.ignored.append(
                f"{self._prefix}{where}: VM {vm} is already listed (from {self._vm_from[vm]})"
            )
            return
        self._vm_from[vm] = where
        self.vm_items.append(
            WorkItem(
                reason=self._reason,
                vm_id=vm,
                correlation_id=printable(correlation_id or self._correlation_id)[:_MAX_TEXT],
                source=printable(source or self._source)[:_MAX_TEXT],
                first_seen=self._stamp,
                evidence_at=evidence_at or self._evidence_at,
            )
        )

    def add_computer(self, name: str, where: str, *, evidence_at: str = "") -> None:
        key = name.casefold()
        if key in self._computer_from:
            first = self._computer_from[key]
            self._newer_evidence(
                self.computer_items,
                lambda i: (i.computer or "").casefold() == key,
                evidence_at or self._evidence_at,
            )
            self.ignored.append(f"{self._prefix}{where}: computer {name!r} is already listed (from {first})")
            return
        self._computer_from[key] = where
        self.computer_items.append(
            WorkItem(
                reason=self._reason,
                computer=name,
                correlation_id=self._correlation_id,
                source=self._source,
                first_seen=self._stamp,
                evidence_at=evidence_at or self._evidence_at,
            )
        )

    @staticmethod
    def _newer_evidence(items: list[WorkItem], match: Callable[[WorkItem], bool], evidence_at: str) -> None:
        """A target named twice keeps its newest evidence time, and none when one row had none."""
        for i, item in enumerate(items):
            if match(item):
                kept, new = parse_time(item.evidence_at), parse_time(evidence_at)
                newest = (
                    ""
                    if kept is None or new is None
                    else max((kept, item.evidence_at), (new, evidence_at))[1]
                )
                if newest != item.evidence_at:
                    items[i] = replace(item, evidence_at=newest)
                return


# --- Event Grid: Microsoft.Resources.ResourceWriteSuccess, Event Grid or CloudEvents 1.0 schema ---


@dataclass(frozen=True)
class _Event:
    id: str
    type: str
    subject: str | None
    data: object


def _parse_event(event: object, path: str) -> _Event:
    """Read the envelope of either schema; CloudEvents carries ``specversion``, Event Grid ``eventType``."""
    envelope = _obj(event, path)
    if "specversion" in envelope:
        version = envelope["specversion"]
        if version != "1.0":
            shown = _short(version) if isinstance(version, str) else _kind(version)
            raise IntakeError(f"{path}.specversion: only CloudEvents 1.0 is supported, got {shown}")
        _str(envelope, "source", path)
        return _Event(
            id=_str(envelope, "id", path),
            type=_str(envelope, "type", path),
            subject=_opt_str(envelope, "subject", path),
            data=envelope.get("data"),
        )
    if "eventType" in envelope:
        return _Event(
            id=_str(envelope, "id", path),
            type=_str(envelope, "eventType", path),
            subject=_str(envelope, "subject", path, empty_ok=True),
            data=envelope.get("data"),
        )
    raise IntakeError(f"{path}: not an Event Grid event (no eventType) nor a CloudEvent (no specversion)")


def from_event_grid(payload: object, *, now: datetime) -> IntakeResult:
    """VM writes from one event or an array of them, in the Event Grid or the CloudEvents 1.0 schema.

    Only ``ResourceWriteSuccess`` with operation ``Microsoft.Compute/virtualMachines/write`` on a VM
    resource counts (a subscription-scope topic delivers every write in the subscription). The VM is
    ``data.resourceUri``, else ``subject``. One malformed event fails the whole payload: Event Grid
    never sends one, so it means the wrong thing is wired to the endpoint.
    """
    stamp = _stamp(now)
    if isinstance(payload, Mapping):
        events: Sequence[object] = (payload,)
        paths = ["$"]
    elif isinstance(payload, list | tuple):
        events = payload
        paths = [f"$[{i}]" for i in range(len(events))]
    else:
        raise IntakeError(f"$: expected an event object or an array of events, got {_kind(payload)}")
    if not events:
        return IntakeResult(ignored=["the payload is an empty array of events"])
    targets = _Targets(reason=Trigger.VM_CREATED, correlation_id="", source="", stamp=stamp)
    for i, (event, path) in enumerate(zip(events, paths, strict=True)):
        label = f"event {i}"
        parsed = _parse_event(event, path)
        if parsed.type.casefold() == VALIDATION_EVENT.casefold():
            targets.ignored.append(
                f"{label}: {VALIDATION_EVENT} is the subscription handshake, not a VM event "
                "(the HTTP adapter or the Event Grid trigger answers it)"
            )
            continue
        if parsed.type.casefold() != WRITE_SUCCESS.casefold():
            targets.ignored.append(f"{label}: event type {_short(parsed.type)} is not {WRITE_SUCCESS}")
            continue
        data = _obj(parsed.data, f"{path}.data")
        operation = _str(data, "operationName", f"{path}.data")
        if operation.casefold() != VM_WRITE.casefold():
            targets.ignored.append(f"{label}: operation {_short(operation)} is not a VM write ({VM_WRITE})")
            continue
        status = _opt_str(data, "status", f"{path}.data")
        if status is not None and status.casefold() != "succeeded":
            targets.ignored.append(f"{label}: status {_short(status)} is not Succeeded")
            continue
        resource = _opt_str(data, "resourceUri", f"{path}.data") or parsed.subject
        if not resource:
            raise IntakeError(f"{path}.data.resourceUri: missing, and no subject to fall back on")
        vm = VmId.try_parse(resource)
        if vm is None:
            targets.ignored.append(f"{label}: resource {_not_a_vm(resource)}")
            continue
        correlation = _opt_str(data, "correlationId", f"{path}.data") or parsed.id
        targets.add_vm(vm, label, correlation_id=correlation, source=parsed.id)
    return IntakeResult(items=targets.vm_items, ignored=targets.ignored)


# --- Azure Monitor alerts: common alert schema (Log Alerts V2, and the older Log Analytics shape) ---


MAX_TARGETS_PER_ALERT = 100
"""Default of ``MAX_TARGETS_PER_ALERT``: one 256 KB alert can name about 2,000 VM ids or 6,500
computer names; past the cap each target is left out with a reason (logged, and in the 202 answer)."""


def _cap_targets(items: list[WorkItem], ignored: list[str], label: str, cap: int) -> list[WorkItem]:
    """The first ``cap`` items; every one past it recorded in ``ignored`` by name, never dropped silently."""
    if len(items) <= cap:
        return items
    for item in items[cap:]:
        ignored.append(f"{label}: {item.target} not queued: over the cap of {cap} targets per alert")
    return items[:cap]


def from_alert(payload: object, *, now: datetime, max_targets: int = MAX_TARGETS_PER_ALERT) -> IntakeResult:
    """VMs named by a ``Fired`` common-schema alert; a ``Resolved`` one does nothing.

    Where the VMs come from, in this order: the condition dimensions ``_ResourceId`` / ``ResourceId``
    (names compared case-insensitively; ``alertContext.condition.allOf[*].dimensions`` in Log Alerts
    V2, ``alertContext.Dimensions`` in the older Log Analytics shape), then
    ``essentials.configurationItems`` (and the older ``alertContext.AffectedConfigurationItems``),
    then ``essentials.alertTargetIDs``. Each is used only when it parses as a VM id; a workspace id
    (a rule scoped to a workspace) or any other value is left out with a reason.

    A ``Computer`` dimension gives a computer-name item (resolved later through the inventory) only
    when the alert yields no VM id at all. When it does yield one, the computer names are dropped
    with a reason: one fired log alert is one row of the rule's dimension split, so its ids and its
    Computer describe the same machine, and an exact id beats a name that the inventory may match
    ambiguously. Computer names and VM ids are never compared with each other, because a guest's
    host name need not be its ARM name.
    """
    stamp = _stamp(now)
    root = _obj(payload, "$")
    schema = root.get("schemaId")
    if schema != COMMON_ALERT_SCHEMA:
        shown = _short(schema) if isinstance(schema, str) else _kind(schema)
        raise IntakeError(
            f"$.schemaId: expected {COMMON_ALERT_SCHEMA!r}, got {shown} "
            "(enable the common alert schema on the action group)"
        )
    data = _obj(root.get("data"), "$.data")
    essentials = _obj(data.get("essentials"), "$.data.essentials")
    ep = "$.data.essentials"
    condition = _str(essentials, "monitorCondition", ep)
    alert_id = _opt_str(essentials, "alertId", ep)
    rule = _opt_str(essentials, "alertRule", ep)
    label = f"alert {_short(rule or alert_id or '(unnamed)', 120)}"
    if condition.strip().casefold() != "fired":
        return IntakeResult(
            ignored=[f"{label}: monitorCondition is {_short(condition)}; only Fired alerts act"]
        )

    source = alert_id or (f"alert-rule:{rule}" if rule else "alert")
    # When the alert fired (the webhook's essentials.firedDateTime; the Alerts Management API names
    # it startDateTime): its evidence is that old, however late or often it is delivered.
    fired = _evidence(essentials.get("firedDateTime") or essentials.get("startDateTime"), now)
    targets = _Targets(
        reason=Trigger.ALERT,
        correlation_id=source,
        source=source,
        stamp=stamp,
        prefix=f"{label}: ",
        evidence_at=fired,
    )
    computers: list[tuple[str, str]] = []

    def candidate_id(value: object, where: str) -> None:
        if not isinstance(value, str):
            raise IntakeError(f"{where}: expected a string, got {_kind(value)}")
        vm = VmId.try_parse(value)
        if vm is not None:
            targets.add_vm(vm, where)
        elif not value.strip():
            targets.ignored.append(f"{label}: {where} is empty")
        else:
            targets.ignored.append(f"{label}: {where} {_not_a_vm(value)}")

    def dimensions(items: Sequence[object], path: str) -> None:
        for d, dim in enumerate(items):
            dpath = f"{path}[{d}]"
            entry = _obj(dim, dpath)
            name = _str(entry, "name", dpath, empty_ok=True).strip().casefold()
            value = entry.get("value")
            if value is not None and not isinstance(value, str):
                raise IntakeError(f"{dpath}.value: expected a string, got {_kind(value)}")
            if name in _RESOURCE_ID_DIMENSIONS:
                candidate_id(value or "", f"dimension {entry['name']} ({dpath})")
            elif name == _COMPUTER:
                computer = _computer_name(value)
                if computer is None:
                    targets.ignored.append(f"{label}: {dpath} {_short(value or '')} is not a computer name")
                else:
                    computers.append((computer, f"dimension Computer ({dpath})"))

    context = _opt_obj(data, "alertContext", "$.data")
    cp = "$.data.alertContext"
    criteria = _opt_obj(context, "condition", cp)
    for c, criterion in enumerate(_opt_list(criteria, "allOf", f"{cp}.condition")):
        cpath = f"{cp}.condition.allOf[{c}]"
        dimensions(_opt_list(_obj(criterion, cpath), "dimensions", cpath), f"{cpath}.dimensions")
    dimensions(_opt_list(context, "Dimensions", cp), f"{cp}.Dimensions")
    for i, item in enumerate(_opt_list(essentials, "configurationItems", ep)):
        candidate_id(item, f"{ep}.configurationItems[{i}]")
    for i, item in enumerate(_opt_list(context, "AffectedConfigurationItems", cp)):
        candidate_id(item, f"{cp}.AffectedConfigurationItems[{i}]")
    for i, item in enumerate(_opt_list(essentials, "alertTargetIDs", ep)):
        candidate_id(item, f"{ep}.alertTargetIDs[{i}]")

    if targets.vm_items:
        for name, where in computers:
            targets.ignored.append(f"{label}: {where} {name!r} not used: the alert names the VM by id")
    else:
        for name, where in computers:
            targets.add_computer(name, where)
    if not targets.vm_items and not targets.computer_items:
        targets.ignored.append(f"{label}: names no VM id and no Computer")
    items = _cap_targets(targets.vm_items + targets.computer_items, targets.ignored, label, max_targets)
    return IntakeResult(items=items, ignored=targets.ignored)


# --- Log Analytics: rows of the log scan query (columns _ResourceId and Computer) ---


def _log_rows(rows: Iterable[object], *, stamp: str, source: str, label: str, now: datetime) -> IntakeResult:
    targets = _Targets(reason=Trigger.LOG_SCAN, correlation_id=source, source=source, stamp=stamp)
    for r, row in enumerate(rows):
        where = f"{label}row {r}"
        if not isinstance(row, Mapping):
            raise IntakeError(f"{where}: expected a mapping of column to value, got {_kind(row)}")
        cells = {str(k).casefold(): v for k, v in row.items()}
        resource, computer = cells.get("_resourceid"), cells.get(_COMPUTER)
        evidence = _evidence(next((cells[c] for c in _ROW_TIMES if cells.get(c) is not None), None), now)
        vm = VmId.try_parse(resource)
        if vm is not None:
            targets.add_vm(vm, where, evidence_at=evidence)
            continue
        name = _computer_name(computer)
        if name is not None:
            targets.add_computer(name, where, evidence_at=evidence)
            continue
        shown_id = _short(resource) if isinstance(resource, str) else _kind(resource)
        shown_name = _short(computer) if isinstance(computer, str) else _kind(computer)
        targets.ignored.append(
            f"{where}: neither a VM _ResourceId ({shown_id}) nor a computer name ({shown_name})"
        )
    return IntakeResult(items=targets.vm_items + targets.computer_items, ignored=targets.ignored)


def from_log_rows(rows: Iterable[Mapping[str, object]], *, now: datetime, source: str) -> IntakeResult:
    """Machines found by the log scan: a VM item when ``_ResourceId`` is a VM id, else a computer item.

    ``_ResourceId`` is empty or a non-VM id for machines Azure does not host as VMs (Arc servers and
    the like), whose ``Computer`` the inventory may still resolve. Column names are matched
    case-insensitively; each VM and each computer name gives one item however many rows name it.
    """
    return _log_rows(rows, stamp=_stamp(now), source=source, label="", now=now)


def _from_query_response(payload: Mapping[str, object], *, now: datetime) -> IntakeResult:
    """A Log Analytics query response: each table's rows, keyed by that table's own column names."""
    stamp = _stamp(now)
    result = IntakeResult()
    seen: set[object] = set()
    for t, table in enumerate(_list(payload["tables"], "$.tables")):
        tpath = f"$.tables[{t}]"
        entry = _obj(table, tpath)
        name = _str(entry, "name", tpath, empty_ok=True)
        columns = [
            _str(_obj(column, f"{tpath}.columns[{c}]"), "name", f"{tpath}.columns[{c}]")
            for c, column in enumerate(_list(entry.get("columns"), f"{tpath}.columns"))
        ]
        rows = _list(entry.get("rows"), f"{tpath}.rows")
        if not {c.casefold() for c in columns} & {"_resourceid", _COMPUTER}:
            result.ignored.append(f"table {_short(name)}: has neither a _ResourceId nor a Computer column")
            continue
        records: list[Mapping[str, object]] = []
        for r, row in enumerate(rows):
            values = _list(row, f"{tpath}.rows[{r}]")
            if len(values) != len(columns):
                raise IntakeError(f"{tpath}.rows[{r}]: {len(values)} values for {len(columns)} columns")
            records.append(dict(zip(columns, values, strict=True)))
        part = _log_rows(
            records, stamp=stamp, source=f"log-analytics:{name}", label=f"table {_short(name)} ", now=now
        )
        result.ignored.extend(part.ignored)
        for item in part.items:  # a machine named in two tables is still one work item
            key: object = item.vm_id if item.vm_id is not None else (item.computer or "").casefold()
            if key in seen:
                result.ignored.append(f"table {_short(name)}: {_short(item.target)} already listed")
                continue
            seen.add(key)
            result.items.append(item)
    return result


# --- detection ---


def from_payload(payload: object, *, now: datetime) -> IntakeResult:
    """Work items from any payload intake knows, detected by shape.

    An array or an object with ``eventType``/``specversion`` is Event Grid; ``schemaId`` is an alert;
    ``tables`` is a Log Analytics query response. Anything else raises :class:`IntakeError`.
    """
    if isinstance(payload, list | tuple):
        return from_event_grid(payload, now=now)
    if not isinstance(payload, Mapping):
        raise IntakeError(f"$: expected a JSON object or array, got {_kind(payload)}")
    if "schemaId" in payload:
        return from_alert(payload, now=now)
    if "eventType" in payload or "specversion" in payload:
        return from_event_grid(payload, now=now)
    if "tables" in payload:
        return _from_query_response(payload, now=now)
    if "error" in payload:
        error = payload["error"]
        detail = ""
        if isinstance(error, Mapping):
            detail = ": " + " ".join(str(error.get(k, "")) for k in ("code", "message")).strip()[:300]
        raise IntakeError(f"$.error: the payload is an error response, not data{detail}")
    keys = ", ".join(_short(str(k), 40) for k in list(payload)[:8]) or "none"
    raise IntakeError(
        "$: unrecognised payload (top-level keys: "
        f"{keys}); expected an Event Grid or CloudEvents event or array, "
        "a common-schema alert (schemaId) or a Log Analytics query response (tables)"
    )
