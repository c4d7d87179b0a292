"""The log scan and the inventory, through the real SDK clients (azure-monitor-query, azure-mgmt-resourcegraph)
and the real managed-identity credential, against the simulator over HTTPS.

What matters: the scan finds exactly the VMs failing with 0xC004FD02 (by id, or by computer name
only), over the right window, with the cloud's audience, and keeps partial data; the inventory
pages through every Windows VM in scope and resolves computer names without ever building a query
from an unchecked name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity.aio import ManagedIdentityCredential

from shared.azure.inventory import Inventory, InventoryError, resolve_query
from shared.azure.logs import SPP_QUERY, LogScanError, LogScanner
from shared.model import VmId
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB_A = "11111111-2222-4333-8444-555555555555"
SUB_B = "66666666-7777-4888-8999-000000000000"
KMS_CLIENTS_B = 14


def vm_id(sub: str, rg: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


def windows(sub: str, rg: str, name: str, channel: str, **extra: Any) -> dict[str, Any]:
    return windows_vm(vm_id(sub, rg, name), channel=channel, **extra)


AVMA_APP = vm_id(SUB_A, "rg-App", "avma-app-01")
AVMA_LEGACY = vm_id(SUB_A, "rg-legacy", "avma-legacy-07")  # logs carry only its computer name
AVMA_LONG = vm_id(SUB_B, "rg-b", "avma-with-a-long-name")  # computer name cut to 15 characters
ESTATE = {
    "subscriptions": [SUB_A, SUB_B],
    "vms": [
        windows(SUB_A, "rg-App", "avma-app-01", "AVMA"),
        windows(
            SUB_A,
            "rg-legacy",
            "avma-legacy-07",
            "AVMA",
            powerState="deallocated",
            computerName="LEGACYAPP7",
            logResourceId=False,
        ),
        windows(SUB_A, "rg-App", "kms-app-01", "KMS_CLIENT"),
        windows(SUB_B, "rg-b", "avma-with-a-long-name", "AVMA"),
        *[windows(SUB_B, "rg-b", f"kms-b-{i:02}", "KMS_CLIENT") for i in range(KMS_CLIENTS_B)],
        {
            "id": vm_id(SUB_B, "rg-b", "lnx-01"),
            "os": "Linux",
            "powerState": "running",
            "agentReady": True,
            "tags": {},
        },
    ],
}
WINDOWS_A = sorted(vm["id"] for vm in ESTATE["vms"] if vm["os"] == "Windows" and SUB_A in vm["id"])
WINDOWS_ALL = sorted(vm["id"] for vm in ESTATE["vms"] if vm["os"] == "Windows")


@pytest.fixture
def sim(sim_factory: Callable[..., Simulator]) -> Simulator:
    return sim_factory(Estate.from_dict(ESTATE))


@pytest.fixture
async def credential(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ManagedIdentityCredential]:
    """The real managed-identity credential, pointed at the simulator's token endpoint."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred:
        yield cred


def settings(sim: Simulator, **env: str) -> Settings:
    return Settings.from_env({**sim.env(), **env})


# ------------------------------------------------------------------ log scan


