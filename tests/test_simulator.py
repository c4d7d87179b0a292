"""The simulator, driven by the real Azure SDK (azure-mgmt-compute aio + azure-identity) over HTTPS.

What matters here is that the simulator answers as Azure and Windows do, because every end-to-end
test of the engine trusts it: paging with absolute nextLinks, the long-running Run Command, 409s,
the ARM error bodies, and a Windows guest that accepts only the key of its own edition.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.identity.aio import ManagedIdentityCredential
from azure.mgmt.compute.aio import ComputeManagementClient

from shared.azure.logs import SPP_QUERY
from shared.guest.facts import parse_result
from simulator import Estate, EstateError, Simulator
from simulator.arm import CONFLICT_MESSAGE
from simulator.generator import CATEGORIES
from simulator.guest import (
    KEYS,
    PRODUCT_UNLICENSED,
    WindowsGuest,
    avma_problem,
    base_edition,
    default_ps_version,
    key_for,
)

SUB_PROD = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
SUB_LEGACY = "8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54"
SUB_DEV = "c7e09a3d-2f18-4b65-8e4c-5d9a0b1f7e26"
AZ_KMS = "azkms.core.windows.net"
MARKER = "AVMA-REMEDIATOR-RESULT "
KEY_2022_DC = "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"
KEY_2019_DC = "WMDGN-G9PQG-XVVXX-R3X43-63DFG"


def vm_id(sub: str, rg: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


AVMA_2022_DC = vm_id(SUB_LEGACY, "rg-migrated-apps", "avma-2022-dc")
AVMA_2022_NOKMS = vm_id(SUB_LEGACY, "rg-migrated-dmz", "avma-2022-dc-nokms")


def detect_body(host: str = AZ_KMS, port: str = "1688") -> dict[str, Any]:
    return {
        "commandId": "RunPowerShellScript",
        "script": ["# avma-remediator guest script: detect v2", "param([string]$KmsHost, [string]$KmsPort)"],
        "parameters": [{"name": "KmsHost", "value": host}, {"name": "KmsPort", "value": port}],
    }


def remediate_body(key: str | None, host: str = AZ_KMS, port: str = "1688") -> dict[str, Any]:
    params = [{"name": "ProductKey", "value": key}] if key else []
    params += [
        {"name": "KmsHost", "value": host},
        {"name": "KmsPort", "value": port},
        {"name": "InstallKey", "value": "1" if key else "0"},
    ]
    return {
        "commandId": "RunPowerShellScript",
        "script": ["# avma-remediator guest script: remediate v2", "param()"],
        "parameters": params,
    }


def result_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"no marker line in {stdout!r}"
    parsed: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    return parsed


@asynccontextmanager
async def compute(sim: Simulator, monkeypatch: pytest.MonkeyPatch, sub: str) -> AsyncIterator[Any]:
    """The real SDK client, authenticated by the real managed-identity credential."""
    env = sim.env()
    monkeypatch.setenv("IDENTITY_ENDPOINT", env["IDENTITY_ENDPOINT"])
    monkeypatch.setenv("IDENTITY_HEADER", env["IDENTITY_HEADER"])
    async with (
        ManagedIdentityCredential() as credential,
        ComputeManagementClient(
            credential=credential,
            subscription_id=sub,
            base_url=sim.arm_endpoint,
            connection_verify=sim.ca_bundle,
            polling_interval=0,
        ) as client,
    ):
        yield client


async def run(client: Any, vm: str, body: dict[str, Any]) -> str:
    rg, name = vm.split("/")[4], vm.split("/")[8]
    poller = await client.virtual_machines.begin_run_command(rg, name, body)
    result = await poller.result()
    values = result.as_dict()["value"]
    assert [v["code"] for v in values] == [
        "ComponentStatus/StdOut/succeeded",
        "ComponentStatus/StdErr/succeeded",
    ]
    return str(values[0]["message"])


# ------------------------------------------------------------------ ARM reads


async def test_list_all_follows_absolute_next_links_across_pages(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = sim_factory(page_size=3)
    expected = [vm.id for vm in sim.estate.vms if vm.subscription_id == SUB_LEGACY]
    assert len(expected) > 6  # several pages
    async with compute(sim, monkeypatch, SUB_LEGACY) as client:
        full = [vm async for vm in client.virtual_machines.list_all()]
        lean = [vm async for vm in client.virtual_machines.list_all(status_only="true")]
    assert [vm.id for vm in full] == expected
    assert {vm.storage_profile.os_disk.os_type for vm in full} == {"Windows"}
    # statusOnly carried by every nextLink: every page has instance views and no model properties
    assert [vm.id for vm in lean] == expected
    assert all(vm.instance_view is not None for vm in lean)
    assert all(vm.as_dict().get("tags") is None and vm.storage_profile is None for vm in lean)
    pages = -(-len(expected) // 3)
    assert sim.counters()["requests"]["list_all"] == 2 * pages


async def test_list_by_resource_group_and_unknown_scopes(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_DEV) as client:
        names = [vm.name async for vm in client.virtual_machines.list("rg-avd")]
        assert names == ["avd-multisession-01"]
        with pytest.raises(ResourceNotFoundError) as no_rg:
            [vm async for vm in client.virtual_machines.list("rg-nope")]
        assert no_rg.value.error is not None and no_rg.value.error.code == "ResourceGroupNotFound"
    async with compute(simulator, monkeypatch, "00000000-0000-4000-8000-000000000000") as client:
        with pytest.raises(ResourceNotFoundError) as no_sub:
            [vm async for vm in client.virtual_machines.list_all()]
        assert no_sub.value.error is not None and no_sub.value.error.code == "SubscriptionNotFound"


async def test_get_with_instance_view_reports_power_agent_os_and_tags(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_DEV) as client:
        ready = await client.virtual_machines.get("rg-dev-apps", "avma-2019-dc-optout", expand="instanceView")
        not_ready = await client.virtual_machines.get(
            "rg-dev-apps", "avma-2022-dc-noagent", expand="instanceView"
        )
        plain = await client.virtual_machines.get("rg-dev-apps", "avma-2019-dc-optout")
        view = await client.virtual_machines.instance_view("rg-dev-apps", "lnx-batch-01")
    assert ready.tags == {"env": "dev", "avma-remediator-opt-out": "true"}
    assert ready.storage_profile.os_disk.os_type == "Windows"
    assert [s.code for s in ready.instance_view.statuses] == [
        "ProvisioningState/succeeded",
        "PowerState/running",
    ]
    assert ready.instance_view.vm_agent.statuses[0].display_status == "Ready"
    agent = not_ready.instance_view.vm_agent.statuses[0]
    assert (agent.code, agent.display_status) == ("ProvisioningState/Unavailable", "Not Ready")
    assert plain.instance_view is None
    assert view.statuses[1].code == "PowerState/deallocated" and view.vm_agent is None


async def test_an_attached_vm_has_no_os_profile_and_reports_its_guest_name_in_the_instance_view(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """createOption Attach (a migrated VM): no osProfile; the guest host name is in the instance view."""
    from tests.estates import windows_vm

    attached = vm_id(SUB_PROD, "rg-p", "vm-erp-prod-01")
    imaged = vm_id(SUB_PROD, "rg-p", "vm-web-01")
    sim = sim_factory(
        Estate.from_dict(
            {
                "vms": [
                    windows_vm(attached, createOption="Attach", computerName="ERPSRV01"),
                    windows_vm(imaged, computerName="WEB01"),
                ]
            }
        )
    )
    async with compute(sim, monkeypatch, SUB_PROD) as client:
        migrated = await client.virtual_machines.get("rg-p", "vm-erp-prod-01", expand="instanceView")
        fresh = await client.virtual_machines.get("rg-p", "vm-web-01", expand="instanceView")
    assert migrated.storage_profile.os_disk.create_option == "Attach"
    assert migrated.os_profile is None
    assert migrated.instance_view.computer_name == "ERPSRV01"
    assert fresh.storage_profile.os_disk.create_option == "FromImage"
    assert fresh.os_profile.computer_name == "WEB01" == fresh.instance_view.computer_name


@pytest.mark.parametrize("state", ["starting", "stopping", "deallocating", "unknown"])
async def test_the_estate_takes_every_power_state_arm_reports(
    state: str, sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.estates import windows_vm

    vm = vm_id(SUB_PROD, "rg-p", "avma-01")
    sim = sim_factory(Estate.from_dict({"vms": [windows_vm(vm, power=state)]}))
    async with compute(sim, monkeypatch, SUB_PROD) as client:
        view = await client.virtual_machines.instance_view("rg-p", "avma-01")
        listed = [item async for item in client.virtual_machines.list_all(status_only="true")]
        with pytest.raises(HttpResponseError) as refused:
            await client.virtual_machines.begin_run_command("rg-p", "avma-01", detect_body())
    assert [s.code for s in view.statuses][1] == f"PowerState/{state}"
    assert view.statuses[1].display_status == f"VM {state}"
    assert view.vm_agent is None  # only a running VM reports its agent
    assert listed[0].instance_view.statuses[1].code == f"PowerState/{state}"
    assert refused.value.status_code == 409
    sim.set_power_state(vm, "running")
    assert sim.state_dump()[vm]["powerState"] == "running"


async def test_unknown_vm_is_404_resource_not_found_and_ids_ignore_case(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        with pytest.raises(ResourceNotFoundError) as missing:
            await client.virtual_machines.get("rg-migrated-apps", "no-such-vm")
        shouted = await client.virtual_machines.get("RG-MIGRATED-APPS", "AVMA-2022-DC")
        simulator.delete_vm(AVMA_2022_DC.upper())
        with pytest.raises(ResourceNotFoundError):
            await client.virtual_machines.get("rg-migrated-apps", "avma-2022-dc")
        listed = [vm.id async for vm in client.virtual_machines.list_all()]
    assert missing.value.status_code == 404
    assert missing.value.error is not None and missing.value.error.code == "ResourceNotFound"
    assert shouted.id == AVMA_2022_DC  # ARM answers with the id as created
    assert AVMA_2022_DC not in listed and AVMA_2022_DC not in simulator.state_dump()


async def test_only_tokens_from_the_identity_endpoint_open_arm(simulator: Simulator) -> None:
    class WrongToken:
        async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            return AccessToken("not-a-token-the-simulator-issued", 2_000_000_000)

        async def close(self) -> None:
            return None

    client = ComputeManagementClient(
        credential=WrongToken(),  # type: ignore[arg-type]
        subscription_id=SUB_LEGACY,
        base_url=simulator.arm_endpoint,
        connection_verify=simulator.ca_bundle,
    )
    async with client:
        with pytest.raises(ClientAuthenticationError) as denied:
            await client.virtual_machines.get("rg-migrated-apps", "avma-2022-dc")
    assert denied.value.status_code == 401
    assert denied.value.error is not None and denied.value.error.code == "InvalidAuthenticationToken"
    assert simulator.counters()["requests"]["unauthorized"] == 1
    async with aiohttp.ClientSession() as http:
        url = f"{simulator.identity_endpoint}?api-version=2019-08-01&resource=https://management.azure.com"
        async with http.get(url, headers={"X-IDENTITY-HEADER": "wrong"}) as response:
            assert response.status == 401


GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
USER_ASSIGNED = "7c1e9a52-3b4d-4f6e-8a9b-0c1d2e3f4a5b"
OTHER_CLIENT = "0f9e8d7c-6b5a-4c3d-9e2f-1a0b9c8d7e6f"


async def _token_with(sim: Simulator, monkeypatch: pytest.MonkeyPatch, client_id: str | None) -> str:
    """What the engine's credential (make_credential with AZURE_CLIENT_ID) gets from the endpoint."""
    from shared.azure.credentials import make_credential
    from shared.settings import Settings

    env = {k: v for k, v in sim.env().items() if k != "AZURE_CLIENT_ID"}
    if client_id is not None:
        env["AZURE_CLIENT_ID"] = client_id
    for key in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
        monkeypatch.setenv(key, env[key])
    credential = make_credential(Settings.from_env(env), env)
    async with credential:
        return (await credential.get_token("https://management.azure.com/.default")).token


