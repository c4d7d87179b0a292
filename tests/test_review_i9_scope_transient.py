"""Review of issue 9 (items 4 and 7 together): the scope check's own Resource Graph query is a
dependency too, and its throttling must be a deferral, not a failure the host retries into poison.

With ``MANAGEMENT_GROUP_ID`` every VM work item asks Resource Graph whether its subscription is in
the group (``Inventory.in_scope``) before any lease. Resource Graph throttles per user in short
windows (``x-ms-user-quota-remaining`` / ``x-ms-user-quota-resets-after``,
articles/governance/resource-graph/concepts/guidance-for-throttled-requests.md), so under load the
question is refused for a while. A refusal says nothing about the item: like a throttled computer
lookup (tests/test_function_app.py), it must be recorded as ``deferred: throttled`` and the item
re-enqueued with a delay of at least the wait named, never raised five times into
``failed: poison`` (the host's ``maxDequeueCount``, host.json).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from azure.functions.queue import QueueMessage

from simulator import Simulator
from tests.test_function_app import app_env, history, queue_client, sim, user, vm_id

__all__ = ["app_env", "sim"]


def _alert_item(name: str, correlation: str) -> bytes:
    return json.dumps({"reason": "alert", "vmId": vm_id(name), "correlationId": correlation}).encode()


async def test_a_throttled_management_group_scope_check_defers_the_item_instead_of_raising(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANAGEMENT_GROUP_ID", "mg-servers")
    sim.throttle_resource_graph(100, resets_after_s=0)  # every try (and the inventory's own 3) is refused
    # The host deletes the message only when the invocation succeeds: it must not raise.
    await user("vm_check")(QueueMessage(id="s1", body=_alert_item("web-01", "scope-1"), dequeue_count=1))
    rows = await history(app_env, vm_id("web-01"))
    assert [(r["outcome"], r["reason"]) for r in rows] == [("deferred", "throttled")]
    assert sim.run_log(vm_id("web-01")) == []  # nothing was done while scope was unknown
    sim.throttle_resource_graph(0)
    await asyncio.sleep(1.2)  # DEFER_DELAY_SECONDS=1
    async with queue_client(app_env) as queue:
        [retry] = [json.loads(m.content) async for m in queue.receive_messages(max_messages=5)]
    assert (retry["vmId"], retry["correlationId"], retry["attempt"]) == (vm_id("web-01"), "scope-1", 1)


async def test_a_long_retry_after_on_the_scope_check_is_a_delayed_retry_not_a_held_worker(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANAGEMENT_GROUP_ID", "mg-servers")
    sim.throttle_resource_graph(1, resets_after_s=600, retry_after_s=600)
    handler: Any = user("vm_check")
    await asyncio.wait_for(handler(QueueMessage(id="s2", body=_alert_item("web-01", "scope-2"))), timeout=15)
    [row] = await history(app_env, vm_id("web-01"))
    assert (row["outcome"], row["reason"]) == ("deferred", "throttled")
    assert 600 <= row["details"]["retryInS"] <= 6 * 3600
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []  # the retry waits what the service asked for
