"""The simulator's ARM budgets and Resource Graph quota, as Microsoft documents them (simulator/throttle.py).

ARM: a token bucket per subscription, region and kind (reads, writes, deletes) in the public cloud,
hourly limits in the sovereign clouds, the remaining budget on every answer, 429 with Retry-After
when it is empty. Resource Graph: a quota window per user, its two headers on every answer.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from shared.cli import main
from simulator import Estate, EstateError, Simulator
from simulator.throttle import ThrottleSettings, hms
from tests.estates import windows_vm

SUB_A = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
SUB_B = "9a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"
SUB_C = "0c1d2e3f-4a5b-4c6d-9e7f-8a9b0c1d2e3f"
API = "api-version=2025-04-01"
GRAPH = "/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
VMS_QUERY = "Resources | where type =~ 'microsoft.compute/virtualmachines' | project id | order by id asc"


def _vm(sub: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/rg-{name}/providers/Microsoft.Compute/virtualMachines/{name}"


def estate(throttling: dict[str, Any] | None = None, *, cloud: str = "AzureCloud", **extra: Any) -> Estate:
    data: dict[str, Any] = {
        "cloud": cloud,
        "vms": [windows_vm(_vm(SUB_A, "a1")), windows_vm(_vm(SUB_B, "b1")), windows_vm(_vm(SUB_C, "c1"))],
        **extra,
    }
    if throttling is not None:
        data["throttling"] = throttling
    return Estate.from_dict(data)


class Http:
    """Plain HTTPS calls to the simulator: (status, headers with lower-case names, JSON body)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.tls = ssl.create_default_context(cafile=sim.ca_bundle)
        self.token = sim.issue_token()

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        url = f"{self.sim.arm_endpoint}{path}"
        if "api-version" not in path:
            url += f"{'&' if '?' in path else '?'}{API}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.tls) as response:
                raw = response.read()
                status, headers = response.status, response.headers
        except urllib.error.HTTPError as error:
            raw, status, headers = error.read(), error.code, error.headers
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw) if raw else None

    def graph(self, **scope: Any) -> tuple[int, dict[str, str], Any]:
        return self("POST", GRAPH, {"query": VMS_QUERY, **scope})


READS = "x-ms-ratelimit-remaining-subscription-reads"
WRITES = "x-ms-ratelimit-remaining-subscription-writes"
DELETES = "x-ms-ratelimit-remaining-subscription-deletes"


def test_public_cloud_default_is_arms_token_buckets_with_the_remaining_budget_on_every_answer(
    sim_factory: Callable[..., Simulator],
) -> None:
    # ARM's sizes, refilled a thousand times slower than ARM's, so that every token shows.
    sim = sim_factory(estate({"timeScale": 0.001}), latency_s=0.05)
    http = Http(sim)
    status, headers, _ = http("GET", _vm(SUB_A, "a1"))
    assert status == 200 and headers[READS] == "249"  # 250 tokens, one taken
    status, headers, _ = http("GET", _vm(SUB_A, "missing"))
    assert status == 404 and headers[READS] == "248"  # an answer of the resource provider counts too
    status, headers, _ = http("POST", _vm(SUB_A, "a1") + "/runCommand", {"commandId": "RunPowerShellScript"})
    assert status == 202 and headers[WRITES] == "199" and READS not in headers
    status, headers, _ = http("DELETE", _vm(SUB_A, "a1"))
    assert status == 405 and headers[DELETES] == "199"  # ARM counts the delete before routing it
    assert http("GET", _vm(SUB_B, "b1"))[1][READS] == "249"  # each subscription has its own buckets
    stats = sim.throttling()
    assert (stats["model"], stats["timeScale"], stats["region"]) == ("tokenBucket", 0.001, "westeurope")
    assert stats["arm"][SUB_A.lower()] == {
        "reads": {"requests": 2, "throttled": 0},
        "writes": {"requests": 1, "throttled": 0},
        "deletes": {"requests": 1, "throttled": 0},
    }


