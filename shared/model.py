"""Value types shared by every layer: VM ids, outcomes and work items."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeGuard

# Every pattern here is used with ``fullmatch``: ``$`` also matches before a trailing newline, so
# ``re.match(r"^…$")`` accepts ``"vm1\n"`` (issue 9, item 3).
_VM_ID = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/?",
    re.IGNORECASE,
)
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
# ARM resource group names: 1-90 chars of letters, digits, '_', '-', '.', '(', ')', not ending in '.'.
_RG = re.compile(r"[-\w._()]{1,90}")
_VM_NAME = re.compile(r"[-\w.]{1,64}")
# Whitespace, C0 and C1 control characters: in no id or name (Table keys refuse the controls too);
# nor lone UTF-16 surrogates (JSON's "\ud800" escape), which have no UTF-8 form.
_UNPRINTABLE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# A computer name as Log Analytics or an alert reports it (host name or FQDN), before the inventory's
# stricter check: printable, no whitespace, DNS length.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_COMPUTER = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,255}")
MAX_ATTEMPT = 1000
MAX_DEFERRED_S = 30 * 86400.0  # more than DEFER_DEADLINE_HOURS can be (720 h): a larger one is clamped
"""``attempt`` is clamped here: the worker's delay is ``DEFER_DELAY_SECONDS × 2**attempt`` (capped),
and ``300.0 * 2**1024`` raises ``OverflowError``; 1,000 deferrals is beyond any real deadline."""


def is_guid(text: str) -> bool:
    """Subscription, tenant and workspace ids are GUIDs."""
    return isinstance(text, str) and _GUID.fullmatch(text) is not None


def has_unprintable(text: str) -> bool:
    """Whether ``text`` holds whitespace or a control character anywhere."""
    return _UNPRINTABLE.search(text) is not None


def is_computer_name(text: object) -> TypeGuard[str]:
    """A computer name a work item may carry: 1-255 printable characters, no whitespace."""
    return isinstance(text, str) and _COMPUTER.fullmatch(text) is not None


# RFC 1123 host name (letters, digits, hyphens, dots): no spaces, quotes or shell characters.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def is_host_name(text: object) -> TypeGuard[str]:
    """A KMS host must be a plain host name before it goes anywhere near a VM."""
    return isinstance(text, str) and _HOST_NAME.fullmatch(text) is not None


class InvalidVmId(ValueError):
    """The text is not the ARM resource id of a virtual machine."""


@dataclass(frozen=True, slots=True)
class VmId:
    """An ARM virtual machine id; equality and hashing ignore case, as ARM does."""

    subscription_id: str
    resource_group: str
    name: str

    @classmethod
    def parse(cls, text: str) -> VmId:
        """Parse ``/subscriptions/…/resourceGroups/…/providers/Microsoft.Compute/virtualMachines/…``."""
        if not isinstance(text, str):
            raise InvalidVmId(f"a VM id must be a string, not {type(text).__name__}")
        if has_unprintable(text):
            raise InvalidVmId(f"a VM id holds no whitespace or control characters: {text[:200]!r}")
        match = _VM_ID.fullmatch(text)
        if match is None:
            raise InvalidVmId(f"not a virtual machine resource id: {text[:200]!r}")
        sub, rg, name = match["sub"], match["rg"], match["name"]
        if not _GUID.fullmatch(sub):
            raise InvalidVmId(f"subscription id is not a GUID: {sub[:60]!r}")
        if not _RG.fullmatch(rg) or rg.endswith("."):
            raise InvalidVmId(f"invalid resource group name: {rg[:100]!r}")
        if not _VM_NAME.fullmatch(name):
            raise InvalidVmId(f"invalid virtual machine name: {name[:100]!r}")
        return cls(sub, rg, name)

    @classmethod
    def try_parse(cls, text: object) -> VmId | None:
        """Like :meth:`parse` but gives ``None`` for anything that is not a VM id."""
        if not isinstance(text, str):
            return None
        try:
            return cls.parse(text)
        except InvalidVmId:
            return None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subscription_id.lower(), self.resource_group.lower(), self.name.lower())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VmId):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{self.name}"
        )


class OutcomeKind(enum.StrEnum):
    """The outcome words of DESIGN.md, used verbatim by the CLI, ledger, logs and reports."""

    HEALTHY = "healthy"
    REMEDIATED = "remediated"
    WOULD_REMEDIATE = "would-remediate"
    SKIPPED = "skipped"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one VM ended: a kind, a reason word, an operator hint and facts worth keeping."""

    vm_id: str
    kind: OutcomeKind
    reason: str = ""
    hint: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.vm_id, "outcome": self.kind.value, "reason": self.reason}
        if self.hint:
            out["hint"] = self.hint
        out.update(self.details)
        return out


