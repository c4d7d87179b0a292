"""Spend ARM's request budget well: pace each subscription from the remaining-budget headers.

ARM gives every subscription, per region and per principal, a budget of reads, writes and deletes
(request-limits-and-throttling.md: in the public cloud token buckets of 250 reads refilled at 25/s
and 200 writes and deletes at 10/s; in the sovereign clouds 12,000 reads, 1,200 writes and 15,000
deletes an hour) and says on every answer how much is left
(``x-ms-ratelimit-remaining-subscription-reads``/``-writes``/``-deletes``). An empty budget is a 429
with ``Retry-After``: time lost, a retry, and for a sweep a VM that may end ``deferred: throttled``.

:class:`PacingPolicy` is an azure-core pipeline policy (one per client, per retry, so every attempt
is paced and seen) over a :class:`Pacer` shared by every client of the engine. Before a request it
estimates what is left of the budget of the request's subscription and kind — the last header,
less the requests sent and not yet answered, plus the documented refill since — and waits while
that is below a small reserve, one waiter at a time, so a steady run spends the refill and gets no
429. After a 429 it holds every request of that subscription and kind until ``Retry-After`` has
passed, halves the refill rate it assumes (the service refills slower than documented: another
client shares the budget, or a stricter limit applies) and halves the number of VMs the sweep
works on at once in that subscription (:meth:`Pacer.concurrency`); both grow back with every
answer that is not a 429 (additive increase, multiplicative decrease).

A 429 while ARM's budget of that kind is not low is the resource provider's own throttle: Compute
has per-minute policies per operation group ("Troubleshooting API throttling errors",
MicrosoftDocs/SupportArticles-docs
``support/azure/virtual-machines/windows/troubleshooting-throttling-errors.md``:
"If the remaining call count is approaching 0, the subscription's general call limit defined by
Azure Resource Manager has been reached … Otherwise, the throttling is coming from the target
resource provider"), which the subscription headers do not show. Then, besides waiting for its
``Retry-After``, the pacer spaces the requests of that subscription and kind: one at least every
``Retry-After`` of the first such 429 (the time the provider named for its next call; at most a
second), doubled by each later burst of them, so that the retries do not all arrive at once on the
policy's bucket again; each answer that is not a 429 shortens the spacing by a tenth, and below a
millisecond it is lifted.

A wait longer than ``max_wait_s`` (a Retry-After of minutes: Compute's sample is 1,200 s) is not
slept: the request is refused at once with ``hold_error`` (the gateway's ``throttled`` deferral,
carrying what is left of the wait), as the retry policy hands back the 429 that named it, instead
of holding a worker until the call's deadline. A remaining-budget header that is not a finite
number is ignored, and a negative one counts as 0.

Requests that name no subscription (Resource Graph, ``GET /subscriptions``) are not paced here:
Resource Graph has its own quota, which the inventory paces (shared/azure/inventory.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy

from shared.azure.transient import wait_from_headers

KINDS: Final = ("reads", "writes", "deletes")
# The refill per second each cloud documents (request-limits-and-throttling.md): the token buckets
# of the public cloud, and the hourly limits of the sovereign clouds spread over the hour.
PUBLIC_REFILL: Final[Mapping[str, float]] = {"reads": 25.0, "writes": 10.0, "deletes": 10.0}
HOURLY_REFILL: Final[Mapping[str, float]] = {
    "reads": 12_000 / 3600,
    "writes": 1_200 / 3600,
    "deletes": 15_000 / 3600,
}
CLOUD_REFILL: Final[Mapping[str, Mapping[str, float]]] = {
    "AzureCloud": PUBLIC_REFILL,
    "AzureUSGovernment": HOURLY_REFILL,
    "AzureChinaCloud": HOURLY_REFILL,
}
# Tokens left untouched for other clients of the same principal and for answers still on the way.
DEFAULT_RESERVE: Final = 3.0
# A 429 halves the assumed refill, never below this share of the documented one.
MIN_RATE_SHARE: Final = 0.05
# One 429 burst (several requests refused at once) halves a subscription's concurrency once.
DECREASE_COOLDOWN_S: Final = 1.0
# After a provider's 429: each answer that is not a 429 shortens the spacing by this factor, and a
# spacing under MIN_GAP_S is lifted.
GAP_SHRINK: Final = 0.9
MIN_GAP_S: Final = 0.001
# The spacing is at most this: a Retry-After of minutes (a thirty-minute policy's, 1,200 s in the
# page's example) holds the requests that long already, and then one a second is slow enough.
MAX_GAP_S: Final = 1.0
_SUBSCRIPTION = re.compile(r"/subscriptions/([0-9A-Fa-f-]{36})(?:/|$)")


def operation_kind(method: str) -> str:
    """ARM's kind of a request: GET and HEAD read, DELETE deletes, anything else writes."""
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "reads"
    return "deletes" if method == "DELETE" else "writes"


