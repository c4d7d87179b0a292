"""Review r12c: the simulator's ARM budgets per subscription (request-limits-and-throttling.md, 2025:
"The subscription limits apply per subscription, per service principal, and per operation type",
token buckets of 250 reads refilled at 25/s and 200 writes or deletes at 10/s, per region).

A burst from 20 subscriptions through one region's front end spends 20 buckets, not one; each is
refused only beyond its own 250, with a Retry-After of one token's refill.
"""

from __future__ import annotations

import pytest

from simulator.throttle import Throttle, ThrottleSettings

SUBS = [f"{i:08x}-abcd-4000-8000-000000000000" for i in range(20)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_from_twenty_subscriptions_spends_twenty_buckets() -> None:
    clock = Clock()
    throttle = Throttle(ThrottleSettings(time_scale=1.0), clock=clock)
    for _ in range(250):
        for sub in SUBS:
            verdict = throttle.arm(sub.upper() if sub == SUBS[3] else sub, "GET")
            assert verdict is not None and verdict.allowed
    assert throttle.stats()["armThrottled"] == 0
    refused = [throttle.arm(sub, "GET") for sub in SUBS]
    assert all(v is not None and not v.allowed for v in refused)
    assert all(v is not None and v.retry_after_s == pytest.approx(1 / 25) for v in refused)
    # Writes and deletes are buckets of their own, and the refill is per bucket.
    assert all((v := throttle.arm(sub, "POST")) is not None and v.allowed for sub in SUBS)
    assert all((v := throttle.arm(sub, "DELETE")) is not None and v.allowed for sub in SUBS)
    clock.now += 1.0
    allowed = sum(1 for _ in range(30) if (v := throttle.arm(SUBS[0], "GET")) is not None and v.allowed)
    assert allowed == 25
    other = throttle.arm(SUBS[1], "GET")
    assert other is not None and other.allowed  # SUBS[1] refilled on its own


def test_the_remaining_header_counts_down_the_whole_tokens_left() -> None:
    throttle = Throttle(ThrottleSettings(time_scale=1.0), clock=Clock())
    verdicts = [throttle.arm(SUBS[0], "PUT") for _ in range(201)]
    assert [v.remaining for v in verdicts[:3] if v] == [199, 198, 197]
    last = verdicts[-1]
    assert last is not None and not last.allowed and last.remaining == 0
    assert last.header == "x-ms-ratelimit-remaining-subscription-writes"
    assert last.retry_after_s == pytest.approx(1 / 10)
