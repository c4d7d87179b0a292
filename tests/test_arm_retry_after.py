"""ARM's ``Retry-After`` reaches the deferral: a 429's (or 503's) retry comes no sooner than the wait
ARM named (request-limits-and-throttling.md: a request sent before it has elapsed is not processed,
and a new wait is returned). The headers and their order are azure-core's ``get_retry_after``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from shared.azure.compute import ArmUnavailable, ComputeError, RunCommandBusy, Throttled, translate
from shared.model import OutcomeKind, VmId
from shared.settings import Mode, Settings
from shared.vm import VmFacts
from shared.workflow import Remediator

VM = "/subscriptions/5b0e8d2c-1f6a-4c39-9d7e-2a4b6c8d0e1f/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"


def answer(
    status: int, headers: dict[str, str] | None = None, code: str = "SubscriptionRequestsThrottled"
) -> Any:
    class Answer:
        status_code, reason, request = status, "", None

        def __init__(self) -> None:
            self.headers = headers or {}

        def text(self) -> str:
            return json.dumps({"error": {"code": code, "message": "message"}})

    return HttpResponseError(response=Answer())


def test_a_throttled_answer_carries_the_wait_arm_named() -> None:
    throttled = translate(answer(429, {"Retry-After": "17"}))
    assert isinstance(throttled, Throttled) and throttled.retry_after_s == 17
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    dated = translate(answer(429, {"retry-after": later}))
    assert dated.retry_after_s is not None and 110 < dated.retry_after_s <= 120
    assert translate(answer(429, {"retry-after-ms": "1500"})).retry_after_s == 1.5
    assert translate(answer(429, {"x-ms-retry-after-ms": "250"})).retry_after_s == 0.25
    # Retry-After first, as azure-core reads them
    assert translate(answer(429, {"Retry-After": "3", "retry-after-ms": "9000"})).retry_after_s == 3
    unavailable = translate(answer(503, {"Retry-After": "30"}, code="ServiceUnavailable"))
    assert isinstance(unavailable, ArmUnavailable) and unavailable.retry_after_s == 30
    assert translate(answer(429)).retry_after_s is None
    assert translate(answer(429, {"Retry-After": "soon"})).retry_after_s is None
    busy = translate(answer(409, {"Retry-After": "5"}, code="Conflict"))
    assert isinstance(busy, RunCommandBusy)


class Refusing:
    """A compute whose VM read is refused with ``error``."""

    def __init__(self, error: ComputeError) -> None:
        self.error = error

    async def get_vm(self, vm_id: VmId) -> VmFacts:
        raise self.error

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        raise AssertionError("no Run Command after a refused read")


@pytest.mark.parametrize("wait", [None, 90.0])
async def test_a_deferral_says_how_long_arm_asked_to_wait(wait: float | None) -> None:
    settings = Settings.from_env({}).with_mode(Mode.ENFORCE)
    refused = Throttled("throttled", code="SubscriptionRequestsThrottled", status=429, retry_after_s=wait)
    outcome = await Remediator(Refusing(refused), settings).check(VmId.parse(VM))
    assert (outcome.kind, outcome.reason) == (OutcomeKind.DEFERRED, "throttled")
    assert outcome.details.get("retryAfterS") == wait
