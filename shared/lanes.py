"""The sweep's waiting room: listed VMs in one lane per subscription, handed out round-robin.

ARM's budget is per subscription (request-limits-and-throttling.md), and Resource Graph lists in
id order, which is subscription by subscription: a pool of workers fed in listing order would spend
one subscription's budget at a time while the others' refill unused. The lanes keep what was listed
but not yet started (up to ``capacity`` VMs; the producer waits beyond that, so memory stays
bounded) and give each free worker a VM from the next subscription in turn that is under its
concurrency limit (:meth:`shared.azure.pacing.Pacer.concurrency`: halved after a 429 there, grown
back as answers come): every subscription's budget refills in parallel, and a throttled subscription
holds fewer workers while the others keep theirs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

from shared.vm import VmFacts

# VMs listed ahead of the workers. A VmFacts is well under 2 KB, so this is at most a few tens of
# MB, and it lets a 20,000-VM scope listed subscription by subscription spread over all of them.
DEFAULT_CAPACITY: Final = 20_000


class SubscriptionLanes:
    """A bounded, subscription-fair queue of listed VMs; one event loop."""

    def __init__(
        self, *, capacity: int = DEFAULT_CAPACITY, limit: Callable[[str], int] | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be 1 or more")
        self._capacity = capacity
        self._limit = limit
        self._lanes: OrderedDict[str, deque[VmFacts]] = OrderedDict()
        self._busy: dict[str, int] = {}
        self._size = 0
        self._closed = False
        # One lock, two conditions: a VM for a worker, room for the producer (one wakes one, not all).
        lock = asyncio.Lock()
        self._vm_ready = asyncio.Condition(lock)
        self._room = asyncio.Condition(lock)

    def __len__(self) -> int:
        return self._size

    async def put(self, vm: VmFacts) -> None:
        """Add a listed VM; wait while ``capacity`` VMs are already waiting."""
        async with self._room:
            await self._room.wait_for(lambda: self._size < self._capacity)
            self._lanes.setdefault(vm.vm_id.subscription_id.lower(), deque()).append(vm)
            self._size += 1
            self._vm_ready.notify()

    async def close(self) -> None:
        """No more VMs will come: :meth:`get` gives None once the lanes are empty."""
        async with self._vm_ready:
            self._closed = True
            self._vm_ready.notify_all()

    async def get(self) -> VmFacts | None:
        """The next VM to work on (its subscription counts it as busy until :meth:`done`), or None
        when the listing is over and every lane is empty."""
        async with self._vm_ready:
            while True:
                vm = self._take()
                if vm is not None:
                    self._room.notify()
                    if self._size:
                        self._vm_ready.notify()  # pass it on: another VM may be ready for another worker
                    return vm
                if self._closed and self._size == 0:
                    self._vm_ready.notify()  # and the next worker learns it too
                    return None
                await self._vm_ready.wait()

    async def done(self, vm: VmFacts) -> None:
        """The worker finished ``vm``: its subscription has one more free place."""
        sub = vm.vm_id.subscription_id.lower()
        async with self._vm_ready:
            self._busy[sub] = max(0, self._busy.get(sub, 0) - 1)
            if self._size:
                self._vm_ready.notify()

    def _take(self) -> VmFacts | None:
        """Round-robin: the first lane, in turn, with a VM and a free place; it goes to the back."""
        for sub in list(self._lanes):
            lane = self._lanes[sub]
            limit = self._limit(sub) if self._limit is not None else None
            if limit is not None and self._busy.get(sub, 0) >= max(1, limit):
                continue
            vm = lane.popleft()
            self._size -= 1
            self._busy[sub] = self._busy.get(sub, 0) + 1
            del self._lanes[sub]
            if lane:
                self._lanes[sub] = lane  # to the back of the turn
            return vm
        return None