def test_the_default_time_scale_weighs_the_budget_against_compressed_run_commands(
    sim_factory: Callable[..., Simulator],
) -> None:
    """``auto``: 20 s of Azure Run Command per simulated ``latency_s``, so 0.05 s gives 400 times
    ARM's refill: what the tests and the demo do never finds a bucket empty."""
    sim = sim_factory(estate(), latency_s=0.05)
    http = Http(sim)
    assert sim.throttling()["timeScale"] == 400.0
    assert [http("GET", _vm(SUB_A, "a1"))[1][READS] for _ in range(5)] == ["249"] * 5


def test_an_empty_bucket_is_429_with_retry_after_until_a_token_is_back(
    sim_factory: Callable[..., Simulator],
) -> None:
    sim = sim_factory(estate({"timeScale": 1, "reads": {"size": 3, "perSecond": 2}}), latency_s=0.01)
    http = Http(sim)
    assert [http("GET", _vm(SUB_A, "a1"))[1][READS] for _ in range(3)] == ["2", "1", "0"]
    status, headers, body = http("GET", _vm(SUB_A, "a1"))
    assert status == 429 and body["error"]["code"] == "SubscriptionRequestsThrottled"
    assert f"Number of 'read' requests for subscription '{SUB_A}'" in body["error"]["message"]
    assert 0 < float(headers["retry-after"]) <= 0.51 and headers[READS] == "0"
    assert http("GET", _vm(SUB_B, "b1"))[0] == 200  # another subscription is not throttled
    assert http("POST", _vm(SUB_A, "a1") + "/runCommand", {"commandId": "RunPowerShellScript"})[0] == 202
    time.sleep(float(headers["retry-after"]) + 0.05)
    assert http("GET", _vm(SUB_A, "a1"))[0] == 200  # the bucket refilled
    stats = sim.throttling()
    assert stats["arm"][SUB_A.lower()]["reads"] == {"requests": 5, "throttled": 1}
    assert stats["armThrottled"] == 1
    assert sim.faults()["armThrottling"] == 0  # the documented model is not a fault


@pytest.mark.parametrize("cloud", ["AzureUSGovernment", "AzureChinaCloud"])
def test_sovereign_clouds_keep_the_hourly_limits(sim_factory: Callable[..., Simulator], cloud: str) -> None:
    sim = sim_factory(estate(cloud=cloud), latency_s=0.05)
    http = Http(sim)
    assert http("GET", _vm(SUB_A, "a1"))[1][READS] == "11999"
    post = http("POST", _vm(SUB_A, "a1") + "/runCommand", {"commandId": "RunPowerShellScript"})
    assert post[1][WRITES] == "1199"
    assert http("DELETE", _vm(SUB_A, "a1"))[1][DELETES] == "14999"
    assert sim.throttling()["model"] == "hourly"


def test_an_hourly_limit_refuses_until_the_hour_is_over(sim_factory: Callable[..., Simulator]) -> None:
    # Two writes an hour, an hour compressed to one second.
    sim = sim_factory(
        estate({"model": "hourly", "timeScale": 3600, "writes": {"perHour": 2}}), latency_s=0.01
    )
    http = Http(sim)
    post = {"commandId": "RunPowerShellScript"}
    assert [http("POST", _vm(SUB_A, "a1") + "/runCommand", post)[1][WRITES] for _ in range(2)] == ["1", "0"]
    status, headers, body = http("POST", _vm(SUB_A, "a1") + "/runCommand", post)
    assert status == 429 and "Number of 'write' requests" in body["error"]["message"]
    wait = float(headers["retry-after"])
    assert 0 < wait <= 1.01
    time.sleep(wait + 0.05)
    status, headers, _ = http("POST", _vm(SUB_B, "b1") + "/runCommand", post)
    assert status == 202 and headers[WRITES] == "1"  # another subscription, its own hour
    assert http("POST", _vm(SUB_A, "a1") + "/runCommand", post)[1][WRITES] == "1"  # a new hour


