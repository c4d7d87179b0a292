"""The gaps the issue 11 review left open, each through the real azure-mgmt-network aio client
against the simulator, and the simulator's own reachability (the oracle) agreeing with the engine.

Sources (docs/simulator.md "Networks", docs/troubleshooting.md "The path to the KMS"):
MicrosoftDocs/azure-docs articles/load-balancer/load-balancer-outbound-connections.md (a public IP
serves its own IP configuration; secondary IP configurations get no load balancer outbound; outbound
rules and load-balancing rules name a backend pool), articles/virtual-network/ip-services/
default-outbound-access.md (a public IP on the NIC turns off default outbound access),
articles/virtual-network/network-security-groups-overview.md (source and destination; "You can't
create two security rules with the same priority and direction"), articles/virtual-network/
service-tags-overview.md (Internet, VirtualNetwork, AzurePlatformLKM, AzureCloud); Azure/azure-cli
src/azure-cli/azure/cli/command_modules/network/aaz/latest/network/route_table/route/_update.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared.kms_endpoints import kms_of
from shared.network_fix import fix_for
from shared.network_path import LB_NO_OUTBOUND, NSG_DENY, ROUTE_APPLIANCE, SECONDARY_PIP, PathVerdict
from simulator import Estate, EstateError
from tests.network_estate import SPOKE, vm_id
from tests.test_network_path import _small, _verdict, one

PUBLIC = kms_of("AzureCloud")
KMS1, KMS2 = PUBLIC.required
SUB = SPOKE.split("/")[2]
LB = SPOKE.replace("virtualNetworks/vnet-spoke", "loadBalancers/lb-web")
NSG = SPOKE.replace("virtualNetworks/vnet-spoke", "networkSecurityGroups/nsg-app")
TABLE = SPOKE.replace("virtualNetworks/vnet-spoke", "routeTables/rt-app")
SUBNET = f"{SPOKE}/subnets/app"


def network(subnet: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "virtualNetworks": [
            {
                "id": SPOKE,
                "addressPrefixes": ["10.10.0.0/16"],
                "subnets": [{"name": "app", "addressPrefix": "10.10.1.0/24", **(subnet or {})}],
            }
        ],
        **more,
    }


NIC: dict[str, Any] = {"subnet": SUBNET, "privateIp": "10.10.1.4"}


def both(estate: dict[str, Any]) -> tuple[PathVerdict, bool]:
    """The engine's verdict through the SDK, and the simulator's own reachability of the KMS."""
    guest = Estate.from_dict(estate).get(vm_id("vm-x")).guest
    assert guest is not None
    return _verdict(estate), guest.network_reachable


# ------------------------------------------------------------------ 1. secondary IP configurations


def test_a_public_ip_on_a_secondary_ip_configuration_gives_the_primary_no_outbound() -> None:
    nic = {**NIC, "secondaryIpConfigurations": [{"privateIp": "10.10.1.5", "publicIp": True}]}
    verdict, reachable = both(_small(network(), nic))
    finding = one(verdict)
    assert finding.cause == SECONDARY_PIP
    assert "ipconfig2" in finding.text and "10.10.1.4" in finding.text
    assert finding.resource_id.endswith("/networkInterfaces/vm-x-nic")
    assert fix_for(finding, PUBLIC)[-1].endswith("--vnet-name vnet-spoke --name app --nat-gateway nat-app")
    assert reachable is False  # the simulator agrees
    # on the primary it is the VM's outbound
    primary = {**NIC, "publicIp": True, "secondaryIpConfigurations": [{"privateIp": "10.10.1.5"}]}
    verdict, reachable = both(_small(network(), primary))
    assert (verdict.state, verdict.outbound, reachable) == ("ok", "public-ip", True)


# ------------------------------------------------------------------ 2. service tags


@pytest.mark.parametrize(
    ("allow_to", "state"),
    [
        ("Internet", "ok"),
        ("AzurePlatformLKM", "ok"),
        ("AzureCloud", "ok"),  # a guess: docs/troubleshooting.md
        ("Storage", "blocked"),
        ("AzureCloud.westeurope", "blocked"),
    ],
)
def test_an_allow_naming_a_service_tag_that_holds_the_kms_comes_before_a_deny(
    allow_to: str, state: str
) -> None:
    rules = [
        {
            "name": "allow-tag",
            "priority": 200,
            "direction": "Outbound",
            "access": "Allow",
            "protocol": "Tcp",
            "destinationAddressPrefix": allow_to,
            "destinationPortRange": "1688",
        },
        {
            # only a deny naming AzurePlatformLKM touches activation while the platform rule holds
            "name": "deny-licensing",
            "priority": 4000,
            "direction": "Outbound",
            "access": "Deny",
            "destinationAddressPrefix": "AzurePlatformLKM",
        },
    ]
    net = network({"networkSecurityGroup": NSG}, networkSecurityGroups=[{"id": NSG, "rules": rules}])
    verdict, reachable = both(_small(net, NIC))
    assert (verdict.state, reachable) == (state, state == "ok"), verdict


def test_a_route_prefix_puts_the_kms_in_the_virtual_network_tag() -> None:
    # service-tags-overview.md: VirtualNetwork holds "address prefixes used on user-defined routes";
    # an allow of VirtualNetwork before a deny of AzurePlatformLKM then lets activation through.
    routes = [
        {"name": f"kms-{i}", "addressPrefix": f"{ip}/32", "nextHopType": "Internet"}
        for i, ip in enumerate(PUBLIC.required)
    ]
    rules = [
        {
            "name": "allow-vnet",
            "priority": 300,
            "direction": "Outbound",
            "access": "Allow",
            "destinationAddressPrefix": "VirtualNetwork",
        },
        {
            "name": "deny-licensing",
            "priority": 400,
            "direction": "Outbound",
            "access": "Deny",
            "destinationAddressPrefix": "AzurePlatformLKM",
        },
    ]
    net = network(
        {"networkSecurityGroup": NSG, "routeTable": TABLE},
        networkSecurityGroups=[{"id": NSG, "rules": rules}],
        routeTables=[{"id": TABLE, "routes": routes}],
    )
    verdict, reachable = both(_small(net, NIC))
    assert (verdict.state, reachable) == ("ok", True)
    del net["virtualNetworks"][0]["subnets"][0]["routeTable"]
    verdict, reachable = both(_small(net, NIC))
    assert [f.cause for f in verdict.findings] == [NSG_DENY] and reachable is False


# ------------------------------------------------------------------ 3. NSG sources


@pytest.mark.parametrize(
    ("source", "state"),
    [
        ("10.10.2.0/24", "ok"),
        ("10.10.1.0/24", "blocked"),
        ("VirtualNetwork", "blocked"),
        ("*", "blocked"),
        ("10.10.1.5", "ok"),
    ],
)
def test_an_outbound_rule_applies_only_when_its_source_holds_the_primary_private_ip(
    source: str, state: str
) -> None:
    rules = [
        {
            "name": "deny-kms",
            "priority": 300,
            "direction": "Outbound",
            "access": "Deny",
            "sourceAddressPrefix": source,
            "destinationAddressPrefix": "AzurePlatformLKM",
        }
    ]
    net = network({"networkSecurityGroup": NSG}, networkSecurityGroups=[{"id": NSG, "rules": rules}])
    verdict, reachable = both(_small(net, NIC))
    assert (verdict.state, reachable) == (state, state == "ok"), verdict


# ------------------------------------------------------------------ 4. a free NSG priority


def test_the_nsg_fix_takes_a_free_priority_below_the_deny_and_the_fixed_estate_reaches_the_kms() -> None:
    rules = [
        {
            "name": "allow-https",
            "priority": 3999,
            "direction": "Outbound",
            "access": "Allow",
            "protocol": "Tcp",
            "destinationAddressPrefix": "Internet",
            "destinationPortRange": "443",
        },
        {
            "name": "deny-licensing",
            "priority": 4000,
            "direction": "Outbound",
            "access": "Deny",
            "destinationAddressPrefix": "AzurePlatformLKM",
        },
    ]
    net = network({"networkSecurityGroup": NSG}, networkSecurityGroups=[{"id": NSG, "rules": rules}])
    estate = _small(net, NIC)
    finding = one(_verdict(estate))
    assert finding.cause == NSG_DENY
    commands = fix_for(finding, PUBLIC)
    assert commands[1].startswith("# priorities 3999 to 3999 are taken: the allow goes at 3998")
    assert "--priority 3998 " in commands[-1]
    # The simulator rejects two rules with one priority and direction, as ARM does; with the
    # written rule added at 3998 the guest reaches the KMS.
    clash = copy.deepcopy(estate)
    clash["network"]["networkSecurityGroups"][0]["rules"].append({**rules[0], "name": "allow-azure-kms"})
    with pytest.raises(EstateError, match="priority 3999"):
        Estate.from_dict(clash)
    fixed = copy.deepcopy(estate)
    fixed["network"]["networkSecurityGroups"][0]["rules"].append(
        {
            "name": "allow-azure-kms",
            "priority": 3998,
            "direction": "Outbound",
            "access": "Allow",
            "protocol": "Tcp",
            "destinationAddressPrefix": "AzurePlatformLKM",
            "destinationPortRange": "1688",
        }
    )
    assert both(fixed)[1] is True


# ------------------------------------------------------------------ 5. a route already at the /32


def test_a_route_already_at_a_kms_host_prefix_is_updated_not_created_again() -> None:
    routes = [
        {
            "name": "kms-via-firewall",
            "addressPrefix": f"{KMS1}/32",
            "nextHopType": "VirtualAppliance",
            "nextHopIpAddress": "10.0.0.4",
        },
        {
            "name": "to-firewall",
            "addressPrefix": "0.0.0.0/0",
            "nextHopType": "VirtualAppliance",
            "nextHopIpAddress": "10.0.0.4",
        },
    ]
    net = network({"routeTable": TABLE}, routeTables=[{"id": TABLE, "routes": routes}])
    verdict, reachable = both(_small(net, NIC))
    assert reachable is False
    fixes = [c for f in verdict.findings for c in fix_for(f, PUBLIC)]
    assert {f.cause for f in verdict.findings} == {ROUTE_APPLIANCE}
    scope = f"--subscription {SUB} --resource-group rg-net"
    assert (
        f"az network route-table route update {scope} --route-table-name rt-app --name kms-via-firewall --next-hop-type Internet --next-hop-ip-address null"
        in fixes
    )
    assert (
        f"az network route-table route create {scope} --route-table-name rt-app --name azure-kms-{KMS2.replace('.', '-')} --address-prefix {KMS2}/32 --next-hop-type Internet"
        in fixes
    )
    assert not any("create" in c and f"{KMS1}/32" in c for c in fixes)
    # applying both (the update changes the route in place) makes the path work
    routes[0] = {"name": "kms-via-firewall", "addressPrefix": f"{KMS1}/32", "nextHopType": "Internet"}
    routes.append(
        {
            "name": f"azure-kms-{KMS2.replace('.', '-')}",
            "addressPrefix": f"{KMS2}/32",
            "nextHopType": "Internet",
        }
    )
    verdict, reachable = both(_small(net, NIC))
    assert (verdict.state, reachable) == ("ok", True)


# ------------------------------------------------------------------ 6. backend pools and rules


@pytest.mark.parametrize(
    ("lb", "nic_pool", "state"),
    [
        ({"backendPools": ["be", "web"], "outboundRules": ["be"]}, "web", "blocked"),
        ({"backendPools": ["be", "web"], "outboundRules": ["web"]}, "web", "ok"),
        (
            {"backendPools": ["be", "web"], "loadBalancingRules": [{"name": "http", "backendPool": "web"}]},
            "web",
            "ok",
        ),
        ({"loadBalancingRules": [{"name": "http", "disableOutboundSnat": True}]}, "be", "blocked"),
        (
            {"backendPools": ["be", "web"], "loadBalancingRules": [{"name": "http", "backendPool": "be"}]},
            "web",
            "blocked",
        ),
    ],
)
def test_a_load_balancer_gives_outbound_only_to_the_pool_its_rules_name(
    lb: dict[str, Any], nic_pool: str, state: str
) -> None:
    net = network(loadBalancers=[{"id": LB, "sku": "Standard", "public": True, **lb}])
    nic = {**NIC, "loadBalancers": [f"{LB}/backendAddressPools/{nic_pool}"]}
    verdict, reachable = both(_small(net, nic))
    assert (verdict.state, reachable) == (state, state == "ok"), verdict
    if state == "blocked":
        assert one(verdict).cause == LB_NO_OUTBOUND and f"backend pool {nic_pool}" in one(verdict).text
    else:
        assert verdict.outbound == "load-balancer"


def test_a_secondary_ip_configuration_in_an_outbound_pool_gives_the_primary_nothing() -> None:
    net = network(loadBalancers=[{"id": LB, "sku": "Standard", "public": True, "outboundRules": True}])
    nic = {**NIC, "secondaryIpConfigurations": [{"privateIp": "10.10.1.5", "loadBalancers": [LB]}]}
    verdict, reachable = both(_small(net, nic))
    assert (one(verdict).cause, reachable) == (LB_NO_OUTBOUND, False)


def test_the_new_keys_round_trip_and_old_estates_keep_their_meaning() -> None:
    net = network(
        loadBalancers=[
            {
                "id": LB,
                "sku": "Standard",
                "public": True,
                "backendPools": ["be", "web"],
                "outboundRules": ["web"],
                "loadBalancingRules": [{"name": "http"}],
            }
        ]
    )
    nic = {
        **NIC,
        "loadBalancers": [f"{LB}/backendAddressPools/web"],
        "secondaryIpConfigurations": [{"privateIp": "10.10.1.5", "publicIp": True, "loadBalancers": [LB]}],
    }
    estate = Estate.from_dict(_small(net, nic))
    again = Estate.from_dict(estate.to_dict())
    assert again.to_dict() == estate.to_dict()
    with pytest.raises(EstateError) as error:
        Estate.from_dict(_small(net, {**NIC, "loadBalancers": [f"{LB}/backendAddressPools/nope"]}))
    assert error.value.path == "$.vms[0].nic.loadBalancers[0]"
