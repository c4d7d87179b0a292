"""Review of issue 11 (r11): odd and hostile ARM answers to the path check must not turn into a
wrong ``ok`` or ``blocked``; what cannot be judged is ``unknown``.

Sources: the effective route shape of Azure/azure-rest-api-specs
``specification/network/resource-manager/Microsoft.Network/stable/2024-07-01/examples/
NetworkInterfaceEffectiveRouteTableList.json`` (``source``, ``state``, ``addressPrefix`` as an array,
``nextHopType``, ``nextHopIpAddress`` as an array; a NIC always has the system routes); route
selection in MicrosoftDocs/azure-docs ``articles/virtual-network/virtual-networks-udr-overview.md``
("If multiple routes contain the same address prefix, Azure selects the route type, based on the
following priority: User-defined route, BGP route, System route").
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError

from shared.kms_endpoints import kms_of
from shared.network_path import (
    NSG_DENY,
    ROUTE_APPLIANCE,
    PathFacts,
    judge,
)

PUBLIC = kms_of("AzureCloud")
SUB = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-net/providers/Microsoft.Network"
SUBNET_ID = f"{SUB}/virtualNetworks/vnet/subnets/app"
TABLE_ID = f"{SUB}/routeTables/rt-hub"
NSG_ID = f"{SUB}/networkSecurityGroups/nsg-app"
NIC = {
    "id": f"{SUB}/networkInterfaces/vm-nic",
    "location": "westeurope",
    "properties": {
        "ipConfigurations": [
            {"name": "ipconfig1", "properties": {"primary": True, "subnet": {"id": SUBNET_ID}}}
        ]
    },
}
SUBNET = {"id": SUBNET_ID, "properties": {"addressPrefix": "10.0.1.0/24"}}


def route(prefix: str, hop: str, *, source: str = "Default", ip: str = "") -> dict[str, Any]:
    return {
        "source": source,
        "state": "Active",
        "addressPrefix": [prefix],
        "nextHopType": hop,
        "nextHopIpAddress": [ip] if ip else [],
    }


SYSTEM = [
    route("10.0.0.0/16", "VnetLocal"),
    route("0.0.0.0/0", "Internet"),
    route("10.0.0.0/8", "None"),
    route("192.168.0.0/16", "None"),
]


def facts(routes: list[dict[str, Any]], **more: Any) -> PathFacts:
    return PathFacts(nic=NIC, subnet=SUBNET, routes=routes, **more)


def test_next_hop_types_are_read_without_regard_to_case() -> None:
    lower = [route("0.0.0.0/0", "internet")]
    assert judge(facts(lower), PUBLIC).state == "ok"
    appliance = [route("0.0.0.0/0", "virtualappliance", source="user", ip="10.0.0.4")]
    verdict = judge(facts(appliance, route_table={"id": TABLE_ID, "properties": {}}), PUBLIC)
    assert verdict.state == "blocked"
    assert [f.cause for f in verdict.findings] == [ROUTE_APPLIANCE]
    assert verdict.findings[0].resource_id == TABLE_ID  # a user route: the route table is at fault


def test_two_active_routes_with_the_same_prefix_follow_user_then_bgp_then_system() -> None:
    # An answer that leaves both active: the user route wins, whatever the order it comes in.
    tunnel = route("0.0.0.0/0", "VirtualAppliance", source="User", ip="10.0.0.4")
    for routes in ([*SYSTEM, tunnel], [tunnel, *SYSTEM]):
        verdict = judge(facts(routes, route_table={"id": TABLE_ID, "properties": {}}), PUBLIC)
        assert verdict.state == "blocked", routes
        assert [f.cause for f in verdict.findings] == [ROUTE_APPLIANCE]
    # BGP before system
    bgp = route("0.0.0.0/0", "VirtualNetworkGateway", source="VirtualNetworkGateway")
    assert judge(facts([*SYSTEM, bgp]), PUBLIC).state == "blocked"
    # ...and a user route to Internet before a BGP forced tunnel with the same prefix
    user_internet = route("0.0.0.0/0", "Internet", source="User")
    assert judge(facts([bgp, user_internet]), PUBLIC).state == "ok"


@pytest.mark.parametrize(
    "routes",
    [
        [],  # a NIC always has the system routes: an empty answer says nothing
        [{**route("0.0.0.0/0", "Internet"), "nextHopType": None}],
        [{"source": "Default", "state": "Active", "addressPrefix": ["0.0.0.0/0"]}],
    ],
    ids=["empty", "null-next-hop", "no-next-hop"],
)
def test_an_effective_route_table_that_says_nothing_is_unknown_not_blocked(
    routes: list[dict[str, Any]],
) -> None:
    verdict = judge(facts(routes), PUBLIC)
    assert verdict.state == "unknown", verdict
    assert verdict.note and verdict.nic_id == NIC["id"]


def test_nsg_protocol_and_access_are_read_without_regard_to_case() -> None:
    nsg = {
        "id": NSG_ID,
        "properties": {
            "securityRules": [
                {
                    "name": "deny-kms",
                    "properties": {
                        "direction": "Outbound",
                        "priority": 200,
                        "access": "deny",
                        "protocol": "tcp",
                        # the platform rule keeps activation out of denies not naming this tag
                        "destinationAddressPrefix": "AzurePlatformLKM",
                        "destinationPortRange": "1000-2000",
                    },
                }
            ]
        },
    }
    verdict = judge(facts(SYSTEM, nsgs=[nsg]), PUBLIC)
    assert [f.cause for f in verdict.findings] == [NSG_DENY]


def test_a_connection_dropped_mid_answer_is_unknown_not_a_crash() -> None:
    from shared.azure.network import NetworkGateway, NetworkUnreadable

    async def dropped() -> Any:
        raise ServiceResponseError("Connection reset by peer")

    gateway = NetworkGateway.__new__(NetworkGateway)
    with pytest.raises(NetworkUnreadable, match="Connection reset"):
        asyncio.run(gateway._call("effective routes of vm-nic", dropped))


def _deny(priority: int, **match: Any) -> dict[str, Any]:
    return {
        "name": f"deny-{priority}",
        "properties": {
            "direction": "Outbound",
            "priority": priority,
            "access": "Deny",
            "protocol": "Tcp",
            "destinationAddressPrefix": "AzurePlatformLKM",  # the one tag that reaches activation
            **match,
        },
    }


@pytest.mark.parametrize(
    ("match", "denied"),
    [
        ({"destinationPortRange": "3389"}, False),
        ({"destinationPortRange": "1000-2000"}, True),
        ({"destinationPortRanges": ["80", "443"]}, False),
        ({"destinationPortRanges": ["80", "1600-1700"]}, True),
        ({"destinationPortRange": "1688", "protocol": "Udp"}, False),
        ({"destinationPortRange": "*", "destinationAddressPrefix": "10.0.0.0/8"}, False),
    ],
)
def test_an_nsg_rule_denies_the_kms_only_when_its_ports_protocol_and_prefix_hold_it(
    match: dict[str, Any], denied: bool
) -> None:
    nsg = {"id": NSG_ID, "properties": {"securityRules": [_deny(300, **match)]}}
    verdict = judge(facts(SYSTEM, nsgs=[nsg]), PUBLIC)
    assert verdict.state == ("blocked" if denied else "ok"), verdict
    if denied:
        assert [(f.cause, f.resource_id, f.priority) for f in verdict.findings] == [(NSG_DENY, NSG_ID, 300)]


def test_nsg_rules_are_taken_lowest_priority_number_first_whatever_their_order() -> None:
    allow = {
        "name": "allow-kms",
        "properties": {
            "direction": "Outbound",
            "priority": 100,
            "access": "Allow",
            "protocol": "Tcp",
            "destinationAddressPrefixes": [f"{a}/32" for a in PUBLIC.required],
            "destinationPortRange": "1688",
        },
    }
    deny = _deny(4000, destinationPortRange="*")
    for rules in ([allow, deny], [deny, allow]):
        nsg = {"id": NSG_ID, "properties": {"securityRules": rules}}
        assert judge(facts(SYSTEM, nsgs=[nsg]), PUBLIC).state == "ok"
    # the other way round the deny comes first
    early = {
        "id": NSG_ID,
        "properties": {
            "securityRules": [{**allow, "properties": {**allow["properties"], "priority": 4001}}, deny]
        },
    }
    (finding,) = judge(facts(SYSTEM, nsgs=[early]), PUBLIC).findings
    assert (finding.cause, finding.priority) == (NSG_DENY, 4000)
