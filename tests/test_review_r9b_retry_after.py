"""Review of issue 9 item 7 (r9b): ARM's ``Retry-After`` on the real SDK path, and hostile values of it.

The compute client's retry policy was azure-core's own, which sleeps whatever ``Retry-After`` says
inside the invocation (``AsyncRetryPolicy._sleep_for_retry``, no upper bound; azure-sdk-for-python
sdk/core/azure-core/azure/core/pipeline/policies/_retry_async.py). A VM read answered 429 with
``Retry-After: 3600`` therefore sat in ``asyncio.sleep`` until ``ARM_CALL_TIMEOUT_SECONDS`` cut it:
``deferred: arm-timeout``, with no ``retryAfterS``, so the retry came back after the usual
``DEFER_DELAY_SECONDS × 2^attempt``, long before the hour ARM named (request-limits-and-throttling.md:
a request sent sooner is refused again). The wait reached the deferral only in tests that raised
``Throttled`` by hand. A ``Retry-After`` azure-core cannot parse (``soon``) made its sleep raise
``ValueError`` (``parse_retry_after``), which no adapter catches: the invocation crashed, and the
item went to poison after ``maxDequeueCount``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from azure.core.pipeline.transport import AioHttpTransport
from multidict import CIMultiDict, CIMultiDictProxy

from shared import triggers
from shared.azure.transient import wait_from_headers
from simulator import Simulator
from tests.test_function_app import app_env, sim, vm_id

__all__ = ["app_env", "sim"]


@pytest.fixture
def throttle_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """VM reads (``GET …/virtualMachines/<name>``) reach the simulator and come back as ARM's 429 with
    ``state['retry_after']`` (None: no header), while ``state['left']`` > 0."""
    state: dict[str, Any] = {"retry_after": "3600", "left": 10**6, "sent": 0}
    real = AioHttpTransport.send

    def is_read(request: Any) -> bool:
        path = str(request.url).split("?")[0]
        return request.method == "GET" and re.search(r"/virtualMachines/[^/]+$", path, re.I) is not None

    async def send(transport: AioHttpTransport, request: Any, **kwargs: Any) -> Any:
        response = await real(transport, request, **kwargs)
        if is_read(request) and state["left"] > 0:
            state["left"] -= 1
            state["sent"] += 1
            headers = CIMultiDict(response.headers)
            if state["retry_after"] is not None:
                headers["Retry-After"] = state["retry_after"]
            response.status_code = 429
            response.headers = CIMultiDictProxy(headers)
        return response

    monkeypatch.setattr(AioHttpTransport, "send", send)
    return state


def _item(name: str, correlation: str) -> str:
    return json.dumps({"reason": "alert", "vmId": vm_id(name), "correlationId": correlation})


async def _work(name: str, correlation: str) -> tuple[Any, float]:
    start = time.monotonic()
    [outcome] = await triggers.work(_item(name, correlation))
    return outcome, time.monotonic() - start


async def test_a_long_retry_after_on_a_vm_read_defers_the_item_that_long_without_sleeping(
    app_env: dict[str, str], sim: Simulator, throttle_reads: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARM_CALL_TIMEOUT_SECONDS", "4")
    outcome, took = await _work("web-01", "ra-3600")
    assert (outcome.kind.value, outcome.reason) == ("deferred", "throttled"), outcome
    assert outcome.details["retryAfterS"] == 3600.0
    assert outcome.details["retryInS"] >= 3600.0  # the queue waits, not the invocation
    assert took < 3.5 and throttle_reads["sent"] == 1  # handed back at once, never slept


@pytest.mark.parametrize("value", ["1e9", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_huge_retry_after_is_a_deferral_of_at_most_the_longest_delay(
    value: str,
    app_env: dict[str, str],
    sim: Simulator,
    throttle_reads: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.worker import MAX_DEFER_DELAY_S

    monkeypatch.setenv("ARM_CALL_TIMEOUT_SECONDS", "4")
    throttle_reads["retry_after"] = value
    outcome, took = await _work("web-01", f"ra-{value[:3]}")
    assert (outcome.kind.value, outcome.reason) == ("deferred", "throttled"), outcome
    assert took < 3.5 and throttle_reads["sent"] == 1
    assert outcome.details["retryAfterS"] > MAX_DEFER_DELAY_S
    assert outcome.details["retryInS"] == MAX_DEFER_DELAY_S  # the longest delay, then looked at again


@pytest.mark.parametrize(("value", "slept"), [("0", False), ("-5", False), ("1", True)])
async def test_a_short_zero_or_negative_retry_after_is_still_retried_by_the_sdk(
    value: str,
    slept: bool,
    app_env: dict[str, str],
    sim: Simulator,
    throttle_reads: dict[str, Any],
) -> None:
    throttle_reads.update(retry_after=value, left=1)  # one 429, then the simulator's answer
    outcome, took = await _work("web-01", f"ra-short-{value}")
    assert outcome.kind.value in ("remediated", "healthy"), outcome
    assert throttle_reads["sent"] == 1
    if slept:
        assert took >= 1.0  # a short wait is honoured in the invocation


@pytest.mark.parametrize("value", ["soon", "Mon, 99 Foo 2020 25:61:61 GMT", "inf", "nan"])
async def test_a_retry_after_nobody_can_read_is_not_a_crash(
    value: str,
    app_env: dict[str, str],
    sim: Simulator,
    throttle_reads: dict[str, Any],
) -> None:
    throttle_reads.update(retry_after=value, left=1)
    outcome, _ = await _work("web-01", "ra-garbled")
    # azure-core's parse_retry_after raised ValueError out of the pipeline ("inf": it slept for
    # ever, until the deadline); now the answer is a throttled one that names no wait: retried by
    # the SDK after its backoff, and the workflow runs
    assert outcome.kind.value in ("remediated", "healthy"), outcome


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_a_non_finite_retry_after_names_no_wait(value: str) -> None:
    assert wait_from_headers({"Retry-After": value}) is None


# --- a retry never comes back sooner than the delay the worker counted ---------------------------


class _Client:
    """A queue client that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.timeouts: list[int | None] = []

    async def send_message(self, body: str, *, visibility_timeout: int | None = None) -> None:
        self.timeouts.append(visibility_timeout)


@pytest.mark.parametrize(
    ("delay_s", "visible_after"),
    [(0.0, None), (0.25, 1), (1.0, 1), (4.5, 5), (17.0001, 18), (3600.0, 3600), (1e12, 7 * 24 * 3600)],
)
async def test_a_delayed_message_stays_invisible_at_least_its_delay(
    delay_s: float, visible_after: int | None
) -> None:
    """The deadline counts the delays scheduled (``deferredS``) on the ground that a message put with
    a visibility timeout stays invisible until it expires (Put Message, whole seconds). The queue
    truncated the delay: a 4.5 s retry (the chaos run's 1/16 cap) came back after 4 s, one counted 0.5
    s at once, and a ``Retry-After: 17.4`` was answered 17 s later, sooner than ARM asked."""
    from shared.model import Trigger, VmId, WorkItem
    from shared.workqueue import WorkQueue

    client = _Client()
    item = WorkItem(reason=Trigger.ALERT, vm_id=VmId.parse(vm_id("web-01")), correlation_id="delay")
    await WorkQueue(client).send(item, delay_s=delay_s)  # type: ignore[arg-type]
    assert client.timeouts == [visible_after]
