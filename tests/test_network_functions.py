"""The Functions path carries the KMS path diagnosis (issue 11, item 8): the queue worker's history
row, its outcome log record and ``/api/status``, against the simulator's network and Azurite."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import azure.functions as func
import pytest

from simulator import Estate, Simulator
from tests.network_estate import RT_HUB, network_estate, vm_id
from tests.test_function_app import app_env, drain, event_grid_event, history, user

__all__ = ["app_env"]  # the app's settings over this module's simulator (its own ``sim``)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict(network_estate()), latency_s=0.02) as running:
        yield running


async def test_the_worker_records_the_cause_and_the_resource_at_fault(
    app_env: dict[str, str], sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    await user("vm_write_event")(event_grid_event(vm_id("vm-nva")))
    with caplog.at_level(logging.INFO, logger="avma_remediator.outcomes"):
        assert len(await drain(app_env)) == 1
    rows = await history(app_env, vm_id("vm-nva"))
    outcome = rows[0]
    assert (outcome["outcome"], outcome["reason"]) == ("failed", "activation-error:0xC004F074")
    details = outcome["details"]
    assert details["kmsCause"] == "azure"
    (finding,) = details["kmsPath"]["findings"]
    assert (finding["cause"], finding["resource"]) == ("route-to-appliance", RT_HUB)
    assert "rt-hub" in outcome["hint"] and "--next-hop-type Internet" in outcome["hint"]
    # the outcome log record (Application Insights' customDimensions) says the same
    (record,) = [
        json.loads(r.getMessage().split(" ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("avma-outcome ")
    ]
    assert record["kmsCause"] == "azure" and record["kmsFindings"] == [
        {"cause": "route-to-appliance", "resource": RT_HUB}
    ]
    # /api/status lists the action with its details
    response = await user("status")(
        func.HttpRequest(method="GET", url="/api/status", body=b"", params={"recent": "5"})
    )
    recent = json.loads(response.get_body())["recent"]
    assert any(r["details"].get("kmsPath", {}).get("state") == "blocked" for r in recent)