class Trigger(enum.StrEnum):
    """Why a VM is being checked (the work item's reason)."""

    VM_CREATED = "vm-created"
    ALERT = "alert"
    LOG_SCAN = "log-scan"
    SWEEP = "sweep"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One VM to check: its id, or only its computer name (resolved later through the inventory).

    This is the queue message of ``vm-checks`` (``to_json``/``from_json``); ``attempt`` counts
    deferrals so that a VM that never becomes ready ends ``failed`` at the deadline instead of
    cycling forever.
    """

    reason: Trigger
    vm_id: VmId | None = None
    computer: str | None = None
    correlation_id: str = ""
    source: str = ""  # the event id, alert id or query that produced it
    attempt: int = 0
    first_seen: str = ""  # ISO 8601 UTC, when the work item was first produced
    # ISO 8601 UTC, when the evidence itself happened: a log row's TimeGenerated, an alert's
    # firedDateTime. Empty when the producer has none (then first_seen, which is later, stands in).
    evidence_at: str = ""
    # How many of this item's workflows ended on a Run Command answer that said nothing about the VM
    # (``run-command-failed``, ``bad-output``): bounded by shared/unreadable.py, carried by the retry.
    unreadable: int = 0
    # Seconds of retry delay scheduled for this item so far (the sum of its deferrals' delays):
    # DEFER_DEADLINE_HOURS is counted in these, so that time spent waiting for the engine (a queue
    # backlog, a storage outage, a dead worker's lease) never costs the item its retries.
    deferred_s: float = 0.0
    # Deliveries of this item that Table storage could not take (unreachable, timing out, 5xx), each
    # carried on as a fresh delayed copy, and when the first of them was: the copy records them once
    # the ledger answers again (``deferred: ledger-unavailable``), and gives up at the deadline.
    ledger_missed: int = 0
    ledger_missed_since: str = ""

    def __post_init__(self) -> None:
        if (self.vm_id is None) == (self.computer is None):
            raise ValueError("a work item names exactly one of vm_id or computer")
        if self.computer is not None and not is_computer_name(self.computer):
            raise ValueError(f"not a computer name (printable, no whitespace): {self.computer[:80]!r}")

    def clamped(self, now: datetime) -> WorkItem:
        """This item with a ``first_seen`` or ``evidence_at`` in the future brought back to ``now``.

        A future ``firstSeen`` (a forged message, or a producer's clock ahead) would stand in for the
        evidence time, and a future ``evidenceAt`` would be newer than every verdict, for ever.
        """
        stamp = now.astimezone(UTC).isoformat()
        first, evidence = parse_time(self.first_seen), parse_time(self.evidence_at)
        missed = parse_time(self.ledger_missed_since)
        first_seen = stamp if first is not None and first > now else self.first_seen
        evidence_at = stamp if evidence is not None and evidence > now else self.evidence_at
        # A future "missed since" would put off the storage deadline for ever.
        missed_since = stamp if missed is not None and missed > now else self.ledger_missed_since
        if (first_seen, evidence_at, missed_since) == (
            self.first_seen,
            self.evidence_at,
            self.ledger_missed_since,
        ):
            return self
        return replace(self, first_seen=first_seen, evidence_at=evidence_at, ledger_missed_since=missed_since)

    @property
    def target(self) -> str:
        return str(self.vm_id) if self.vm_id is not None else f"computer:{self.computer}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason.value}
        if self.vm_id is not None:
            out["vmId"] = str(self.vm_id)
        else:
            out["computer"] = self.computer
        out.update(
            {
                "correlationId": self.correlation_id,
                "source": self.source,
                "attempt": self.attempt,
                "firstSeen": self.first_seen,
            }
        )
        if self.evidence_at:
            out["evidenceAt"] = self.evidence_at
        if self.unreadable:
            out["unreadable"] = self.unreadable
        if self.deferred_s:
            out["deferredS"] = self.deferred_s
        if self.ledger_missed:
            out["ledgerMissed"] = self.ledger_missed
            out["ledgerMissedSince"] = self.ledger_missed_since
        return out

    @classmethod
    def from_dict(cls, data: object) -> WorkItem:
        """Parse a queue message body; raise ``ValueError`` with a clear message when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("a work item is a JSON object")
        try:
            reason = Trigger(str(data.get("reason")))
        except ValueError as error:
            raise ValueError(f"unknown work item reason {data.get('reason')!r}") from error
        vm_text, computer = data.get("vmId"), data.get("computer")
        vm_id = VmId.parse(vm_text) if vm_text is not None else None
        if computer is not None and not is_computer_name(computer):
            raise ValueError("computer must be 1-255 printable characters without whitespace")
        attempt = data.get("attempt", 0)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ValueError("attempt must be a non-negative integer")
        first_seen = data.get("firstSeen") or ""
        if not isinstance(first_seen, str) or (first_seen and parse_time(first_seen) is None):
            raise ValueError(f"firstSeen must be an ISO 8601 time, not {str(first_seen)[:40]!r}")
        evidence_at = data.get("evidenceAt") or ""
        if not isinstance(evidence_at, str) or (evidence_at and parse_time(evidence_at) is None):
            raise ValueError(f"evidenceAt must be an ISO 8601 time, not {str(evidence_at)[:40]!r}")
        deferred_s = data.get("deferredS", 0)
        if (
            isinstance(deferred_s, bool)
            or not isinstance(deferred_s, int | float)
            or not math.isfinite(deferred_s)
            or deferred_s < 0
        ):
            raise ValueError("deferredS must be a non-negative number of seconds")
        unreadable = data.get("unreadable", 0)
        if isinstance(unreadable, bool) or not isinstance(unreadable, int) or unreadable < 0:
            raise ValueError("unreadable must be a non-negative integer")
        missed = data.get("ledgerMissed", 0)
        if isinstance(missed, bool) or not isinstance(missed, int) or missed < 0:
            raise ValueError("ledgerMissed must be a non-negative integer")
        missed_since = data.get("ledgerMissedSince") or ""
        if not isinstance(missed_since, str) or (missed_since and parse_time(missed_since) is None):
            raise ValueError(f"ledgerMissedSince must be an ISO 8601 time, not {str(missed_since)[:40]!r}")
        return cls(
            reason=reason,
            vm_id=vm_id,
            computer=computer,
            correlation_id=printable(str(data.get("correlationId") or ""))[:500],
            source=printable(str(data.get("source") or ""))[:500],
            attempt=min(attempt, MAX_ATTEMPT),
            first_seen=first_seen,
            evidence_at=evidence_at,
            unreadable=min(unreadable, MAX_ATTEMPT),
            deferred_s=float(min(deferred_s, MAX_DEFERRED_S)),
            ledger_missed=min(missed, MAX_ATTEMPT),
            ledger_missed_since=missed_since if missed else "",
        )


def printable(text: str) -> str:
    """``text`` without control characters (free text such as a correlation id or a rule name)."""
    return _CONTROL.sub("", text)


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time (naive means UTC), or ``None`` for anything else."""
    if not text or len(text) > 64:
        return None
    try:
        value = datetime.fromisoformat(text)
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        value.astimezone(UTC)  # "0001-01-01T00:00:00+01:00" is the year 0 in UTC: no time at all
    except (ValueError, OverflowError):
        return None
    return value
