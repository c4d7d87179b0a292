"""Azure's licensing platform rule (issue 11): an NSG deny of ``Internet``, ``*`` or the KMS address
does not stop activation unless a route ``0.0.0.0/0`` replaces the system default route; a deny
naming ``AzurePlatformLKM`` does. Through the real azure-mgmt-network aio client against the
simulator, whose own reachability (the oracle, written apart) must agree.

Sources: MicrosoftDocs/azure-docs articles/virtual-network/network-security-groups-overview.md,
"Azure platform considerations" (basic infrastructure services "aren't subject to the configured
network security groups unless targeted by service tags specific to each service ... AzurePlatformLKM";
"Licensing (Key Management Service) ... For deployments using default route 0.0.0.0/0
configuration, this platform rule is disabled"), articles/virtual-network/service-tags-overview.md
(AzurePlatformLKM: "You can use this tag to disable the defaults for licensing"),
articles/virtual-network/virtual-networks-udr-overview.md ("0.0.0.0/0 address prefix": the system
route overridden by a user-defined or BGP route); MicrosoftDocs/SupportArticles-docs
support/azure/virtual-machines/windows/windows-vm-activation-error-0xc004f074.md ("operating system
activation traffic to the KMS IPs on port 1688 remains enabled because of platform internal rules"
behind an NSG that denies outbound internet access); faultbucket.ca 2021/06 "Azure KMS and NSGs" (a
Deny of the Internet tag did not stop TCP 1688). Which default routes turn the rule off (here: any
active user or BGP route 0.0.0.0/0, whatever its next hop) is a guess: docs/simulator.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.kms_endpoints import kms_of
from shared.network_fix import fix_for
from shared.network_path import NSG_DENY, ROUTE_APPLIANCE
from tests.network_estate import SUB, vm_id
from tests.test_network_gaps import NIC, NSG, TABLE, both, network
from tests.test_network_path import _small, one

PUBLIC = kms_of("AzureCloud")
KMS1, KMS2 = PUBLIC.required
SCOPE = f"--subscription {SUB} --resource-group rg-net"


def deny(destination: str, *, name: str = "deny-out", priority: int = 4000) -> dict[str, Any]:
    return {
        "name": name,
        "priority": priority,
        "direction": "Outbound",
        "access": "Deny",
        "destinationAddressPrefix": destination,
    }


def locked(rules: list[dict[str, Any]], subnet: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return network(
        {"networkSecurityGroup": NSG, **(subnet or {})},
        networkSecurityGroups=[{"id": NSG, "rules": rules}],
        **more,
    )


KMS_ROUTES = [
    {"name": f"azure-kms-{i}", "addressPrefix": f"{ip}/32", "nextHopType": "Internet"}
    for i, ip in enumerate(PUBLIC.required)
]
TO_FIREWALL = {
    "name": "to-firewall",
    "addressPrefix": "0.0.0.0/0",
    "nextHopType": "VirtualAppliance",
    "nextHopIpAddress": "10.0.0.4",
}


# ------------------------------------------------------------------ the platform rule holds


@pytest.mark.parametrize("destination", ["Internet", "*", f"{KMS1}/32", "AzureCloud"])
def test_an_ordinary_deny_does_not_block_activation_with_the_system_routes_only(destination: str) -> None:
    rules = [deny(destination), deny(f"{KMS2}/32", name="deny-kms-2", priority=4001)]
    verdict, reachable = both(_small(locked(rules), NIC))
    assert (verdict.state, verdict.findings, reachable) == ("ok", (), True), verdict
    # the admin is told why the rule that looks like it blocks does not, and when it would
    assert f"network security group nsg-app rule deny-out (priority 4000) matches TCP 1688 to {KMS1}" in (
        verdict.note
    )
    assert "AzurePlatformLKM" in verdict.note and "forced tunnelling" in verdict.note


def test_a_deny_on_the_nic_s_own_nsg_is_exempt_too() -> None:
    net = network(networkSecurityGroups=[{"id": NSG, "rules": [deny("Internet")]}])
    verdict, reachable = both(_small(net, {**NIC, "networkSecurityGroup": NSG}))
    assert (verdict.state, reachable) == ("ok", True), verdict


# ------------------------------------------------------------------ a deny of AzurePlatformLKM


def test_a_deny_of_azure_platform_lkm_blocks_and_its_fix_allows_the_tag() -> None:
    estate = _small(locked([deny("AzurePlatformLKM", name="no-licensing")]), NIC)
    verdict, reachable = both(estate)
    finding = one(verdict)
    assert (finding.cause, finding.resource_id, reachable) == (NSG_DENY, NSG, False)
    assert "rule no-licensing (priority 4000) denies TCP 1688" in finding.text
    assert "AzurePlatformLKM" in finding.text
    assert fix_for(finding, PUBLIC) == [
        "# rule no-licensing denies the AzurePlatformLKM service tag, which exists to turn off Windows "
        f"licensing; if no one needs that, remove it instead: az network nsg rule delete {SCOPE} "
        "--nsg-name nsg-app --name no-licensing",
        f"az network nsg rule create {SCOPE} --nsg-name nsg-app --name allow-azure-kms-3999 --priority 3999 "
        "--direction Outbound --access Allow --protocol Tcp --destination-address-prefixes AzurePlatformLKM "
        "--destination-port-ranges 1688",
    ]
    # either fix, applied, makes the path work for both codes
    allowed = copy.deepcopy(estate)
    allowed["network"]["networkSecurityGroups"][0]["rules"].append(
        {
            "name": "allow-azure-kms",
            "priority": 3999,
            "direction": "Outbound",
            "access": "Allow",
            "protocol": "Tcp",
            "destinationAddressPrefix": "AzurePlatformLKM",
            "destinationPortRange": "1688",
        }
    )
    removed = copy.deepcopy(estate)
    removed["network"]["networkSecurityGroups"][0]["rules"] = []
    for fixed in (allowed, removed):
        verdict, reachable = both(fixed)
        assert (verdict.state, reachable) == ("ok", True), verdict


# ------------------------------------------------------------------ a default route turns it off


def test_forced_tunnelling_with_the_kms_routes_leaves_an_internet_deny_blocking() -> None:
    """Microsoft's own cure for forced tunnelling (/32 routes to Internet) next to a Deny of the
    Internet tag: the route 0.0.0.0/0 turns the platform rule off, so the NSG is what blocks."""
    net = locked(
        [deny("Internet", name="deny-internet")],
        {"routeTable": TABLE},
        routeTables=[{"id": TABLE, "routes": [TO_FIREWALL, *KMS_ROUTES]}],
    )
    estate = _small(net, NIC)
    verdict, reachable = both(estate)
    finding = one(verdict)
    assert (finding.cause, finding.resource_id, reachable) == (NSG_DENY, NSG, False)
    assert (
        "rule deny-internet (priority 4000) denies TCP 1688 to 20.118.99.224 and 40.83.235.53: the route "
        "0.0.0.0/0 → VirtualAppliance 10.0.0.4 in route table rt-app turns off Azure's licensing platform rule"
    ) in finding.text
    assert fix_for(finding, PUBLIC)[-1].endswith(
        f"--destination-address-prefixes {KMS1}/32 {KMS2}/32 --destination-port-ranges 1688"
    )
    # without the default route the same NSG lets activation through
    no_default = copy.deepcopy(estate)
    no_default["network"]["routeTables"][0]["routes"] = list(KMS_ROUTES)
    verdict, reachable = both(no_default)
    assert (verdict.state, reachable) == ("ok", True), verdict


def test_a_default_route_to_a_firewall_gives_the_route_and_the_nsg_both_to_fix() -> None:
    net = locked(
        [deny("*", name="deny-all")],
        {"routeTable": TABLE},
        routeTables=[{"id": TABLE, "routes": [TO_FIREWALL]}],
    )
    verdict, reachable = both(_small(net, NIC))
    assert [f.cause for f in verdict.findings] == [ROUTE_APPLIANCE, NSG_DENY] and reachable is False
    # the NSG finding says why a deny of * reaches activation here: /32 routes alone would not do
    assert "0.0.0.0/0 → VirtualAppliance 10.0.0.4 in route table rt-app turns off" in verdict.findings[1].text


@pytest.mark.parametrize(
    ("vnet", "table", "state"),
    [
        # a user route 0.0.0.0/0 to Internet still replaces the system route: a guess, see the docstring
        (
            {},
            {"routes": [{"name": "all", "addressPrefix": "0.0.0.0/0", "nextHopType": "Internet"}]},
            "blocked",
        ),
        ({"gatewayRoutes": ["0.0.0.0/0"]}, {"routes": KMS_ROUTES}, "blocked"),  # BGP forced tunnelling
        ({"gatewayRoutes": ["0.0.0.0/0"]}, {"routes": [], "disableBgpRoutePropagation": True}, "ok"),
        ({}, {"routes": [{"name": "wide", "addressPrefix": "0.0.0.0/1", "nextHopType": "Internet"}]}, "ok"),
    ],
    ids=["user-internet", "bgp", "bgp-not-propagated", "not-a-default-route"],
)
def test_which_routes_turn_the_platform_rule_off(
    vnet: dict[str, Any], table: dict[str, Any], state: str
) -> None:
    net = locked(
        [deny("Internet", name="deny-internet")],
        {"routeTable": TABLE},
        routeTables=[{"id": TABLE, **table}],
    )
    net["virtualNetworks"][0].update(vnet)
    verdict, reachable = both(_small(net, NIC))
    assert (verdict.state, reachable) == (state, state == "ok"), verdict
    if state == "blocked":
        (finding,) = verdict.findings
        assert finding.cause == NSG_DENY and "turns off Azure's licensing platform rule" in finding.text


# ------------------------------------------------------------------ the decision that follows


def test_a_licensed_avma_vm_behind_an_internet_deny_is_re_keyed_not_deferred(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The false ``blocked`` this fixes: the guest reaches the KMS, so it is remediated."""
    from shared.cli import main
    from tests.estates import windows_vm

    estate = {
        "subscriptions": [SUB],
        "network": locked([deny("Internet", name="deny-internet")]),
        "vms": [windows_vm(vm_id("vm-x"), channel="AVMA", status=1, nic=NIC)],
    }
    path = tmp_path / "estate.json"
    path.write_text(json.dumps(estate))
    main(["sweep", "--simulate", str(path), "--sim-latency", "0.01", "--apply", "--yes", "--output", "json"])
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    assert (vm["outcome"], vm.get("channelAfter")) == ("remediated", "KMS_CLIENT"), vm
    assert "kmsPath" not in vm  # the probe connected: nothing to check
