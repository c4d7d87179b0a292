"""Value types shared by every layer: VM ids, outcomes and work items."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/?$",
    re.IGNORECASE,
)
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# ARM resource group names: 1-90 chars of letters, digits, '_', '-', '.', '(', ')', not ending in '.'.
_RG = re.compile(r"^[-\w._()]{1,90}$")
_VM_NAME = re.compile(r"^[-\w.]{1,64}$")


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
