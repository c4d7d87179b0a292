"""Which VMs this deployment may touch: ``MANAGEMENT_GROUP_ID``, else ``TARGET_SUBSCRIPTIONS``.

Every path that can lead to a Run Command (the queue worker, whatever produced the item, and the
CLI's ``check`` and ``sweep``) asks :meth:`Scope.refusal` before any lease or Run Command, so an
event, an alert or a log row naming a VM elsewhere ends ``skipped: out-of-scope`` instead of being
worked on. The rule is the inventory's (``Inventory._scope``): a management group when one is set
(its membership is asked of Resource Graph, scoped to that group), else the target subscriptions
(a pure comparison), else everything the identity can read.
"""

from __future__ import annotations

import asyncio
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


class PerSubscription:
    """A :class:`GroupLookup` that asks once per subscription within one run (the CLI's).

    ``Inventory.in_scope`` answers for the VM's subscription alone (management groups hold
    subscriptions), so its answer holds for every VM of that subscription: a sweep of a management
    group asks Resource Graph once per subscription, not once per VM. Resource Graph allows a user
    about 15 queries per 5 s window and advises against many small queries ("Guidance for throttled
    requests in Azure Resource Graph",
    learn.microsoft.com/azure/governance/resource-graph/concepts/guidance-for-throttled-requests):
    a query per VM spends a large sweep's time on that quota, and fails VMs (``scope-unknown``)
    once the inventory's own retries are spent. A lookup that fails is not remembered: the next VM
    asks again. Concurrent first asks for one subscription share one query.
    """

    def __init__(self, inner: GroupLookup) -> None:
        self._inner = inner
        self._answers: dict[str, asyncio.Future[bool]] = {}

    async def in_scope(self, vm_id: VmId) -> bool:
        key = vm_id.subscription_id.lower()
        pending = self._answers.get(key)
        if pending is None or pending.cancelled():
            pending = self._answers[key] = asyncio.ensure_future(self._inner.in_scope(vm_id))
        try:
            return await asyncio.shield(pending)
        except Exception:
            if self._answers.get(key) is pending:
                del self._answers[key]
            raise