def subscription_of(url: str) -> str | None:
    """The subscription a request URL names (lower case), or None for a tenant-level request."""
    match = _SUBSCRIPTION.search(url.split("?", 1)[0])
    return match.group(1).lower() if match else None


@dataclass
class _Budget:
    """What the engine knows of one subscription's budget of one kind."""

    rate: float  # the refill per second assumed now
    documented: float  # the documented refill per second
    remaining: float | None = None  # the last header's value (None before any)
    at: float = 0.0  # when that header arrived
    inflight: int = 0  # requests sent and not answered yet
    blocked_until: float = 0.0  # a 429's Retry-After: nothing before then
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # After the resource provider's own 429: the least time between two requests (None: none), when
    # the next may go, and until when a further 429 belongs to the same burst (no doubling then).
    gap: float | None = None
    next_at: float = 0.0
    gap_burst_until: float = 0.0

    def wait(self, now: float, reserve: float) -> float:
        """Seconds to wait before the next request may go."""
        if now < self.blocked_until - 1e-6:
            return self.blocked_until - now
        if self.gap is not None and now < self.next_at - 1e-6:
            return self.next_at - now
        if self.remaining is None:
            return 0.0
        # What would be left once this request took its token.
        estimate = self.remaining - self.inflight - 1 + self.rate * (now - self.at)
        if estimate >= reserve - 1e-6:  # a sleep of exactly the wait may end a rounding error short
            return 0.0
        return (reserve - estimate) / self.rate


class BudgetHeld(Exception):
    """A request not sent: its subscription and kind are held longer than the pacer sleeps."""

    def __init__(self, subscription: str, kind: str, wait_s: float) -> None:
        super().__init__(f"{kind} of subscription {subscription} held for {wait_s:.1f} s")
        self.subscription, self.kind, self.wait_s = subscription, kind, wait_s


@dataclass
class _Concurrency:
    """How many VMs the sweep may work on at once in one subscription (AIMD)."""

    limit: float
    decreased_at: float = -1e9


