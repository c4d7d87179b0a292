"""An estate with a network that has every cause of issue 11 (docs/simulator.md, "Networks")."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from tests.estates import windows_vm

SUB = "5e0f3c2a-7b1d-4e6f-9a8b-2c4d6e8f0a1b"
NET = f"/subscriptions/{SUB}/resourceGroups/rg-net/providers/Microsoft.Network"
SPOKE = f"{NET}/virtualNetworks/vnet-spoke"
ONPREM = f"{NET}/virtualNetworks/vnet-onprem"
RT_HUB, RT_NONE, RT_LEGACY = (
    f"{NET}/routeTables/rt-hub",
    f"{NET}/routeTables/rt-blackhole",
    f"{NET}/routeTables/rt-legacy",
)
NAT = f"{NET}/natGateways/nat-app"
ILB = f"{NET}/loadBalancers/ilb-app"
NSG = f"{NET}/networkSecurityGroups/nsg-locked"

NETWORK: dict[str, Any] = {
    "virtualNetworks": [
        {
            "id": SPOKE,
            "addressPrefixes": ["10.10.0.0/16"],
            "subnets": [
                {"name": "app-nva", "addressPrefix": "10.10.1.0/24", "routeTable": RT_HUB},
                {"name": "app-none", "addressPrefix": "10.10.2.0/24", "routeTable": RT_NONE},
                {"name": "app-private", "addressPrefix": "10.10.3.0/24", "defaultOutboundAccess": False},
                {"name": "app-ilb", "addressPrefix": "10.10.4.0/24"},
                {"name": "app-retired", "addressPrefix": "10.10.5.0/24", "routeTable": RT_LEGACY},
                {
                    "name": "app-nat",
                    "addressPrefix": "10.10.6.0/24",
                    "defaultOutboundAccess": False,
                    "natGateway": NAT,
                },
                {"name": "app-pip", "addressPrefix": "10.10.7.0/24", "defaultOutboundAccess": False},
                {"name": "app-default", "addressPrefix": "10.10.8.0/24"},
                {"name": "app-nsg", "addressPrefix": "10.10.9.0/24", "networkSecurityGroup": NSG},
            ],
        },
        {
            "id": ONPREM,
            "addressPrefixes": ["10.20.0.0/16"],
            "gatewayRoutes": ["0.0.0.0/0"],
            "subnets": [{"name": "app", "addressPrefix": "10.20.1.0/24"}],
        },
    ],
    "routeTables": [
        {
            "id": RT_HUB,
            "routes": [
                {
                    "name": "to-firewall",
                    "addressPrefix": "0.0.0.0/0",
                    "nextHopType": "VirtualAppliance",
                    "nextHopIpAddress": "10.0.0.4",
                }
            ],
        },
        {"id": RT_NONE, "routes": [{"name": "drop", "addressPrefix": "0.0.0.0/0", "nextHopType": "None"}]},
        {
            "id": RT_LEGACY,
            "routes": [
                {
                    "name": "to-firewall",
                    "addressPrefix": "0.0.0.0/0",
                    "nextHopType": "VirtualAppliance",
                    "nextHopIpAddress": "10.0.0.4",
                },
                {"name": "DirectRouteToKMS", "addressPrefix": "23.102.135.246/32", "nextHopType": "Internet"},
            ],
        },
    ],
    "natGateways": [{"id": NAT}],
    "loadBalancers": [{"id": ILB, "sku": "Standard", "public": False}],
    "networkSecurityGroups": [
        {
            "id": NSG,
            "rules": [
                {
                    # A deny of Internet or * would not block activation here: Azure's licensing
                    # platform rule exempts it unless it names AzurePlatformLKM or a route 0.0.0.0/0
                    # replaces the system one (network-security-groups-overview.md).
                    "name": "deny-licensing",
                    "priority": 4000,
                    "direction": "Outbound",
                    "access": "Deny",
                    "destinationAddressPrefix": "AzurePlatformLKM",
                }
            ],
        }
    ],
}

# VM name → (subnet id, NIC extras, the guest's own kmsReachable)
VMS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "vm-nva": (f"{SPOKE}/subnets/app-nva", {}, True),
    "vm-nva-2": (f"{SPOKE}/subnets/app-nva", {}, True),  # one route table, two VMs: one fix
    "vm-none": (f"{SPOKE}/subnets/app-none", {}, True),
    "vm-private": (f"{SPOKE}/subnets/app-private", {}, True),
    "vm-ilb": (f"{SPOKE}/subnets/app-ilb", {"loadBalancers": [ILB]}, True),
    "vm-retired": (f"{SPOKE}/subnets/app-retired", {}, True),
    "vm-gateway": (f"{ONPREM}/subnets/app", {}, True),
    "vm-nsg": (f"{SPOKE}/subnets/app-nsg", {}, True),
    "vm-nat": (f"{SPOKE}/subnets/app-nat", {}, True),
    "vm-pip": (f"{SPOKE}/subnets/app-pip", {"publicIp": True}, True),
    "vm-default": (f"{SPOKE}/subnets/app-default", {}, True),
    "vm-firewalled": (f"{SPOKE}/subnets/app-default", {}, False),  # Windows Firewall or a proxy
}


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"


def network_estate(*, licensed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every VM is an AVMA Server 2022 Datacenter, unlicensed unless named in ``licensed``."""
    prefixes = {
        f"{v['id']}/subnets/{s['name']}": s["addressPrefix"]
        for v in NETWORK["virtualNetworks"]
        for s in v["subnets"]
    }
    vms = []
    for i, (name, (subnet, extra, reachable)) in enumerate(VMS.items()):
        address = str(ipaddress.ip_network(prefixes[subnet])[4 + i])
        nic = {"subnet": subnet, "privateIp": address, **extra}
        status = 1 if name in licensed else 5
        vms.append(windows_vm(vm_id(name), channel="AVMA", status=status, reachable=reachable, nic=nic))
    return copy.deepcopy({"subscriptions": [SUB], "network": NETWORK, "vms": vms})  # callers may edit it