async def test_scan_finds_exactly_the_avma_vms_by_id_or_computer_name(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    now = datetime.now(UTC)
    async with LogScanner(credential, settings(sim)) as scanner:
        result = await scanner.scan(since=None, now=now)
    assert result.partial_error is None
    assert {str(vm).lower() for vm in result.vm_ids()} == {AVMA_APP.lower(), AVMA_LONG.lower()}
    assert VmId.parse(AVMA_APP) in result.vm_ids()  # the table's ids are lower case; VmId ignores case
    assert result.computers_only() == ["LEGACYAPP7"]
    by_computer = {row["Computer"]: row for row in result.rows}
    assert set(by_computer) == {"avma-app-01", "LEGACYAPP7", "avma-with-a-lon"}
    assert by_computer["LEGACYAPP7"]["_ResourceId"] == ""
    for row in result.rows:
        assert result.window[0] <= row["LastSeen"] <= now
        assert row["LastSeen"].tzinfo is not None
        assert row["Events"] >= 1


async def test_scan_window_covers_the_overlap_and_the_lookback(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    now = datetime.now(UTC)
    since = now - timedelta(minutes=3)
    env = {"LOG_SCAN_OVERLAP_MINUTES": "10", "LOG_SCAN_LOOKBACK_MINUTES": "120"}
    async with LogScanner(credential, settings(sim, **env)) as scanner:
        incremental = await scanner.scan(since=since, now=now)
        first = await scanner.scan(since=None, now=now)
        skewed = scanner.window(since=now + timedelta(hours=1), now=now)
        with pytest.raises(ValueError, match="timezone"):
            scanner.window(since=datetime(2024, 1, 1), now=now)  # naive: refused
    assert incremental.window == (since - timedelta(minutes=10), now)
    assert first.window == (now - timedelta(minutes=120), now)
    assert skewed == (now - timedelta(minutes=10), now)
    seen = sim.log_queries()
    assert [q["status"] for q in seen] == [200, 200]
    assert seen[0]["query"] == SPP_QUERY and sim.workspace_id == seen[0]["workspace"]
    for query, result in zip(seen, (incremental, first), strict=True):
        assert abs(query["start"] - result.window[0]) < timedelta(milliseconds=1)
        assert abs(query["end"] - result.window[1]) < timedelta(milliseconds=1)
    assert len(incremental.rows) == 3  # 13 minutes: every AVMA VM logs every 5 minutes


async def test_a_partial_result_keeps_its_rows_and_reports_the_error(
    sim: Simulator, credential: ManagedIdentityCredential, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    async with LogScanner(credential, settings(sim)) as scanner:
        full = await scanner.scan(since=None, now=now)
        sim.set_log_partial_error(True)
        with caplog.at_level(logging.WARNING, logger="shared.azure.logs"):
            partial = await scanner.scan(since=None, now=now)
    assert partial.partial_error is not None and partial.partial_error.startswith("PartialError")
    assert 0 < len(partial.rows) < len(full.rows)
    assert all(row in full.rows for row in partial.rows)
    assert "partial results (2 rows kept)" in caplog.text


async def test_the_token_is_asked_for_the_cloud_s_log_analytics_audience(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    now = datetime.now(UTC)
    async with LogScanner(credential, settings(sim)) as scanner:
        await scanner.scan(since=None, now=now)
    assert sim.log_queries()[-1]["audience"] == "https://api.loganalytics.io"
    # Another cloud's audience (and so any token not meant for this workspace's API) is refused.
    async with LogScanner(credential, settings(sim, AZURE_CLOUD="AzureUSGovernment")) as scanner:
        with pytest.raises(LogScanError) as refused:
            await scanner.scan(since=None, now=now)
    assert (refused.value.status, refused.value.code) == (403, "InvalidTokenError")
    assert sim.log_queries()[-1]["audience"] == "https://api.loganalytics.us"


async def test_http_errors_become_log_scan_errors(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    wrong = "00000000-1111-4222-8333-444444444444"
    async with LogScanner(credential, settings(sim, LOG_ANALYTICS_WORKSPACE_ID=wrong)) as scanner:
        with pytest.raises(LogScanError) as error:
            await scanner.scan(since=None, now=datetime.now(UTC))
    assert (error.value.status, error.value.code) == (404, "WorkspaceNotFoundError")


async def test_deleted_vms_stop_showing(sim: Simulator, credential: ManagedIdentityCredential) -> None:
    sim.delete_vm(AVMA_APP)
    async with LogScanner(credential, settings(sim)) as scanner:
        result = await scanner.scan(since=None, now=datetime.now(UTC))
    assert [str(vm).lower() for vm in result.vm_ids()] == [AVMA_LONG.lower()]


async def test_the_scan_finds_the_code_in_event_data_when_descriptions_are_not_rendered(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that does not render descriptions leaves RenderedDescription empty; EventData has the code."""
    sim = sim_factory(Estate.from_dict(ESTATE), render_descriptions=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred, LogScanner(cred, settings(sim)) as scanner:
        result = await scanner.scan(since=None, now=datetime.now(UTC))
    assert {str(vm).lower() for vm in result.vm_ids()} == {AVMA_APP.lower(), AVMA_LONG.lower()}
    assert result.computers_only() == ["LEGACYAPP7"]
    assert 'EventData contains "0xC004FD02"' in SPP_QUERY


@pytest.mark.parametrize("rendered", [True, False])
async def test_log_analytics_evaluates_the_predicates_a_query_names(
    rendered: bool, sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.monitor.query.aio import LogsQueryClient

    sim = sim_factory(Estate.from_dict(ESTATE), render_descriptions=rendered)
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    head = 'Event\n| where EventLog == "Application"\n| where Source == "Microsoft-Windows-Security-SPP"\n'
    tail = "\n| summarize LastSeen=max(TimeGenerated), Events=count() by _ResourceId, Computer"
    s = settings(sim)

    async def computers(client: LogsQueryClient, where: str) -> set[str]:
        response = await client.query_workspace(
            s.workspace_id, f"{head}| where {where}{tail}", timespan=timedelta(hours=1)
        )
        return {str(row[1]) for table in response.tables for row in table.rows}

    avma = {"avma-app-01", "LEGACYAPP7", "avma-with-a-lon"}
    async with (
        ManagedIdentityCredential() as cred,
        LogsQueryClient(
            cred,
            endpoint=s.log_analytics_endpoint,
            audience=s.cloud.log_analytics_audience,
            connection_verify=sim.ca_bundle,
        ) as client,
    ):
        assert await computers(client, 'RenderedDescription contains "0xC004FD02"') == (
            avma if rendered else set()
        )
        assert await computers(client, 'EventData contains "0xc004fd02"') == avma
        assert await computers(client, 'EventData contains "0xC004F074"') == set()  # another code
        assert await computers(client, "EventData contains '0xC004FD02'") == avma  # KQL's other quotes
        assert await computers(client, 'Computer =~ "legacyapp7" and EventData contains "0xC004FD02"') == {
            "LEGACYAPP7"
        }
        with pytest.raises(HttpResponseError) as unknown:
            await computers(client, 'NoSuchColumn contains "0xC004FD02"')
    assert unknown.value.status_code == 400


# ------------------------------------------------------------------ inventory


async def test_windows_vms_pages_through_the_target_subscriptions(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    async with Inventory(credential, settings(sim), page_size=4) as inventory:
        found = [str(vm) async for vm in inventory.windows_vms()]
    assert found == WINDOWS_ALL  # every Windows VM, once, in id order; never the Linux one
    queries = sim.graph_queries()
    assert len(queries) == math.ceil(len(WINDOWS_ALL) / 4) > 2
    assert all(q["kind"] == "windows_vms" and q["top"] == 4 and q["status"] == 200 for q in queries)
    assert queries[0]["skipToken"] is None and all(q["skipToken"] for q in queries[1:])
    assert queries[0]["subscriptions"] == [SUB_A, SUB_B] and queries[0]["managementGroups"] == []


async def test_windows_vms_in_one_subscription(sim: Simulator, credential: ManagedIdentityCredential) -> None:
    async with Inventory(credential, settings(sim, TARGET_SUBSCRIPTIONS=SUB_A)) as inventory:
        found = [str(vm) async for vm in inventory.windows_vms()]
    assert found == WINDOWS_A
    assert len(sim.graph_queries()) == 1 and sim.graph_queries()[0]["top"] == 1000


async def test_a_management_group_scope_wins_over_subscriptions(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    env = {"MANAGEMENT_GROUP_ID": "mg-servers", "TARGET_SUBSCRIPTIONS": SUB_A}
    async with Inventory(credential, settings(sim, **env), page_size=10) as inventory:
        found = [str(vm) async for vm in inventory.windows_vms()]
    assert found == WINDOWS_ALL
    assert {(tuple(q["managementGroups"]), tuple(q["subscriptions"])) for q in sim.graph_queries()} == {
        (("mg-servers",), ())
    }


async def test_resolve_computer_by_computer_name_vm_name_or_fqdn(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    async with Inventory(credential, settings(sim)) as inventory:
        assert await inventory.resolve_computer("LEGACYAPP7") == [VmId.parse(AVMA_LEGACY)]
        assert await inventory.resolve_computer("legacyapp7.contoso.local") == [VmId.parse(AVMA_LEGACY)]
        assert await inventory.resolve_computer("AVMA-APP-01") == [VmId.parse(AVMA_APP)]
        assert await inventory.resolve_computer("avma-with-a-lon") == [VmId.parse(AVMA_LONG)]
        assert await inventory.resolve_computer("no-such-host") == []
    assert {q["kind"] for q in sim.graph_queries()} == {"resolve_computer"}


@pytest.mark.parametrize(
    "hostile",
    ["x' or 1==1 //", "a'", "vm01\n| project secrets", "", "-leading-hyphen", "a" * 65, "vm 01", "vm01'//"],
)
async def test_resolve_computer_rejects_anything_but_a_host_name(
    sim: Simulator, credential: ManagedIdentityCredential, hostile: str
) -> None:
    async with Inventory(credential, settings(sim)) as inventory:
        with pytest.raises(ValueError, match="not a computer name"):
            await inventory.resolve_computer(hostile)
    with pytest.raises(ValueError, match="not a computer name"):
        resolve_query(hostile)
    assert sim.graph_queries() == []  # nothing was sent


async def test_throttling_waits_for_the_quota_then_becomes_a_typed_error(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    sim.throttle_resource_graph(1, resets_after_s=0)
    async with Inventory(credential, settings(sim, TARGET_SUBSCRIPTIONS=SUB_A)) as inventory:
        assert [str(vm) async for vm in inventory.windows_vms()] == WINDOWS_A  # waited, then went on
        assert [q["status"] for q in sim.graph_queries()] == [429, 200]
        sim.throttle_resource_graph(10, resets_after_s=0)
        with pytest.raises(InventoryError) as error:
            [vm async for vm in inventory.windows_vms()]
    assert (error.value.reason, error.value.status, error.value.code) == ("throttled", 429, "RateLimiting")
    assert [q["status"] for q in sim.graph_queries()][2:] == [429] * 4  # the first try and 3 retries
    sim.throttle_resource_graph(1, resets_after_s=3600)  # too long to wait inside one run
    async with Inventory(credential, settings(sim)) as inventory:
        with pytest.raises(InventoryError, match="RateLimiting"):
            [vm async for vm in inventory.windows_vms()]


# ------------------------------------------------------------------ VMs created from an attached OS disk

MIGRATED = vm_id(SUB_A, "rg-migrated", "vm-erp-prod-01")  # guest host name ERPSRV01, no osProfile
IMAGED = vm_id(SUB_A, "rg-migrated", "vm-web-01")  # from an image: osProfile.computerName WEB01
ATTACHED_ESTATE = {
    "subscriptions": [SUB_A],
    "vms": [
        windows(
            SUB_A, "rg-migrated", "vm-erp-prod-01", "AVMA", createOption="Attach", computerName="ERPSRV01"
        ),
        windows(SUB_A, "rg-migrated", "vm-web-01", "AVMA", createOption="FromImage", computerName="WEB01"),
    ],
}


async def test_resolve_computer_finds_an_attached_vm_by_its_guest_reported_name(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migrated VM has no osProfile: only the instance view's computerName (or the VM name) names it."""
    sim = sim_factory(Estate.from_dict(ATTACHED_ESTATE))
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred, Inventory(cred, settings(sim)) as inventory:
        assert await inventory.resolve_computer("ERPSRV01") == [VmId.parse(MIGRATED)]
        assert await inventory.resolve_computer("erpsrv01.corp.example") == [VmId.parse(MIGRATED)]
        assert await inventory.resolve_computer("vm-erp-prod-01") == [VmId.parse(MIGRATED)]
        assert await inventory.resolve_computer("WEB01") == [VmId.parse(IMAGED)]
    assert "properties.extended.instanceView.computerName" in resolve_query("ERPSRV01")


async def test_resolve_computer_takes_the_long_fqdn_of_a_domain_joined_vm(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Event.Computer of a domain-joined VM is its FQDN; an AD domain can take it past 64 characters."""
    fqdn = "erpsrv01.emea.corp.contoso-international-holdings.example.com"
    longer = "erpsrv01." + "finance-and-accounting-emea." * 4 + "example.com"  # 132 characters
    assert len(fqdn) > 60 and len(longer) > 64
    sim = sim_factory(Estate.from_dict(ATTACHED_ESTATE))
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred, Inventory(cred, settings(sim)) as inventory:
        assert await inventory.resolve_computer(fqdn) == [VmId.parse(MIGRATED)]
        assert await inventory.resolve_computer(longer) == [VmId.parse(MIGRATED)]
    for hostile in ("a" * 64 + ".example.com", "erpsrv01..example.com", "erpsrv01.", "x" * 250 + ".com"):
        with pytest.raises(ValueError, match="not a computer name"):
            resolve_query(hostile)


async def test_resource_graph_evaluates_only_the_property_a_query_names(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """osProfile.computerName matches only the VM created from an image; the guest-reported name both."""
    from azure.mgmt.resourcegraph.aio import ResourceGraphClient
    from azure.mgmt.resourcegraph.models import QueryRequest

    sim = sim_factory(Estate.from_dict(ATTACHED_ESTATE))
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    base = "Resources\n| where type =~ 'microsoft.compute/virtualmachines'\n"

    async def ids(cred: ManagedIdentityCredential, where: str) -> list[str]:
        s = settings(sim)
        async with ResourceGraphClient(
            cred,
            base_url=s.arm_endpoint,
            credential_scopes=[s.cloud.arm_scope],
            connection_verify=sim.ca_bundle,
        ) as client:
            response = await client.resources(QueryRequest(query=f"{base}| where {where}\n| project id"))
        return sorted(row["id"] for row in response.data)

    async with ManagedIdentityCredential() as cred:
        assert await ids(cred, "tostring(properties.osProfile.computerName) =~ 'ERPSRV01'") == []
        assert await ids(cred, "tostring(properties.osProfile.computerName) =~ 'WEB01'") == [IMAGED]
        assert await ids(cred, "tostring(properties.extended.instanceView.computerName) =~ 'ERPSRV01'") == [
            MIGRATED
        ]
        assert await ids(cred, "tostring(properties.storageProfile.osDisk.createOption) =~ 'Attach'") == [
            MIGRATED
        ]
        assert await ids(cred, "name =~ 'ERPSRV01'") == []
        # the query the engine sent before: osProfile or the VM name; the migrated VM is invisible to it
        assert (
            await ids(cred, "tostring(properties.osProfile.computerName) =~ 'ERPSRV01' or name =~ 'ERPSRV01'")
            == []
        )


async def test_resolve_computer_finds_a_vm_whose_name_has_dots_by_that_whole_name(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """VM names may contain dots; the whole text is tried against ``name``, not only its first label."""
    dotted = vm_id(SUB_A, "rg-migrated", "erp.prod-01")
    estate = {
        "subscriptions": [SUB_A],
        "vms": [
            windows(
                SUB_A, "rg-migrated", "erp.prod-01", "AVMA", createOption="Attach", computerName="ERPSRV09"
            )
        ],
    }
    sim = sim_factory(Estate.from_dict(estate))
    monkeypatch.setenv("IDENTITY_ENDPOINT", sim.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", sim.identity_header)
    async with ManagedIdentityCredential() as cred, Inventory(cred, settings(sim)) as inventory:
        assert await inventory.resolve_computer("erp.prod-01") == [VmId.parse(dotted)]
        assert await inventory.resolve_computer("erp") == []


# ------------------------------------------------------------------ transient is not terminal (issue 9, item 7)


async def test_a_long_throttle_is_a_transient_error_carrying_the_wait_never_a_sleep(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    """A 429 whose Retry-After (or quota reset) is longer than an invocation should sleep is handed
    back at once, typed as transient and carrying the wait, so the worker can defer by that long.
    (azure-core alone sleeps any Retry-After, however long, inside the invocation.)"""
    sim.throttle_resource_graph(1, resets_after_s=3600, retry_after_s=3600)
    async with Inventory(credential, settings(sim)) as inventory:
        with pytest.raises(InventoryError) as error:
            await asyncio.wait_for(inventory.resolve_computer("LEGACYAPP7"), timeout=10)
    from shared.azure.inventory import InventoryUnavailable
    from shared.azure.transient import TransientError

    assert isinstance(error.value, InventoryUnavailable) and isinstance(error.value, TransientError)
    assert (error.value.reason, error.value.status, error.value.retry_after_s) == ("throttled", 429, 3600)
    assert [q["status"] for q in sim.graph_queries()] == [429]  # not retried inside the invocation


async def test_a_short_retry_after_is_still_waited_inside_the_invocation(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    sim.throttle_resource_graph(1, resets_after_s=0, retry_after_s=0)
    async with Inventory(credential, settings(sim)) as inventory:
        assert [str(vm) for vm in await inventory.resolve_computer("LEGACYAPP7")] == [AVMA_LEGACY]
    assert [q["status"] for q in sim.graph_queries()] == [429, 200]


async def test_a_forbidden_query_is_not_transient(
    sim: Simulator, credential: ManagedIdentityCredential
) -> None:
    from shared.azure.transient import TransientError

    error = _translate_for_test(403)
    assert error.reason == "forbidden" and not isinstance(error, TransientError)
    throttled = _translate_for_test(429, {"x-ms-user-quota-resets-after": "00:01:05"})
    assert isinstance(throttled, TransientError) and throttled.retry_after_s == 65
    unavailable = _translate_for_test(503, {"Retry-After": "7"})
    assert isinstance(unavailable, TransientError)
    assert (unavailable.reason, unavailable.retry_after_s) == ("arm-unavailable", 7)


def _translate_for_test(status: int, headers: dict[str, str] | None = None) -> InventoryError:
    """What the inventory makes of an HTTP error answer (a stand-in response: status, headers, body)."""
    from shared.azure import inventory

    class Answer:
        status_code, reason, request = status, "", None

        def __init__(self) -> None:
            self.headers = headers or {}

        def text(self) -> str:
            return json.dumps({"error": {"code": "Code", "message": "message"}})

    return inventory._translate(HttpResponseError(response=Answer()))


def throttle_log_analytics(
    monkeypatch: pytest.MonkeyPatch, answers: int, *, retry_after_s: int = 3600
) -> None:
    """The next ``answers`` queries get 429 with ``Retry-After`` (a test fault: the simulator has no
    Log Analytics throttling; the shape is ARM's throttled answer, a guess for Log Analytics)."""
    from simulator.arm import ArmResponse
    from simulator.monitor import LogAnalytics

    real = LogAnalytics._answer
    left = {"n": answers}

    def answer(self: LogAnalytics, *args: Any, **kwargs: Any) -> ArmResponse:
        if left["n"] > 0:
            left["n"] -= 1
            body = {"error": {"code": "ThrottledError", "message": "Your request was throttled."}}
            return ArmResponse(429, body, {"Retry-After": str(retry_after_s)})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LogAnalytics, "_answer", answer)


async def test_a_throttled_log_scan_is_a_transient_error_carrying_the_wait_never_a_sleep(
    sim: Simulator, credential: ManagedIdentityCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-core alone would sleep the hour the 429 names inside the timer's invocation."""
    from shared.azure.logs import LogScanUnavailable
    from shared.azure.transient import TransientError

    throttle_log_analytics(monkeypatch, 1)
    async with LogScanner(credential, settings(sim)) as scanner:
        with pytest.raises(LogScanUnavailable) as error:
            await asyncio.wait_for(scanner.scan(since=None, now=datetime.now(UTC)), timeout=10)
    assert isinstance(error.value, TransientError) and isinstance(error.value, LogScanError)
    assert (error.value.reason, error.value.status, error.value.retry_after_s) == ("throttled", 429, 3600)
    assert [q["status"] for q in sim.log_queries()] == [429]  # handed back, not retried in the invocation


async def test_a_short_log_analytics_retry_after_is_still_waited_inside_the_invocation(
    sim: Simulator, credential: ManagedIdentityCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    throttle_log_analytics(monkeypatch, 1, retry_after_s=0)
    async with LogScanner(credential, settings(sim)) as scanner:
        result = await scanner.scan(since=None, now=datetime.now(UTC))
    assert {str(vm).lower() for vm in result.vm_ids()} == {AVMA_APP.lower(), AVMA_LONG.lower()}
    assert [q["status"] for q in sim.log_queries()] == [429, 200]