async def test_the_identity_endpoint_serves_only_the_app_s_own_identity(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong AZURE_CLIENT_ID fails locally as in Azure: 400 "Unable to load the proper Managed Identity"."""
    system = sim_factory()
    assert "AZURE_CLIENT_ID" not in system.env()
    assert await _token_with(system, monkeypatch, None)
    with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
        await _token_with(system, monkeypatch, USER_ASSIGNED)  # the app has no user-assigned identity

    user = sim_factory(client_id=USER_ASSIGNED)
    assert user.env()["AZURE_CLIENT_ID"] == USER_ASSIGNED  # what a local run needs
    assert await _token_with(user, monkeypatch, USER_ASSIGNED)
    assert await _token_with(user, monkeypatch, USER_ASSIGNED.upper())
    with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
        await _token_with(user, monkeypatch, OTHER_CLIENT)
    with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
        await _token_with(user, monkeypatch, None)  # no system-assigned identity to fall back on

    async with aiohttp.ClientSession() as http:
        base = f"{user.identity_endpoint}?api-version=2019-08-01&resource=https://management.azure.com"
        headers = {"X-IDENTITY-HEADER": user.identity_header}
        # The documented 200 (overview-managed-identity.md) names the client id of the identity used.
        async with http.get(f"{base}&client_id={USER_ASSIGNED.upper()}", headers=headers) as response:
            granted = await response.json()
        assert response.status == 200
        assert set(granted) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
        assert granted["client_id"] == USER_ASSIGNED and granted["token_type"] == "Bearer"
        system_base = (
            f"{system.identity_endpoint}?api-version=2019-08-01&resource=https://management.azure.com"
        )
        system_headers = {"X-IDENTITY-HEADER": system.identity_header}
        async with http.get(system_base, headers=system_headers) as response:
            own = await response.json()
        assert response.status == 200 and re.fullmatch(GUID, own["client_id"]), own
        assert own["client_id"] != USER_ASSIGNED
        async with http.get(f"{base}&client_id={OTHER_CLIENT}", headers=headers) as response:
            body = await response.json()
        assert response.status == 400
        assert body["statusCode"] == 400 and body["message"] == "Unable to load the proper Managed Identity."
        async with http.get(
            f"{base}&mi_res_id=/subscriptions/x/resourcegroups/y", headers=headers
        ) as response:
            assert response.status == 400


# ------------------------------------------------------------------ Run Command


async def test_detect_returns_the_marker_line_as_windows_would(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        stdout = await run(client, AVMA_2022_DC, detect_body())
    result = result_line(stdout)
    assert stdout.splitlines()[-1].startswith(MARKER)
    assert result["script"] == "detect" and result["error"] is None and result["steps"] == []
    assert result["os"] == {
        "caption": "Microsoft Windows Server 2022 Datacenter",
        "version": "10.0.20348",
        "build": 20348,
        "productType": 3,
        "sku": 8,
        "editionId": "ServerDatacenter",
    }
    lic = result["license"]
    assert lic["description"] == "Windows(R) Operating System, VIRTUAL_MACHINE_ACTIVATION channel"
    assert lic["name"] == "Windows(R), ServerDatacenter edition"
    assert lic["partialProductKey"] == "DV9BG"  # the published 2022 Datacenter AVMA key
    assert (lic["licenseStatus"], lic["kmsMachine"], lic["kmsPort"]) == (5, None, 0)
    assert result["kmsProbe"] == {"host": AZ_KMS, "port": 1688, "reachable": True, "error": None}
    assert simulator.run_log(AVMA_2022_DC)[0]["script"] == "detect"
    assert simulator.state_dump()[AVMA_2022_DC]["changed"] is False


async def test_the_engine_s_real_scripts_are_recognised(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.guest.scripts import detect_command, remediate_command

    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        detected = result_line(await run(client, AVMA_2022_DC, dict(detect_command(AZ_KMS, 1688))))
        body = remediate_command(product_key=KEY_2022_DC, kms_host=AZ_KMS, kms_port=1688)
        fixed = result_line(await run(client, AVMA_2022_DC, dict(body)))
    assert detected["license"]["licenseStatus"] == 5
    assert fixed["license"]["licenseStatus"] == 1


async def test_overlapping_run_commands_get_the_documented_409_conflict(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = sim_factory(latency_s=0.4)
    async with compute(sim, monkeypatch, SUB_LEGACY) as client:
        first = await client.virtual_machines.begin_run_command(
            "rg-migrated-apps", "avma-2022-dc", detect_body()
        )
        with pytest.raises(HttpResponseError) as busy:
            await client.virtual_machines.begin_run_command("rg-migrated-apps", "avma-2022-dc", detect_body())
        done = await first.result()
    assert busy.value.status_code == 409
    assert busy.value.error is not None
    assert (busy.value.error.code, busy.value.error.message) == ("Conflict", CONFLICT_MESSAGE)
    assert MARKER in done.value[0].message
    counters = sim.counters()
    assert counters["conflicts"] == {AVMA_2022_DC: 1}
    assert counters["runCommandsStarted"] == {AVMA_2022_DC: 1}
    assert sim.max_concurrent_run_commands() == 1


async def test_a_foreign_run_command_from_the_estate_blocks_the_first_attempts(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy_vm = vm_id(SUB_DEV, "rg-dev-apps", "avma-2022-dc-busy")
    async with compute(simulator, monkeypatch, SUB_DEV) as client:
        with pytest.raises(HttpResponseError) as first:
            await run(client, busy_vm, detect_body())
        await asyncio.sleep(0.35)  # busySeconds is 0.3 from the first attempt
        stdout = await run(client, busy_vm, detect_body())
    assert first.value.status_code == 409 and first.value.error is not None
    assert first.value.error.code == "Conflict"
    assert result_line(stdout)["error"] is None
    assert simulator.counters()["conflicts"] == {busy_vm: 1}


async def test_run_command_refusals_for_stopped_vms_missing_agents_and_linux(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        with pytest.raises(HttpResponseError) as stopped:
            await run(client, vm_id(SUB_LEGACY, "rg-migrated-apps", "avma-2019-dc-dealloc"), detect_body())
    async with compute(simulator, monkeypatch, SUB_DEV) as client:
        with pytest.raises(HttpResponseError) as no_agent:
            await run(client, vm_id(SUB_DEV, "rg-dev-apps", "avma-2022-dc-noagent"), detect_body())
    async with compute(simulator, monkeypatch, SUB_PROD) as client:
        with pytest.raises(HttpResponseError) as linux:
            await run(client, vm_id(SUB_PROD, "rg-prod-web", "lnx-web-01"), detect_body())
    assert stopped.value.status_code == 409 and stopped.value.error is not None
    assert stopped.value.error.code == "OperationNotAllowed"
    # accepted, then the operation fails as Azure reports an unresponsive agent
    assert no_agent.value.error is not None
    assert no_agent.value.error.code == "VMAgentStatusCommunicationError"
    assert simulator.counters()["runCommandsStarted"] == {
        vm_id(SUB_DEV, "rg-dev-apps", "avma-2022-dc-noagent"): 1
    }
    assert linux.value.status_code == 409 and linux.value.error is not None
    assert "does not match the target OS Linux" in str(linux.value.error.message)


async def test_lro_headers_and_next_links_on_the_wire(sim_factory: Callable[..., Simulator]) -> None:
    """What the SDK hides: integer Retry-After on the 202, fractional while polling, absolute links."""
    sim = sim_factory(latency_s=0.3, page_size=2)
    headers = {"Authorization": f"Bearer {sim.issue_token()}"}
    tls = ssl.create_default_context(cafile=sim.ca_bundle)
    base = f"{sim.arm_endpoint}{AVMA_2022_DC}"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(
            f"{base}/runCommand?api-version=2025-04-01", json=detect_body(), ssl=tls
        ) as posted:
            assert posted.status == 202
            status_url = posted.headers["Azure-AsyncOperation"]
            location = posted.headers["Location"]
            assert posted.headers["Retry-After"] == "0"  # the SDK reads this one as an int
        assert status_url.startswith(sim.arm_endpoint) and "monitor=true" in location
        async with http.get(status_url, ssl=tls) as polled:
            body = await polled.json()
            assert body["status"] == "InProgress" and "endTime" not in body
            assert 0 < float(polled.headers["Retry-After"]) <= 0.3
        async with http.get(location, ssl=tls) as early:
            assert early.status == 202
        await asyncio.sleep(0.32)
        async with http.get(status_url, ssl=tls) as polled:
            body = await polled.json()
            assert body["status"] == "Succeeded" and body["endTime"] > body["startTime"]
            assert "Retry-After" not in polled.headers
        async with http.get(location, ssl=tls) as final:
            value = (await final.json())["value"]
            assert MARKER in value[0]["message"] and value[1]["message"] == ""
        url = f"{sim.arm_endpoint}/subscriptions/{SUB_DEV}/providers/Microsoft.Compute/virtualMachines"
        async with http.get(f"{url}?api-version=2025-04-01&statusOnly=true", ssl=tls) as page:
            next_link = (await page.json())["nextLink"]
        assert next_link.startswith(url + "?")
        assert "api-version=2025-04-01" in next_link and "statusOnly=true" in next_link
        async with http.get(url, ssl=tls) as no_version:
            assert no_version.status == 400
            assert (await no_version.json())["error"]["code"] == "MissingApiVersionParameter"


# ------------------------------------------------------------------ remediation, as Windows does it


async def test_remediation_with_the_edition_s_key_licenses_the_vm(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        result = result_line(await run(client, AVMA_2022_DC, remediate_body(KEY_2022_DC)))
    assert [s["name"] for s in result["steps"]] == [
        "install-key",
        "clear-kms-cache",
        "set-kms-host",
        "set-kms-port",
        "refresh",
        "activate",
    ]
    assert {s["hresult"] for s in result["steps"]} == {"0x00000000"}
    assert result["license"]["description"] == "Windows(R) Operating System, VOLUME_KMSCLIENT channel"
    assert result["license"]["discoveredKmsMachine"] == AZ_KMS
    assert simulator.state_dump()[AVMA_2022_DC] == {
        "os": "Windows",
        "powerState": "running",
        "editionId": "ServerDatacenter",
        "channel": "KMS_CLIENT",
        "licenseStatus": 1,
        "partialProductKey": "6VM33",
        "kmsHost": "azkms.core.windows.net:1688",
        "runCommands": 1,
        "changed": True,
    }


async def test_a_key_of_another_edition_fails_install_key_and_changes_nothing(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        result = result_line(await run(client, AVMA_2022_DC, remediate_body(KEY_2019_DC)))
    assert result["steps"] == [{"name": "install-key", "hresult": "0xC004F069"}]
    assert result["license"]["licenseStatus"] == 5
    state = simulator.state_dump()[AVMA_2022_DC]
    assert (state["channel"], state["changed"]) == ("AVMA", False)


async def test_an_unreachable_kms_fails_activation_with_0xc004f074(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with compute(simulator, monkeypatch, SUB_LEGACY) as client:
        detected = result_line(await run(client, AVMA_2022_NOKMS, detect_body()))
        result = result_line(await run(client, AVMA_2022_NOKMS, remediate_body(KEY_2022_DC)))
    assert detected["kmsProbe"]["reachable"] is False and detected["kmsProbe"]["error"]
    assert result["steps"][-1] == {"name": "activate", "hresult": "0xC004F074"}
    state = simulator.state_dump()[AVMA_2022_NOKMS]
    assert (state["channel"], state["licenseStatus"], state["changed"]) == ("KMS_CLIENT", 5, True)


async def test_kms_client_repair_sets_the_host_and_activates(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    repairable = vm_id(SUB_PROD, "rg-prod-data", "kms-2019-dc-unlic-nohost")
    async with compute(simulator, monkeypatch, SUB_PROD) as client:
        result = result_line(await run(client, repairable, remediate_body(None)))
    assert result["steps"][0]["name"] == "clear-kms-cache"  # no key installed
    assert simulator.state_dump()[repairable]["licenseStatus"] == 1


def test_guest_checks_parameters_like_the_script() -> None:
    guest = _guest(Estate.default(), AVMA_2022_DC)
    bad = result_line(
        guest.run_script(["# avma-remediator guest script: detect v2"], [{"name": "KmsHost", "value": "a b"}])
    )
    assert bad["os"] is None and bad["error"]["step"] == "parameters"
    assert bad["error"]["hresult"] == "0x80070057"
    assert bad["error"]["message"] == "KmsHost is not a host name; KmsPort is not a port number"
    lower = remediate_body(KEY_2022_DC.lower())["parameters"]
    refused = result_line(guest.run_script(["# avma-remediator guest script: remediate v2"], lower))
    assert refused["error"]["message"] == "ProductKey is not a product key" and refused["steps"] == []
    assert guest.channel == "AVMA"
    assert guest.run_script(["Write-Output hello"], []) == ""  # not ours: no marker line


def test_guest_key_rules_are_windows_rules() -> None:
    estate = Estate.default()
    guest = _guest(estate, AVMA_2022_DC)
    invalid = result_line(guest.run_script(*_remediate_args("BBBBB-BBBBB-BBBBB-BBBBB-BBBBB")))
    assert invalid["steps"] == [{"name": "install-key", "hresult": "0xC004F050"}]
    kept = result_line(guest.run_script(*_remediate_args(None)))  # no new key: AVMA cannot activate in Azure
    assert kept["steps"][-1] == {"name": "activate", "hresult": "0xC004FD02"}
    multi = _guest(estate, vm_id(SUB_DEV, "rg-avd", "avd-multisession-01"))
    result_line(multi.run_script(*_remediate_args("NPPR9-FWDCX-D2C8J-H872K-2YT43")))
    assert (multi.edition_id, multi.sku) == ("Enterprise", 4)  # the irreversible change Microsoft warns of
    old = _guest(estate, vm_id(SUB_LEGACY, "rg-migrated-legacy", "kms-2008r2-std-unlic"))
    facts = result_line(old.run_script(*_remediate_args("YC6KT-GKW9T-YTKYR-T4X34-R7VHC")))
    assert facts["license"]["productKeyChannel"] is None  # no such property before Windows 8
    assert facts["license"]["name"] == "Windows Server(R), ServerStandard edition"
    assert facts["license"]["licenseStatus"] == 1
    assert (
        base_edition("ServerDatacenterCor") == "ServerDatacenter"
        and base_edition("ServerRdsh") == "ServerRdsh"
    )
    assert key_for("KMS_CLIENT", "ServerTurbine", 26100) == "XGN3F-F394H-FD2MY-PP6FD-8MCRC"
    assert sum(info.channel == "AVMA" for info in KEYS.values()) == 15  # 2012 R2 to 2025, as published


def _guest(estate: Estate, vm: str) -> WindowsGuest:
    spec = estate.get(vm)
    assert spec is not None and spec.guest is not None
    return WindowsGuest.from_spec(spec.guest, cloud=estate.cloud, seed=spec.key)


def _remediate_args(key: str | None) -> tuple[list[str], list[dict[str, str]]]:
    body = remediate_body(key)
    return body["script"], body["parameters"]


# ------------------------------------------------------------------ estates


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda d: d["vms"][0].update(colour="blue"), "$.vms[0].colour"),
        (lambda d: d["vms"][0].update(agentReady="yes"), "$.vms[0].agentReady"),
        (
            lambda d: d["vms"][0].update(id="/subscriptions/x/resourceGroups/r/virtualMachines/v"),
            "$.vms[0].id",
        ),
        (lambda d: d["vms"][1].update(id=d["vms"][0]["id"].upper()), "$.vms[1].id"),
        (lambda d: d["vms"][0].pop("guest"), "$.vms[0].guest"),
        (lambda d: d["vms"][0]["guest"].update(licenseStatus=7), "$.vms[0].guest.licenseStatus"),
        (lambda d: d["vms"][0]["guest"].update(build=True), "$.vms[0].guest.build"),
        (lambda d: d["vms"][0]["guest"].update(kmsHost="kms.contoso.local"), "$.vms[0].guest.kmsHost"),
        (lambda d: d["vms"][0]["guest"].update(channel="TIMEBASED"), "$.vms[0].guest.channel"),
        (lambda d: d["vms"][0]["guest"].pop("kmsReachable"), "$.vms[0].guest.kmsReachable"),
        (lambda d: d["vms"][0]["tags"].update(owner=3), "$.vms[0].tags.owner"),
        (lambda d: d["vms"][0].update(powerState="hibernated"), "$.vms[0].powerState"),
        (lambda d: d["vms"][0].update(createOption="Empty"), "$.vms[0].createOption"),
        (lambda d: d["subscriptions"].pop(1), "$.vms[1].id"),
        (lambda d: d.update(vms={}), "$.vms"),
    ],
)
def test_estate_validation_names_the_json_path(change: Callable[[dict[str, Any]], None], path: str) -> None:
    data = _estate_dict()
    change(data)
    with pytest.raises(EstateError) as error:
        Estate.from_dict(data)
    assert error.value.path == path


def test_linux_vms_have_no_guest_and_files_must_be_json(tmp_path: Any) -> None:
    data = _estate_dict()
    data["vms"][2]["guest"] = data["vms"][0]["guest"]
    with pytest.raises(EstateError, match=r"\$\.vms\[2\]\.guest"):
        Estate.from_dict(data)
    broken = tmp_path / "estate.json"
    broken.write_text('{"vms": [')
    with pytest.raises(EstateError) as error:
        Estate.load(broken)
    assert error.value.path == "$"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_estate_dict()))
    assert [vm.name for vm in Estate.load(good).vms] == ["a", "b", "c"]


def test_generator_is_deterministic_and_counts_are_exact() -> None:
    mix = {"avma": 0.05, "linux": 0.2, "multi_session": 0.01, "kms_custom": 0.02}
    one = Estate.generate(count=2000, seed=7, mix=mix, subscriptions=3)
    two = Estate.from_dict({"generate": {"count": 2000, "seed": 7, "mix": mix, "subscriptions": 3}})
    other = Estate.generate(count=2000, seed=8, mix=mix, subscriptions=3)
    assert one.to_dict() == two.to_dict()
    assert one.to_dict() != other.to_dict()
    assert len(one.vms) == 2000 and len(one.subscriptions) == 3
    windows = [vm.guest for vm in one.vms if vm.guest is not None]
    assert sum(g.channel == "AVMA" and g.edition_id != "ServerRdsh" for g in windows) == 100
    assert sum(vm.os == "Linux" for vm in one.vms) == 400
    assert sum(g.edition_id == "ServerRdsh" for g in windows) == 20
    assert Estate.from_dict(one.to_dict()).to_dict() == one.to_dict()  # a generated estate can be saved
    with pytest.raises(EstateError) as unknown:
        Estate.generate(count=10, seed=1, mix={"avmaa": 0.1})
    assert unknown.value.path == "$.generate.mix.avmaa"
    with pytest.raises(EstateError, match="more than 1"):
        Estate.generate(count=10, seed=1, mix={"avma": 0.7, "linux": 0.7})


def test_default_estate_covers_every_case_the_engine_must_meet() -> None:
    estate = Estate.default()
    assert len(estate.vms) >= 50 and len(estate.subscriptions) == 3
    avma: list[Any] = [vm for vm in estate.vms if vm.guest is not None and vm.guest.channel == "AVMA"]
    fixable = [
        vm
        for vm in avma
        if vm.power_state == "running"
        and vm.agent_ready
        and vm.guest
        and vm.guest.kms_reachable
        and vm.guest.network_reachable
    ]

    def editions(vms: list[Any]) -> set[tuple[int, str]]:
        return {(vm.guest.build, vm.guest.edition_id) for vm in vms}

    for build in (9600, 14393, 17763, 20348, 26100):
        assert {(build, "ServerStandard"), (build, "ServerDatacenter")} <= editions(fixable)
    assert {(20348, "ServerTurbine"), (26100, "ServerTurbine")} <= editions(fixable)
    assert {(14393, "ServerSolution"), (17763, "ServerSolution")} & editions(fixable)
    assert any(vm.guest.sku in (12, 13) for vm in fixable)  # Server Core
    assert sum(not (vm.guest.kms_reachable and vm.guest.network_reachable) for vm in avma) >= 3
    assert any(vm.power_state == "deallocated" for vm in avma)
    assert any(vm.power_state == "running" and not vm.agent_ready for vm in avma)
    assert any(vm.tags.get("avma-remediator-opt-out") == "true" for vm in avma)
    assert any(vm.busy_seconds > 0 for vm in avma)
    # Windows has no AVMA before 2012 R2, nor on a client or multi-session edition.
    assert all(vm.guest.build >= 9600 and vm.guest.product_type != 1 for vm in avma)
    assert all(
        avma_problem(vm.guest.edition_id, vm.guest.build, vm.guest.product_type) is None for vm in avma
    )
    guests = [vm.guest for vm in estate.vms if vm.guest is not None]
    multi = [g for g in guests if g.edition_id == "ServerRdsh"]
    assert multi and (multi[0].sku, multi[0].product_type, multi[0].channel) == (175, 3, "KMS_CLIENT")
    assert multi[0].caption == "Microsoft Windows 11 Enterprise multi-session"
    unknown = [vm.guest for vm in avma if vm.guest.sku == PRODUCT_UNLICENSED]
    assert [g.edition_id for g in unknown] == ["ServerStandard"]  # the catalog cannot match it
    # 2008 R2 and 2012: KMS clients to repair, and a stock 2008 R2 on Windows PowerShell 2.0.
    old = [g for g in guests if g.build in (7601, 9200)]
    assert {(g.build, g.channel) for g in old if g.license_status != 1} == {
        (7601, "KMS_CLIENT"),
        (9200, "KMS_CLIENT"),
    }
    assert [g.ps_version for g in old if g.build == 7601] == ["5.1", None]  # None: the stock 2.0
    assert any(g.edition_id == "ServerTurbine" and not g.imds_chain_valid for g in guests)
    kms = [vm.guest for vm in estate.vms if vm.guest is not None and vm.guest.channel == "KMS_CLIENT"]
    assert any(g.license_status == 1 and g.kms_host == AZ_KMS for g in kms)
    assert any(g.license_status != 1 and g.kms_host is None for g in kms)
    assert any(g.license_status != 1 and g.kms_host == AZ_KMS for g in kms)
    assert any(g.license_status != 1 and g.kms_host == "kms.contoso.local" for g in kms)
    assert {g.edition_id for g in kms if g.product_type == 1} == {"Enterprise"}
    for channel in ("RETAIL", "MAK", "OEM"):
        statuses = {vm.guest.license_status for vm in estate.vms if vm.guest and vm.guest.channel == channel}
        assert 1 in statuses and statuses - {1}
    assert sum(vm.os == "Linux" for vm in estate.vms) >= 2


def _estate_dict() -> dict[str, Any]:
    sub_a, sub_b = "11111111-2222-4333-8444-555555555555", "66666666-7777-4888-8999-000000000000"
    guest = {
        "caption": "Microsoft Windows Server 2019 Standard",
        "build": 17763,
        "productType": 3,
        "editionId": "ServerStandard",
        "sku": 7,
        "channel": "AVMA",
        "licenseStatus": 5,
        "kmsHost": None,
        "kmsReachable": True,
    }
    return {
        "subscriptions": [sub_a, sub_b],
        "vms": [
            {
                "id": vm_id(sub_a, "rg", "a"),
                "os": "Windows",
                "powerState": "running",
                "agentReady": True,
                "tags": {},
                "guest": dict(guest),
            },
            {
                "id": vm_id(sub_b, "rg", "b"),
                "os": "Windows",
                "powerState": "running",
                "agentReady": True,
                "tags": {},
                "guest": dict(guest, kmsHost="azkms.core.windows.net:1688", channel="KMS_CLIENT"),
            },
            {
                "id": vm_id(sub_a, "rg", "c"),
                "os": "Linux",
                "powerState": "stopped",
                "agentReady": False,
                "tags": {},
            },
        ],
    }


# ------------------------------------------------------------------ Log Analytics and Resource Graph


def test_estate_takes_a_computer_name_and_logs_without_a_resource_id() -> None:
    data = _estate_dict()
    data["vms"][0].update(computerName="APP-A", logResourceId=False)
    estate = Estate.from_dict(data)
    vm = estate.vms[0]
    assert (vm.hostname, vm.log_resource_id) == ("APP-A", False)
    assert estate.vms[1].hostname == "b" and estate.vms[1].log_resource_id
    assert Estate.from_dict(estate.to_dict()).to_dict() == estate.to_dict()
    for bad, path in [
        ({"computerName": "app.contoso"}, "$.vms[0].computerName"),
        ({"computerName": "sixteen-chars-xx"}, "$.vms[0].computerName"),
        ({"computerName": "12345"}, "$.vms[0].computerName"),
        ({"logResourceId": "no"}, "$.vms[0].logResourceId"),
    ]:
        data = _estate_dict()
        data["vms"][0].update(bad)
        with pytest.raises(EstateError) as error:
            Estate.from_dict(data)
        assert error.value.path == path


async def test_log_analytics_and_resource_graph_on_the_wire(simulator: Simulator) -> None:
    """What the SDKs hide: audience checks, the PartialError body, $top limits, skip tokens, table format."""
    tls = ssl.create_default_context(cafile=simulator.ca_bundle)
    la_url = f"{simulator.env()['LOG_ANALYTICS_ENDPOINT']}/workspaces/{simulator.workspace_id}/query"
    spp = {"query": SPP_QUERY}  # the engine's scan
    la = {"Authorization": f"Bearer {simulator.issue_token('https://api.loganalytics.io')}"}
    arm = {"Authorization": f"Bearer {simulator.issue_token()}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(la_url, json=spp, ssl=tls) as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["error"]["code"] == "AuthorizationRequiredError"
        async with http.post(la_url, json=spp, headers=arm, ssl=tls) as wrong_audience:
            assert wrong_audience.status == 403
        async with http.post(la_url, json={**spp, "timespan": "PT1H"}, headers=la, ssl=tls) as answered:
            body = await answered.json()
        table = body["tables"][0]
        assert [c["type"] for c in table["columns"]] == ["string", "string", "datetime", "long"]
        avma = {vm.id.lower() for vm in simulator.estate.vms if vm.guest and vm.guest.channel == "AVMA"}
        assert {row[0] for row in table["rows"]} == avma and "error" not in body
        async with http.post(
            la_url, json={**spp, "timespan": "P1D/2020-01-01T00:00:00Z"}, headers=la, ssl=tls
        ) as old:
            assert (await old.json())["tables"][0]["rows"] == []
        simulator.set_log_partial_error(True)
        async with http.post(la_url, json=spp, headers=la, ssl=tls) as partial:
            body = await partial.json()
        assert (
            body["error"]["code"] == "PartialError" and len(body["tables"][0]["rows"]) == (len(avma) + 1) // 2
        )
        async with http.post(la_url, json={"query": "Perf | take 2"}, headers=la, ssl=tls) as other:
            assert other.status == 400 and (await other.json())["error"]["code"] == "BadArgumentError"

        graph = f"{simulator.arm_endpoint}/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
        query = "Resources | where type =~ 'microsoft.compute/virtualmachines' | where tostring(properties.storageProfile.osDisk.osType) =~ 'Windows' | project id, name | order by id asc"
        async with http.post(
            graph, json={"query": query, "options": {"$top": 1001}}, headers=arm, ssl=tls
        ) as big:
            assert big.status == 400
        request = {
            "query": query,
            "subscriptions": [SUB_DEV],
            "options": {"$top": 3, "resultFormat": "table"},
        }
        async with http.post(graph, json=request, headers=arm, ssl=tls) as first:
            page = await first.json()
        dev = sorted(
            vm.id for vm in simulator.estate.vms if vm.os == "Windows" and vm.subscription_id == SUB_DEV
        )
        assert (page["totalRecords"], page["count"], page["resultTruncated"]) == (len(dev), 3, "false")
        assert [c["name"] for c in page["data"]["columns"]] == ["id", "name"]
        assert [row[0] for row in page["data"]["rows"]] == dev[:3]
        request["options"] = {"$skipToken": page["$skipToken"]}
        async with http.post(graph, json=request, headers=arm, ssl=tls) as second:
            rest = await second.json()
        assert [row["id"] for row in rest["data"]] == dev[3:] and "$skipToken" not in rest
        async with http.post(graph, json={"query": "Resources | take 1"}, headers=arm, ssl=tls) as unknown:
            assert unknown.status == 400
    assert simulator.counters()["requests"]["resource_graph"] == 4


# ------------------------------------------------------------------ what Windows can be


def _estate_with(**guest: Any) -> Estate:
    data = _estate_dict()
    data["vms"][0]["guest"].update(guest)
    return Estate.from_dict(data)


def _rejected(**guest: Any) -> EstateError:
    with pytest.raises(EstateError) as error:
        _estate_with(**guest)
    return error.value


def _first_guest(estate: Estate) -> WindowsGuest:
    vm = estate.vms[0]
    assert vm.guest is not None
    return WindowsGuest.from_spec(vm.guest, cloud=estate.cloud, seed=vm.key)


SERVER_2008R2_DC = {
    "caption": "Microsoft Windows Server 2008 R2 Datacenter ",
    "build": 7601,
    "editionId": "ServerDatacenter",
    "sku": 8,
}


@pytest.mark.parametrize(
    "guest",
    [
        SERVER_2008R2_DC,  # AVMA came with Server 2012 R2
        {"caption": "Microsoft Windows Server 2012 Standard", "build": 9200},
        {"caption": "Microsoft Windows Storage Server 2016 Standard", "build": 14393,
         "editionId": "ServerStorageStandard", "sku": 21},
        {"caption": "Microsoft Windows Server 2022 Datacenter Evaluation", "build": 20348,
         "editionId": "ServerDatacenterEval", "sku": 80},
        {"caption": "Microsoft Windows Server 2022 Essentials", "build": 20348,
         "editionId": "ServerSolution", "sku": 50},  # no AVMA key for Essentials after 2019
        {"caption": "Microsoft Windows 11 Enterprise multi-session", "build": 22631,
         "editionId": "ServerRdsh", "sku": 175},
        {"caption": "Microsoft Windows 11 Enterprise", "build": 22631, "productType": 1,
         "editionId": "Enterprise", "sku": 4},
    ],
)  # fmt: skip
def test_the_estate_refuses_avma_where_windows_has_none(guest: dict[str, Any]) -> None:
    error = _rejected(channel="AVMA", **guest)
    assert error.path == "$.vms[0].guest.channel"
    assert "automatic-vm-activation.md" in error.message
    _estate_with(
        **dict(guest, channel="KMS_CLIENT", productType=guest.get("productType", 3), psVersion="5.1")
    )


def test_avma_is_accepted_on_every_edition_the_avma_page_lists() -> None:
    for build, edition in [(9600, "ServerSolution"), (16299, "ServerDatacenter"), (18363, "ServerStandard"),
                           (20348, "ServerTurbine"), (26100, "ServerTurbine"), (26100, "ServerStandard"),
                           (17763, "ServerDatacenterCor"), (20348, "ServerHypothetical")]:  # fmt: skip
        # ServerHypothetical: an EditionID no table knows (a newer edition) is not judged.
        _estate_with(channel="AVMA", build=build, editionId=edition)
    every = {name: 1 / len(CATEGORIES) for name in CATEGORIES}
    generated = Estate.generate(count=len(CATEGORIES) * 40, seed=11, mix=every)
    avma = [vm.guest for vm in generated.vms if vm.guest is not None and vm.guest.channel == "AVMA"]
    assert len(avma) >= 6 * 40
    assert all(avma_problem(g.edition_id, g.build, g.product_type) is None for g in avma)
    assert not any(g.edition_id == "ServerRdsh" for g in avma)


def _guard(script: str, version: str) -> str:
    return (
        'AVMA-REMEDIATOR-RESULT {"schema":2,"script":"' + script + '","os":null,"license":null,'
        '"kmsProbe":null,"attestation":null,"steps":[],"error":{"step":"powershell-version",'
        '"hresult":"0x80070032","message":"Windows PowerShell ' + version + ' is older than 3.0"}}'
    )


def test_windows_powershell_older_than_3_answers_with_the_guard_line_and_changes_nothing() -> None:
    guest = _first_guest(_estate_with(**SERVER_2008R2_DC, channel="KMS_CLIENT"))
    assert guest.ps_version == "2.0"  # a stock 2008 R2
    before = guest.licensing()
    assert guest.run_script(*_remediate_args(None)) == _guard("remediate", "2.0")
    assert guest.run_script(*_remediate_args("74YFP-3QFB3-KQT8W-PMXWJ-7M648")) == _guard("remediate", "2.0")
    body = detect_body(host="not a host")  # the guard runs before the parameter checks
    assert guest.run_script(body["script"], body["parameters"]) == _guard("detect", "2.0")
    assert guest.licensing() == before
    server_2008 = {
        "caption": "Microsoft Windows Server (R) 2008 Standard ",
        "build": 6002,
        "editionId": "ServerStandard",
    }
    old = _first_guest(_estate_with(**server_2008, channel="KMS_CLIENT"))  # no $PSVersionTable in 1.0
    assert (old.ps_version, old.run_script(body["script"], body["parameters"])) == (
        "1.0",
        _guard("detect", "1.0"),
    )
    parsed = parse_result(_guard("detect", "2.0"), expected_script="detect")  # the engine reads it
    assert parsed.error is not None and parsed.error.step == "powershell-version"
    updated = _first_guest(_estate_with(**SERVER_2008R2_DC, channel="KMS_CLIENT", psVersion="5.1"))
    assert result_line(updated.run_script(*_remediate_args(None)))["steps"][-1]["name"] == "activate"


def test_powershell_versions_are_those_each_windows_can_have() -> None:
    assert [default_ps_version(b, 3) for b in (7601, 9200, 9600, 14393, 26100)] == [
        "2.0",
        "3.0",
        "4.0",
        "5.1",
        "5.1",
    ]
    assert default_ps_version(10240, 1) == "5.0"  # Windows 10 before 1607
    for build, product_type, version in [(7600, 3, "3.0"), (7601, 3, "6.0"), (9200, 3, "2.0"),
                                         (9200, 1, "4.0"), (9600, 3, "3.0"), (14393, 3, "5.0"),
                                         (17763, 3, "7.4"), (6002, 3, "4.0")]:  # fmt: skip
        error = _rejected(build=build, productType=product_type, channel="KMS_CLIENT", psVersion=version)
        assert error.path == "$.vms[0].guest.psVersion", (build, version)
    for build, version in [(7601, "5.1"), (7601, "3.0"), (9200, "5.1"), (9600, "5.0"), (6002, "3.0")]:
        assert _estate_with(build=build, channel="KMS_CLIENT", psVersion=version).vms[0].guest is not None


AZURE_2022 = {
    "caption": "Microsoft Windows Server 2022 Datacenter: Azure Edition",
    "build": 20348,
    "editionId": "ServerTurbine",
    "sku": 407,
}


def test_azure_edition_reports_attestation_and_other_editions_null() -> None:
    def attestation(**guest: Any) -> Any:
        body = detect_body()
        output = _first_guest(_estate_with(**guest)).run_script(body["script"], body["parameters"])
        parse_result(output, expected_script="detect")  # the engine's parser takes it
        return result_line(output)["attestation"]

    assert attestation(**AZURE_2022) == {"imdsReachable": True, "chainValid": True, "error": None}
    assert attestation(**dict(AZURE_2022, editionId="ServerTurbineCor", sku=408))["chainValid"] is True
    no_imds = attestation(**AZURE_2022, imdsReachable=False)
    assert (no_imds["imdsReachable"], no_imds["chainValid"]) == (False, None) and no_imds["error"]
    broken = attestation(**AZURE_2022, imdsChainValid=False)
    assert (broken["imdsReachable"], broken["chainValid"]) == (True, False) and broken["error"]
    assert attestation() is None  # 2019 Standard
    assert _rejected(imdsReachable=False).path == "$.vms[0].guest.imdsReachable"
    assert _rejected(**AZURE_2022, imdsChainValid="no").path == "$.vms[0].guest.imdsChainValid"


def test_a_product_with_a_null_name_or_description_is_reported_with_empty_text() -> None:
    body = detect_body()
    guest = _first_guest(_estate_with(productName=None, productDescription=None))
    license_ = result_line(guest.run_script(body["script"], body["parameters"]))["license"]
    assert (license_["name"], license_["description"]) == ("", "")
    named = _first_guest(_estate_with(productDescription=None))
    license_ = result_line(named.run_script(body["script"], body["parameters"]))["license"]
    assert license_["name"] == "Windows(R), ServerStandard edition" and license_["description"] == ""
    assert _rejected(productName="Windows").path == "$.vms[0].guest.productName"
    estate = _estate_with(productName=None)
    assert Estate.from_dict(estate.to_dict()).to_dict() == estate.to_dict()


def test_the_estate_takes_every_value_windows_can_report_and_nothing_more() -> None:
    unlicensed = _estate_with(sku=PRODUCT_UNLICENSED, graceMinutes=0xFFFFFFFF)
    body = detect_body()
    facts = result_line(_first_guest(unlicensed).run_script(body["script"], body["parameters"]))
    assert (facts["os"]["sku"], facts["license"]["graceMinutes"]) == (0xABCDABCD, 0xFFFFFFFF)
    old = _first_guest(_estate_with(build=6002, channel="KMS_CLIENT", psVersion="3.0"))
    assert result_line(old.run_script(body["script"], body["parameters"]))["os"]["version"] == "6.0.6002"
    for guest, key in [
        ({"sku": 2**32}, "sku"),
        ({"sku": -1}, "sku"),
        ({"graceMinutes": 2**32}, "graceMinutes"),
        ({"licenseStatus": 7}, "licenseStatus"),
        ({"productType": 0}, "productType"),
        ({"productType": 4}, "productType"),
        ({"kmsHost": "azkms.core.windows.net:0"}, "kmsHost"),
        ({"kmsHost": "azkms.core.windows.net:65536"}, "kmsHost"),
        (
            {"partialProductKey": "AAAAA"},
            "partialProductKey",
        ),  # A, E, I, L, O, S, U, Z, 0, 1, 5: never in a key
        ({"partialProductKey": "6VM3"}, "partialProductKey"),
        ({"psVersion": 5.1}, "psVersion"),
        ({"build": 70000}, "build"),
    ]:
        assert _rejected(**guest).path == f"$.vms[0].guest.{key}", guest
