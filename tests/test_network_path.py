"""The Azure-side path check (issue 11): the real azure-mgmt-network aio client against the simulator,
one VM per cause, and the healthy cases; the simulator's own guest reachability agrees with it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.identity.aio import ManagedIdentityCredential

from shared.azure.compute import ComputeGateway
from shared.azure.network import NetworkGateway
from shared.kms_endpoints import kms_of
from shared.model import VmId
from shared.network_fix import fix_for
from shared.network_path import (
    INTERNAL_LB,
    NSG_DENY,
    PRIVATE_SUBNET,
    RETIRED_ONLY,
    ROUTE_APPLIANCE,
    ROUTE_GATEWAY,
    ROUTE_NONE,
    PathVerdict,
)
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.network_estate import ILB, NSG, RT_HUB, RT_LEGACY, RT_NONE, SPOKE, VMS, network_estate, vm_id

PUBLIC = kms_of("AzureCloud")


@pytest.fixture(scope="module")
def verdicts() -> Iterator[tuple[dict[str, PathVerdict], Estate, int]]:
    estate = Estate.from_dict(network_estate())
    with Simulator(estate, latency_s=0.01) as sim, pytest.MonkeyPatch.context() as patch:
        for key, value in sim.env().items():
            patch.setenv(key, value)
        settings = Settings.from_env(sim.env())

        async def run() -> tuple[dict[str, PathVerdict], int]:
            async with (
                ManagedIdentityCredential() as credential,
                ComputeGateway(credential, settings) as compute,
                NetworkGateway(credential, settings) as network,
            ):
                vms = [await compute.get_vm(VmId.parse(vm_id(name))) for name in VMS]
                found = await asyncio.gather(*(network.path(vm) for vm in vms))
                return dict(zip(VMS, found, strict=True)), network.requests

        found, requests = asyncio.run(run())
        yield found, estate, requests


def one(verdict: PathVerdict) -> Any:
    assert verdict.state == "blocked", verdict
    (finding,) = verdict.findings
    return finding


@pytest.mark.parametrize(
    ("vm", "cause", "resource", "text"),
    [
        (
            "vm-nva",
            ROUTE_APPLIANCE,
            RT_HUB,
            "route 0.0.0.0/0 → VirtualAppliance 10.0.0.4 in route table rt-hub (subnet app-nva)",
        ),
        (
            "vm-none",
            ROUTE_NONE,
            RT_NONE,
            "route 0.0.0.0/0 → None in route table rt-blackhole (subnet app-none)",
        ),
        (
            "vm-private",
            PRIVATE_SUBNET,
            f"{SPOKE}/subnets/app-private",
            "subnet app-private is private (defaultOutboundAccess false) and has no NAT gateway",
        ),
        ("vm-ilb", INTERNAL_LB, ILB, "behind the Standard internal load balancer ilb-app only"),
        (
            "vm-retired",
            RETIRED_ONLY,
            RT_LEGACY,
            "routes exist for 23.102.135.246 only, not for 20.118.99.224 and 40.83.235.53",
        ),
        (
            "vm-gateway",
            ROUTE_GATEWAY,
            "/subnets/app",
            "route 0.0.0.0/0 → VirtualNetworkGateway learned from the virtual network gateway over BGP",
        ),
        (
            "vm-nsg",
            NSG_DENY,
            NSG,
            "rule deny-licensing (priority 4000) denies TCP 1688 to 20.118.99.224 and 40.83.235.53 "
            "(a deny of the service tag AzurePlatformLKM",
        ),
    ],
)
def test_each_cause_is_named_with_the_resource_at_fault(
    verdicts: tuple[dict[str, PathVerdict], Estate, int], vm: str, cause: str, resource: str, text: str
) -> None:
    found, estate, _ = verdicts
    finding = one(found[vm])
    assert finding.cause == cause
    assert finding.resource_id.endswith(resource) and text in finding.text
    # Azure's side of the simulation agrees: this guest cannot reach the KMS
    assert estate.get(vm_id(vm)).guest.network_reachable is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("vm", "outbound"),
    [("vm-nat", "nat-gateway"), ("vm-pip", "public-ip"), ("vm-default", "default-outbound-access")],
)
def test_the_healthy_paths_are_ok(
    verdicts: tuple[dict[str, PathVerdict], Estate, int], vm: str, outbound: str
) -> None:
    found, estate, _ = verdicts
    assert (found[vm].state, found[vm].outbound, found[vm].findings) == ("ok", outbound, ())
    assert estate.get(vm_id(vm)).guest.network_reachable is True  # type: ignore[union-attr]
    if outbound == "default-outbound-access":  # the system route to Internet, and a warning
        assert "31 March 2026" in found[vm].note


def test_an_in_guest_block_has_a_clear_azure_path(
    verdicts: tuple[dict[str, PathVerdict], Estate, int],
) -> None:
    found, estate, _ = verdicts
    assert found["vm-firewalled"].state == "ok"
    guest = estate.get(vm_id("vm-firewalled")).guest
    assert guest is not None and guest.network_reachable and not guest.kms_reachable


def test_shared_resources_are_read_once_per_run(verdicts: tuple[dict[str, PathVerdict], Estate, int]) -> None:
    found, _, requests = verdicts
    # per VM: the NIC, the effective-routes POST and one poll; per shared resource one GET
    # (10 subnets, 3 route tables, 1 load balancer, 1 NSG)
    assert requests <= 3 * len(found) + 15 + 3  # a few extra polls on a slow machine


def test_the_fixes_are_the_exact_commands() -> None:
    from shared.network_path import Finding

    route = Finding(ROUTE_APPLIANCE, RT_HUB, "", PUBLIC.required, f"{SPOKE}/subnets/app-nva", "westeurope")
    commands = fix_for(route, PUBLIC)
    sub = RT_HUB.split("/")[2]
    assert commands == [
        f"az network route-table route create --subscription {sub} --resource-group rg-net --route-table-name rt-hub "
        f"--name azure-kms-{ip.replace('.', '-')} --address-prefix {ip}/32 --next-hop-type Internet"
        for ip in ("20.118.99.224", "40.83.235.53")
    ]
    private = Finding(
        PRIVATE_SUBNET, f"{SPOKE}/subnets/app-private", "", (), f"{SPOKE}/subnets/app-private", "westeurope"
    )
    assert fix_for(private, PUBLIC)[-1] == (
        f"az network vnet subnet update --subscription {sub} --resource-group rg-net --vnet-name vnet-spoke "
        "--name app-private --nat-gateway nat-app-private"
    )
    bgp = Finding(
        ROUTE_GATEWAY, f"{SPOKE}/subnets/app", "", PUBLIC.required, f"{SPOKE}/subnets/app", "westeurope"
    )
    assert fix_for(bgp, PUBLIC)[0].startswith("az network route-table create ")
    assert fix_for(bgp, PUBLIC)[-1].endswith(
        "--vnet-name vnet-spoke --name app --route-table rt-azure-kms-app"
    )
    nsg = Finding(NSG_DENY, NSG, "", PUBLIC.required, f"{SPOKE}/subnets/app-nsg", "westeurope", 4000)
    assert fix_for(nsg, PUBLIC) == [
        f"az network nsg rule create --subscription {sub} --resource-group rg-net --nsg-name nsg-locked "
        "--name allow-azure-kms-3999 --priority 3999 --direction Outbound --access Allow --protocol Tcp "
        "--destination-address-prefixes 20.118.99.224/32 40.83.235.53/32 --destination-port-ranges 1688"
    ]


# ------------------------------------------------------------------ the engine end to end (CLI)


def sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, licensed: tuple[str, ...] = ()
) -> Any:
    from shared.cli import main

    estate = tmp_path / "estate.json"
    estate.write_text(json.dumps(network_estate(licensed=licensed)))
    main(["sweep", "--simulate", str(estate), "--sim-latency", "0.01", *args])
    return capsys.readouterr().out


def test_apply_rekeys_unlicensed_vms_and_their_outcomes_carry_the_diagnosis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = json.loads(sweep(tmp_path, capsys, "--apply", "--output", "json", licensed=("vm-nva-2",)))
    vms = {vm["id"].rsplit("/", 1)[-1]: vm for vm in out["vms"]}
    for name in ("vm-nva", "vm-none", "vm-private", "vm-ilb", "vm-retired", "vm-gateway", "vm-nsg"):
        vm = vms[name]
        assert (vm["outcome"], vm["reason"], vm["kmsCause"]) == (
            "failed",
            "activation-error:0xC004F074",
            "azure",
        )
        assert vm["channelAfter"] == "KMS_CLIENT"  # re-keyed: no worse off, activates once routed
        (finding,) = vm["kmsPath"]["findings"]
        assert (
            finding["text"][1:] in vm["hint"]
            and finding["fix"]
            and all(c in vm["hint"] for c in finding["fix"])
        )
    # a still-licensed AVMA VM behind the same NVA keeps its activation, with the same diagnosis
    kept = vms["vm-nva-2"]
    assert (kept["outcome"], kept["reason"], kept["channel"]) == ("deferred", "kms-unreachable", "AVMA")
    assert kept["kmsPath"]["findings"][0]["cause"] == ROUTE_APPLIANCE and "re-key waits" in kept["hint"]
    # Azure's path is clear, the guest still cannot connect: said to be inside the guest
    inside = vms["vm-firewalled"]
    assert (inside["outcome"], inside["kmsCause"], inside["kmsPath"]["state"]) == ("failed", "in-guest", "ok")
    assert "inside the guest" in inside["hint"] and "Windows Firewall" in inside["hint"]
    # healthy paths: remediated, never checked (the probe connected)
    for name in ("vm-nat", "vm-pip", "vm-default"):
        assert vms[name]["outcome"] == "remediated" and "kmsPath" not in vms[name]
    # what the ledger stores stays within its details cap
    from shared.ledger._table import DETAILS_MAX_CHARS

    assert max(len(json.dumps(vm)) for vm in out["vms"]) < DETAILS_MAX_CHARS


def test_the_audit_shows_the_blocked_path_and_what_to_do_once_per_resource(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = sweep(tmp_path, capsys)
    assert "avma-kms-unreachable" in table
    assert (
        "KMS path, route-to-appliance (2 VMs: vm-nva (would-remediate: avma-kms-unreachable), "
        "vm-nva-2 (would-remediate: avma-kms-unreachable))"
    ) in table
    assert table.count("--route-table-name rt-hub --name azure-kms-20-118-99-224") == 1
    assert "Fix once for both (not applied; run as a network admin):" in table
    assert (
        "KMS path, internal-load-balancer-only (1 VM: vm-ilb (would-remediate: avma-kms-unreachable))"
        in table
    )
    assert "--nat-gateway nat-app-ilb" in table
    assert "avma-kms-unreachable (cause inside the guest) (1 VM)" in table
    out = json.loads(sweep(tmp_path, capsys, "--output", "json"))
    vms = {vm["id"].rsplit("/", 1)[-1]: vm for vm in out["vms"]}
    assert (vms["vm-retired"]["outcome"], vms["vm-retired"]["reason"]) == (
        "would-remediate",
        "avma-kms-unreachable",
    )
    assert vms["vm-retired"]["kmsPath"]["findings"][0]["cause"] == RETIRED_ONLY


def test_the_network_sdk_is_not_imported_with_the_function_app() -> None:
    code = "import sys, function_app; sys.exit(int('azure.mgmt.network' in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, check=False).returncode
        == 0
    )


# ------------------------------------------------------------------ more shapes of network


def _small(network: dict[str, Any], nic: dict[str, Any] | None, reachable: bool = True) -> dict[str, Any]:
    from tests.estates import windows_vm

    extra = {"nic": nic} if nic is not None else {}
    return {"network": network, "vms": [windows_vm(vm_id("vm-x"), status=5, reachable=reachable, **extra)]}


def _verdict(estate: dict[str, Any]) -> PathVerdict:
    with Simulator(Estate.from_dict(estate), latency_s=0.01) as sim, pytest.MonkeyPatch.context() as patch:
        for key, value in sim.env().items():
            patch.setenv(key, value)
        settings = Settings.from_env(sim.env())

        async def run() -> PathVerdict:
            async with (
                ManagedIdentityCredential() as credential,
                ComputeGateway(credential, settings) as compute,
                NetworkGateway(credential, settings) as network,
            ):
                return await network.path(await compute.get_vm(VmId.parse(vm_id("vm-x"))))

        return asyncio.run(run())


VNET = {"id": SPOKE, "addressPrefixes": ["10.10.0.0/16"], "gatewayRoutes": ["0.0.0.0/0"]}


def test_a_public_standard_load_balancer_without_outbound_rules_gives_no_outbound() -> None:
    lb = SPOKE.replace("virtualNetworks/vnet-spoke", "loadBalancers/lb-web")
    network = {
        "virtualNetworks": [
            {**VNET, "gatewayRoutes": [], "subnets": [{"name": "web", "addressPrefix": "10.10.1.0/24"}]}
        ],
        "loadBalancers": [{"id": lb, "sku": "Standard", "public": True}],
    }
    verdict = _verdict(
        _small(network, {"subnet": f"{SPOKE}/subnets/web", "privateIp": "10.10.1.4", "loadBalancers": [lb]})
    )
    finding = one(verdict)
    assert (finding.cause, finding.resource_id) == ("load-balancer-no-outbound", lb)
    # with outbound rules it gives outbound
    network["loadBalancers"] = [{"id": lb, "sku": "Standard", "public": True, "outboundRules": True}]
    ok = _verdict(
        _small(network, {"subnet": f"{SPOKE}/subnets/web", "privateIp": "10.10.1.4", "loadBalancers": [lb]})
    )
    assert (ok.state, ok.outbound) == ("ok", "load-balancer")


def test_user_routes_for_the_kms_beat_bgp_forced_tunnelling_and_propagation_can_be_turned_off() -> None:
    table = SPOKE.replace("virtualNetworks/vnet-spoke", "routeTables/rt-kms")
    routes = [
        {"name": f"kms-{i}", "addressPrefix": f"{ip}/32", "nextHopType": "Internet"}
        for i, ip in enumerate(PUBLIC.required)
    ]
    subnet = {"name": "app", "addressPrefix": "10.10.1.0/24", "routeTable": table}
    network = {
        "virtualNetworks": [{**VNET, "subnets": [subnet]}],
        "routeTables": [{"id": table, "routes": routes}],
    }
    nic = {"subnet": f"{SPOKE}/subnets/app", "privateIp": "10.10.1.4"}
    assert _verdict(_small(network, nic)).state == "ok"  # /32 user routes win over the BGP 0.0.0.0/0
    network["routeTables"] = [{"id": table, "routes": [], "disableBgpRoutePropagation": True}]
    assert _verdict(_small(network, nic)).state == "ok"  # no BGP routes: the system route to Internet
    network["routeTables"] = [{"id": table, "routes": []}]
    assert one(_verdict(_small(network, nic))).cause == ROUTE_GATEWAY


def test_a_vm_whose_nic_is_not_served_is_unknown_not_ok() -> None:
    network = {"virtualNetworks": [{**VNET, "subnets": [{"name": "app", "addressPrefix": "10.10.1.0/24"}]}]}
    verdict = _verdict(_small(network, None))
    assert verdict.state == "unknown" and "HTTP 404" in verdict.note and verdict.nic_id.endswith("/vm-x-nic")


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda e: e["vms"][0]["nic"].update(subnet=f"{SPOKE}/subnets/nope"), "$.vms[0].nic.subnet"),
        (lambda e: e["vms"][0]["nic"].update(privateIp="10.99.0.4"), "$.vms[0].nic.privateIp"),
        (lambda e: e.pop("network"), "$.vms[0].nic"),
        (
            lambda e: e["network"]["virtualNetworks"][0]["subnets"][0].update(routeTable=f"{SPOKE}/x"),
            "$.network.virtualNetworks[0].subnets[0].routeTable",
        ),
        (
            lambda e: e["network"]["routeTables"][0]["routes"][0].pop("nextHopIpAddress"),
            "$.network.routeTables[0].routes[0].nextHopIpAddress",
        ),
        (lambda e: e["network"].update(peerings=[]), "$.network.peerings"),
    ],
)
def test_the_network_is_validated_with_the_json_path_of_the_problem(change: Any, path: str) -> None:
    from simulator import EstateError

    estate = network_estate()
    change(estate)
    with pytest.raises(EstateError) as error:
        Estate.from_dict(estate)
    assert error.value.path == path


def test_a_network_estate_round_trips_through_its_file_form() -> None:
    estate = Estate.from_dict(network_estate())
    again = Estate.from_dict(json.loads(json.dumps(estate.to_dict())))
    assert again.to_dict() == estate.to_dict()
    assert [vm.guest.network_reachable for vm in again.vms] == [
        vm.guest.network_reachable for vm in estate.vms
    ]  # type: ignore[union-attr]


def test_one_route_table_on_two_subnets_is_one_entry_naming_both_subnets() -> None:
    """A route table (or NSG) serving several subnets is fixed once; its entry says every subnet,
    not only the first VM's (the docs-only estate's writer saw the gap)."""
    from shared.model import Outcome, OutcomeKind
    from shared.report import path_groups

    table = "/subscriptions/s/resourceGroups/net/providers/Microsoft.Network/routeTables/rt-hub"

    def blocked(vm: str, subnet: str) -> Outcome:
        finding = {
            "cause": "route-to-appliance",
            "resource": table,
            "subnet": f"/subscriptions/s/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/v/subnets/{subnet}",
            "text": f"route 0.0.0.0/0 -> VirtualAppliance 10.0.0.4 in route table rt-hub (subnet {subnet})",
            "fix": ["az network route-table route create --route-table-name rt-hub --name k"],
        }
        path = {"state": "blocked", "findings": [finding]}
        vm_id = f"/subscriptions/s/resourceGroups/app/providers/Microsoft.Compute/virtualMachines/{vm}"
        return Outcome(vm_id, OutcomeKind.WOULD_REMEDIATE, "avma-kms-unreachable", details={"kmsPath": path})

    lines = path_groups([blocked("a1", "app"), blocked("w1", "web"), blocked("a2", "app")])
    assert len([line for line in lines if line.startswith("  KMS path")]) == 1
    assert "(3 VMs: a1 (would-remediate: avma-kms-unreachable), w1 " in lines[0]
    assert lines[0].endswith("The same holds in subnets app, web.")
    assert lines[1] == "    Fix once for all 3 (not applied; run as a network admin):"
    assert path_groups([blocked("a1", "app")])[0].endswith("(subnet app).")