def test_resource_graph_has_a_quota_window_per_user_with_its_headers_on_every_answer(
    sim_factory: Callable[..., Simulator],
) -> None:
    sim = sim_factory(estate({"timeScale": 1, "resourceGraph": {"queries": 3, "windowSeconds": 1}}))
    http = Http(sim)
    answers = [http.graph() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1]["x-ms-user-quota-remaining"] for a in answers] == ["2", "1", "0"]
    assert all(a[1]["x-ms-user-quota-resets-after"] == "00:00:01" for a in answers)
    status, headers, body = http.graph()
    assert status == 429 and body["error"]["details"][0]["code"] == "RateLimiting"
    assert headers["x-ms-user-quota-remaining"] == "0" and "retry-after" not in headers
    time.sleep(1.05)
    assert http.graph()[1]["x-ms-user-quota-remaining"] == "2"  # a new window
    assert sim.throttling()["graph"] == {"requests": 5, "throttled": 1}
    # ARM's buckets are not Resource Graph's: the subscriptions' budgets are untouched.
    assert sim.throttling()["arm"] == {}


def test_throttling_off_sends_no_budget_headers(sim_factory: Callable[..., Simulator]) -> None:
    sim = sim_factory(estate({"model": "off", "resourceGraph": "off"}))
    http = Http(sim)
    headers = http("GET", _vm(SUB_A, "a1"))[1]
    assert not any(name.startswith("x-ms-ratelimit") for name in headers)
    assert "x-ms-user-quota-remaining" not in http.graph()[1]


def test_arm_refuses_before_computes_policies_and_its_header_is_its_own_budget(
    sim_factory: Callable[..., Simulator],
) -> None:
    """The armThrottling fault is Compute's own policies (simulator/faults.py): ARM's budget applies
    first (a request it refuses never reaches Compute, and is no fault), and the subscription
    header is ARM's budget alone; the policy's remainder is in ``x-ms-ratelimit-remaining-resource``."""
    from simulator.faults import FaultPlan

    plan = FaultPlan.from_dict({"armThrottling": {"timeScale": 1, "reads": {"size": 5, "perSecond": 1}}})
    sim = sim_factory(estate({"timeScale": 1, "reads": {"size": 2, "perSecond": 0.5}}).with_faults(plan))
    http = Http(sim)
    answers = [http("GET", _vm(SUB_A, "a1"))[1] for _ in range(2)]
    assert [h[READS] for h in answers] == ["1", "0"]
    assert [h["x-ms-ratelimit-remaining-resource"] for h in answers] == [
        "Microsoft.Compute/LowCostGet3Min;4",
        "Microsoft.Compute/LowCostGet3Min;3",
    ]
    status, headers, body = http("GET", _vm(SUB_A, "a1"))
    assert (
        status == 429 and headers[READS] == "0" and body["error"]["code"] == "SubscriptionRequestsThrottled"
    )
    assert "x-ms-ratelimit-remaining-resource" not in headers  # it never reached Compute
    assert sim.faults()["armThrottling"] == 0 and sim.throttling()["armThrottled"] == 1


def test_the_throttling_section_validates_and_round_trips() -> None:
    section = {
        "model": "hourly",
        "timeScale": 2,
        "region": "eastus",
        "reads": {"size": 10, "perSecond": 1.5, "perHour": 600},
        "deletes": {"perHour": 7},
        "resourceGraph": {"queries": 4, "windowSeconds": 1},
    }
    loaded = estate(section)
    assert loaded.throttling.to_dict() == section
    assert Estate.from_dict(loaded.to_dict()).throttling == loaded.throttling
    assert estate({"resourceGraph": "off"}).throttling.graph is None
    assert estate({"timeScale": "auto"}).throttling.is_default
    for bad, path in [
        ({"timescale": 1}, "$.throttling.timescale"),
        ({"model": "perMinute"}, "$.throttling.model"),
        ({"timeScale": 0}, "$.throttling.timeScale"),
        ({"reads": {"size": 10}}, "$.throttling.reads"),
        ({"writes": {"perHour": 1.5}}, "$.throttling.writes.perHour"),
        ({"resourceGraph": {"queries": 15}}, "$.throttling.resourceGraph"),
        ({"region": "West Europe"}, "$.throttling.region"),
    ]:
        with pytest.raises(EstateError) as caught:
            estate(bad)
        assert caught.value.path == path, (bad, caught.value)


