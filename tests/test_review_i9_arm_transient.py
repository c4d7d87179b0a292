"""Review of issue 9 (item 7): an ARM answer lost on the way back is transient, not a crash.

azure-core's aiohttp transport raises ``ServiceResponseError`` (``ServiceResponseTimeoutError`` for
a read timeout, 300 s by default) when the request went out and no complete answer came back, and
``ServiceRequestError`` only when the request never left (azure/core/pipeline/transport/_aiohttp.py).
azure-core retries a GET after either, but not a POST (``RetryPolicy._is_method_retryable``): the
POST may have been acted on. The compute adapter turned only ``ServiceRequestError`` and HTTP
errors into typed errors, so a Run Command POST whose answer was lost, or a VM read still failing
so after azure-core's retries, escaped the workflow: the invocation raised, the host retried it five
times (``maxDequeueCount``) and the item ended ``failed: poison``. A lost answer says nothing about
the VM: ``deferred: arm-unavailable``, and the next attempt detects first.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import AioHttpTransport

from shared import triggers
from shared.azure import compute
from simulator import Simulator
from tests.test_function_app import app_env, history, sim, vm_id

__all__ = ["app_env", "sim"]


def _alert(name: str) -> str:
    return json.dumps({"reason": "alert", "vmId": vm_id(name), "correlationId": "lost-1"})


@pytest.fixture
def lose_answers(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Requests matching ``state['match']`` reach the simulator; their answers are lost."""
    state: dict[str, Any] = {"match": lambda method, url: False, "lost": 0}
    real = AioHttpTransport.send

    async def send(transport: AioHttpTransport, request: Any, **kwargs: Any) -> Any:
        response = await real(transport, request, **kwargs)
        if state["match"](request.method, str(request.url)):
            state["lost"] += 1
            raise ServiceResponseError("connection reset before the answer was read")
        return response

    monkeypatch.setattr(AioHttpTransport, "send", send)
    return state


async def test_a_run_command_post_whose_answer_is_lost_is_deferred_and_recorded(
    app_env: dict[str, str], sim: Simulator, lose_answers: dict[str, Any]
) -> None:
    lose_answers["match"] = lambda method, url: method == "POST" and "/runCommand" in url
    outcomes = await triggers.work(_alert("web-01"))  # raised ServiceResponseError
    assert [(o.kind.value, o.reason) for o in outcomes] == [("deferred", "arm-unavailable")]
    assert lose_answers["lost"] == 1  # a POST is never sent again by the SDK
    rows = await history(app_env, vm_id("web-01"))
    # The first POST is a conditional re-key (issue 12): it may change the VM, so its intent is
    # written before it and stays pending (the next delivery detects first).
    assert sorted((r["outcome"], r["reason"]) for r in rows) == [
        ("deferred", "arm-unavailable"),
        ("intent", "remediate:avma-channel"),
    ]


async def test_a_vm_read_whose_answers_keep_being_lost_is_deferred_and_recorded(
    app_env: dict[str, str], sim: Simulator, lose_answers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = functools.partial(compute.RunCommandRetryPolicy, retry_backoff_factor=0.01)
    monkeypatch.setattr(compute, "RunCommandRetryPolicy", fast)  # azure-core's retries, without their waits
    name = "/virtualMachines/web-01"
    lose_answers["match"] = lambda method, url: method == "GET" and name in url and "runCommand" not in url
    outcomes = await triggers.work(_alert("web-01"))  # raised ServiceResponseError after the SDK's retries
    assert [(o.kind.value, o.reason) for o in outcomes] == [("deferred", "arm-unavailable")]
    assert lose_answers["lost"] >= 2  # azure-core retried the GET before giving up
    assert sim.run_log(vm_id("web-01")) == []