class Pacer:
    """The budgets of every subscription the engine talks to; one per engine, in one event loop."""

    def __init__(
        self,
        *,
        cloud: str = "AzureCloud",
        concurrency: int = 16,
        reserve: float = DEFAULT_RESERVE,
        refill: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        max_wait_s: float | None = None,
        hold_error: Callable[[str, str, float], BaseException] | None = None,
    ) -> None:
        """``max_wait_s``: the longest wait slept before a request (None: any); a longer one raises
        ``hold_error(subscription, kind, wait)`` (default :class:`BudgetHeld`) without sending."""
        if concurrency < 1:
            raise ValueError("concurrency must be 1 or more")
        self._refill = dict(refill or CLOUD_REFILL.get(cloud, PUBLIC_REFILL))
        self._max = float(concurrency)
        self._reserve = reserve
        self._clock = clock
        self._sleep = sleep
        self._max_wait_s = max_wait_s
        self._hold_error = hold_error
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._concurrency: dict[str, _Concurrency] = {}
        self.throttled: Counter[str] = Counter()  # 429s received, per subscription
        self.requests: Counter[str] = Counter()  # requests sent, per subscription
        self.sent: Counter[tuple[str, str]] = Counter()  # requests sent, per (subscription, kind)
        self.refused: Counter[tuple[str, str]] = Counter()  # 429s, per (subscription, kind)
        self.waited_s = 0.0  # time requests spent waiting for the budget, summed
        # Provider-side throttle bursts (a 429 while ARM's budget was not low), per subscription.
        self.provider_throttled: Counter[str] = Counter()
        self.held: Counter[str] = Counter()  # requests refused for a wait beyond max_wait_s

    def policy(self) -> PacingPolicy:
        return PacingPolicy(self)

    def _budget(self, subscription: str, kind: str) -> _Budget:
        key = (subscription, kind)
        budget = self._budgets.get(key)
        if budget is None:
            rate = self._refill.get(kind, PUBLIC_REFILL["writes"])
            budget = self._budgets[key] = _Budget(rate=rate, documented=rate)
        return budget

    async def before(self, subscription: str, kind: str) -> None:
        """Wait until the budget can take one more request, then count it as sent."""
        budget = self._budget(subscription, kind)
        if budget.wait(self._clock(), self._reserve) > 0:
            async with budget.lock:  # one waiter paces at a time: each sees the one before it
                while (wait := budget.wait(self._clock(), self._reserve)) > 0:
                    if self._max_wait_s is not None and wait > self._max_wait_s:
                        self.held[subscription] += 1
                        if self._hold_error is not None:
                            raise self._hold_error(subscription, kind, wait)
                        raise BudgetHeld(subscription, kind, wait)
                    self.waited_s += wait
                    await self._sleep(wait)
        self.requests[subscription] += 1
        self.sent[(subscription, kind)] += 1
        budget.inflight += 1
        if budget.gap is not None:
            budget.next_at = self._clock() + budget.gap

    def after(self, subscription: str, kind: str, status: int | None, headers: Mapping[str, str]) -> None:
        """Learn from an answer: the remaining budget, and a 429's Retry-After."""
        budget = self._budget(subscription, kind)
        budget.inflight = max(0, budget.inflight - 1)
        now = self._clock()
        value = _header(headers, f"x-ms-ratelimit-remaining-subscription-{kind}")
        arm_left: float | None = None
        if value is not None:
            with contextlib.suppress(ValueError):
                number = float(value)
                if math.isfinite(number):  # "nan" and "inf" parse, and are no budget
                    arm_left = max(0.0, number)
                    budget.remaining, budget.at = arm_left, now
        concurrency = self._concurrency.setdefault(subscription, _Concurrency(self._max))
        if status == 429:
            self.throttled[subscription] += 1
            self.refused[(subscription, kind)] += 1
            wait = wait_from_headers(headers)
            budget.blocked_until = max(budget.blocked_until, now + (1.0 if wait is None else wait))
            budget.rate = max(budget.documented * MIN_RATE_SHARE, budget.rate / 2)
            if now - concurrency.decreased_at >= DECREASE_COOLDOWN_S:
                concurrency.limit = max(1.0, concurrency.limit / 2)
                concurrency.decreased_at = now
            if arm_left is not None and arm_left > self._reserve and now >= budget.gap_burst_until:
                # ARM's budget is not what refused it: the provider's own policy did.
                named = 1.0 if wait is None else max(wait, MIN_GAP_S)
                spaced = named if budget.gap is None else max(named, 2 * budget.gap)
                budget.gap = min(MAX_GAP_S, spaced)
                budget.next_at = budget.blocked_until
                budget.gap_burst_until = budget.blocked_until
                self.provider_throttled[subscription] += 1
            return
        budget.rate = min(budget.documented, budget.rate + budget.documented / 100)
        concurrency.limit = min(self._max, concurrency.limit + 1 / concurrency.limit)
        if budget.gap is not None:
            budget.gap *= GAP_SHRINK
            if budget.gap < MIN_GAP_S:
                budget.gap = None

    def abandon(self, subscription: str, kind: str) -> None:
        """A request that got no answer (connection error, cancellation) is no longer in flight."""
        budget = self._budget(subscription, kind)
        budget.inflight = max(0, budget.inflight - 1)

    def concurrency(self, subscription: str) -> int:
        """How many VMs of the subscription may be worked on at once now (the sweep's lanes ask)."""
        state = self._concurrency.get(subscription.lower())
        return int(self._max if state is None else max(1.0, state.limit))

    def spacing(self, subscription: str, kind: str) -> float | None:
        """The least seconds between two requests of the subscription and kind after a provider's
        429 (None: not spaced)."""
        budget = self._budgets.get((subscription.lower(), kind))
        return None if budget is None else budget.gap

    def remaining(self, subscription: str, kind: str) -> float | None:
        """The last remaining budget ARM reported for the subscription and kind (None: none yet)."""
        budget = self._budgets.get((subscription.lower(), kind))
        return None if budget is None else budget.remaining


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        low = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == low), None)
    return value


class PacingPolicy(AsyncHTTPPolicy[Any, Any]):
    """Paces every attempt of a request that names a subscription (per-retry policy of a client)."""

    def __init__(self, pacer: Pacer) -> None:
        super().__init__()
        self._pacer = pacer

    async def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
        http = request.http_request
        subscription = subscription_of(str(http.url))
        if subscription is None:
            return await self.next.send(request)
        kind = operation_kind(http.method)
        await self._pacer.before(subscription, kind)
        try:
            response = await self.next.send(request)
        except BaseException:
            self._pacer.abandon(subscription, kind)
            raise
        answer = response.http_response
        self._pacer.after(subscription, kind, answer.status_code, answer.headers)
        return response