def test_throttle_options_of_the_command_line() -> None:
    settings = ThrottleSettings().with_options(
        ["timeScale=1", "reads=100/5", "writes=perHour:50", "resourceGraph=10/5", "model=tokenBucket"]
    )
    assert settings.time_scale == 1 and settings.model == "tokenBucket"
    assert settings.buckets["reads"] == (100, 5.0) and settings.hourly["writes"] == 50
    assert settings.graph == (10, 5.0)
    assert ThrottleSettings().with_options(["resourceGraph=off"]).graph is None
    for bad in ["reads=100", "speed=3", "timeScale=fast", "model"]:
        with pytest.raises(EstateError):
            ThrottleSettings().with_options([bad])
    assert hms(0.2) == "00:00:01" and hms(3725) == "01:02:05" and hms(0) == "00:00:00"


def test_serve_refuses_a_bad_throttle_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulator", "serve", "--throttle", "reads=lots"]) == 2
    assert "reads=lots" in capsys.readouterr().err


# --- management groups --------------------------------------------------------------------------


def test_management_groups_scope_resource_graph_to_their_subscriptions(
    sim_factory: Callable[..., Simulator],
) -> None:
    groups = {"mg-prod": [SUB_A, SUB_B], "mg-lab": [SUB_C]}
    sim = sim_factory(estate(managementGroups=groups))
    http = Http(sim)
    status, _, body = http.graph(managementGroups=["MG-PROD"])  # ids compare ignoring case
    assert status == 200
    assert sorted(row["id"] for row in body["data"]) == sorted([_vm(SUB_A, "a1"), _vm(SUB_B, "b1")])
    assert [row["id"] for row in http.graph(managementGroups=["mg-lab"])[2]["data"]] == [_vm(SUB_C, "c1")]
    both = http.graph(managementGroups=["mg-lab", "mg-prod"])[2]["data"]
    assert len(both) == 3
    status, _, body = http.graph(managementGroups=["mg-elsewhere"])
    assert status == 403 and body["error"]["details"][0]["code"] == "AuthorizationFailed"
    containers = (
        "ResourceContainers | where type =~ 'microsoft.resources/subscriptions' | project subscriptionId"
    )
    status, _, body = http("POST", GRAPH, {"query": containers, "managementGroups": ["mg-prod"]})
    assert status == 200 and sorted(r["subscriptionId"] for r in body["data"]) == sorted([SUB_A, SUB_B])
    assert sim.graph_queries()[0]["managementGroups"] == ["MG-PROD"]


def test_without_management_groups_any_group_holds_the_estate(sim_factory: Callable[..., Simulator]) -> None:
    http = Http(sim_factory(estate()))
    assert len(http.graph(managementGroups=["any-group"])[2]["data"]) == 3


def test_the_management_groups_section_validates() -> None:
    loaded = estate(managementGroups={"mg-prod": [SUB_A.upper()]})
    assert loaded.management_groups == {"mg-prod": (SUB_A,)}
    assert Estate.from_dict(loaded.to_dict()).management_groups == loaded.management_groups
    for bad, path in [
        ({"mg-prod": ["0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"]}, "$.managementGroups.mg-prod[0]"),
        ({"mg prod": [SUB_A]}, "$.managementGroups.mg prod"),
        ({"mg-prod": SUB_A}, "$.managementGroups.mg-prod"),
        ({"mg-prod": [SUB_A, SUB_A]}, "$.managementGroups.mg-prod[1]"),
    ]:
        with pytest.raises(EstateError) as caught:
            estate(managementGroups=bad)
        assert caught.value.path == path, (bad, caught.value)
    generated = Estate.from_dict(
        {"generate": {"count": 6, "seed": 1, "subscriptions": 3}, "managementGroups": {"mg-a": [0, 2]}}
    )
    assert generated.management_groups == {"mg-a": (generated.subscriptions[0], generated.subscriptions[2])}
    with pytest.raises(EstateError, match=r"managementGroups.mg-a\[0\]"):
        Estate.from_dict({"generate": {"count": 6, "seed": 1}, "managementGroups": {"mg-a": [5]}})
