"""Which VMs this deployment may touch: ``MANAGEMENT_GROUP_ID``, else ``TARGET_SUBSCRIPTIONS``.

Every path that can lead to a Run Command (the queue worker, whatever produced the item, and the
CLI's ``check`` and ``sweep``) asks :meth:`Scope.refusal` before any lease or Run Command, so an
event, an alert or a log row naming a VM elsewhere ends ``skipped: out-of-scope`` instead of being
worked on. The rule is the inventory's (``Inventory._scope``): a management group when one is set
(its membership is asked of Resource Graph, scoped to that group), else the target subscriptions
(a pure comparison), else everything the identity can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import Settings

OUT_OF_SCOPE = "out-of-scope"


class GroupLookup(Protocol):
    """Whether a VM is in the management group (``Inventory.in_scope``: a Resource Graph query)."""

    async def in_scope(self, vm_id: VmId) -> bool: ...


@dataclass(frozen=True, slots=True)
class Scope:
    subscriptions: frozenset[str] = frozenset()  # lower case
    management_group: str | None = None
    lookup: GroupLookup | None = None

    @classmethod
    def from_settings(cls, settings: Settings, lookup: GroupLookup | None = None) -> Scope:
        return cls(frozenset(s.lower() for s in settings.subscriptions), settings.management_group, lookup)

    @property
    def unrestricted(self) -> bool:
        return not self.management_group and not self.subscriptions

    def describe(self) -> str:
        if self.management_group:
            return f"management group {self.management_group}"
        if self.subscriptions:
            return "TARGET_SUBSCRIPTIONS " + ", ".join(sorted(self.subscriptions))
        return "every subscription the identity can read"

    async def refusal(self, vm_id: VmId) -> str | None:
        """Why ``vm_id`` is out of scope, or ``None`` when it is in scope.

        With a management group and no lookup the answer is a refusal: scope that cannot be checked
        is not assumed. A lookup that fails raises (nothing has been done): the worker defers a
        transient one (``TransientError``); the host retries any other.
        """
        if self.management_group:
            if self.lookup is None:
                return f"cannot tell whether the VM is in management group {self.management_group}"
            if await self.lookup.in_scope(vm_id):
                return None
            return f"the VM is not in management group {self.management_group} (Resource Graph)"
        if self.subscriptions and vm_id.subscription_id.lower() not in self.subscriptions:
            return f"subscription {vm_id.subscription_id} is not in TARGET_SUBSCRIPTIONS"
        return None

    async def check(self, vm_id: VmId) -> Outcome | None:
        """``skipped: out-of-scope`` for a VM outside the scope, else ``None``."""
        why = await self.refusal(vm_id)
        if why is None:
            return None
        return Outcome(
            str(vm_id),
            OutcomeKind.SKIPPED,
            OUT_OF_SCOPE,
            hint=f"Not checked: {why}. This deployment acts only on {self.describe()}.",
            details={"scope": self.describe()},
        )
