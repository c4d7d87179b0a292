"""Value types shared by every layer: VM ids, outcomes and work items."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/?$",
    re.IGNORECASE,
)
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# ARM resource group names: 1-90 chars of letters, digits, '_', '-', '.', '(', ')', not ending in '.'.
_RG = re.compile(r"^[-\w._()]{1,90}$")
_VM_NAME = re.compile(r"^[-\w.]{1,64}$")


def is_guid(text: str) -> bool:
    """Subscription, tenant and workspace ids are GUIDs."""
    return bool(_GUID.match(text))


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
        match = _VM_ID.match(text.strip())
        if match is None:
            raise InvalidVmId(f"not a virtual machine resource id: {text[:200]!r}")
        sub, rg, name = match["sub"], match["rg"], match["name"]
        if not _GUID.match(sub):
            raise InvalidVmId(f"subscription id is not a GUID: {sub[:60]!r}")
        if not _RG.match(rg) or rg.endswith("."):
            raise InvalidVmId(f"invalid resource group name: {rg[:100]!r}")
        if not _VM_NAME.match(name):
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

    def __post_init__(self) -> None:
        if (self.vm_id is None) == (self.computer is None):
            raise ValueError("a work item names exactly one of vm_id or computer")

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
        if computer is not None and (not isinstance(computer, str) or not computer.strip()):
            raise ValueError("computer must be a non-empty string")
        attempt = data.get("attempt", 0)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ValueError("attempt must be a non-negative integer")
        return cls(
            reason=reason,
            vm_id=vm_id,
            computer=computer.strip() if isinstance(computer, str) else None,
            correlation_id=str(data.get("correlationId") or ""),
            source=str(data.get("source") or "")[:500],
            attempt=attempt,
            first_seen=str(data.get("firstSeen") or ""),
        )
