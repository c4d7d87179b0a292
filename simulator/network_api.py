"""``Microsoft.Network`` as the engine meets it: GETs of NICs, subnets, virtual networks, route tables,
NAT gateways, load balancers, NSGs and public IPs, and a NIC's effective route table (a POST that is
a long-running operation), all answered from the estate's network (simulator/network.py).

Shapes follow the Azure REST API specs' examples (Azure/azure-rest-api-specs
``specification/network/resource-manager/Microsoft.Network/stable/2024-07-01/examples/``:
NetworkInterfaceGet.json, SubnetGet.json, VirtualNetworkGet.json, RouteTableGet.json,
NatGatewayGet.json, LoadBalancerGet.json, LoadBalancerCreateWithOutboundRules.json,
NetworkSecurityGroupGet.json, PublicIpAddressGet.json, NetworkInterfaceEffectiveRouteTableList.json);
docs/simulator.md lists what is a guess. Like simulator/arm.py there is no HTTP here.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from simulator.arm import ArmResponse, arm_error
from simulator.estate import Estate, VmSpec
from simulator.network import (
    NetworkSpec,
    NicSpec,
    NsgSpec,
    SubnetSpec,
    effective_routes,
    nic_id,
    pool_of,
    public_ip_id,
)

DEFAULT_NSG_RULES: Final = (
    (
        "AllowVnetInBound",
        "Allow inbound traffic from all VMs in VNET",
        "VirtualNetwork",
        "VirtualNetwork",
        "Allow",
        65000,
        "Inbound",
    ),
    (
        "AllowAzureLoadBalancerInBound",
        "Allow inbound traffic from azure load balancer",
        "AzureLoadBalancer",
        "*",
        "Allow",
        65001,
        "Inbound",
    ),
    ("DenyAllInBound", "Deny all inbound traffic", "*", "*", "Deny", 65500, "Inbound"),
    (
        "AllowVnetOutBound",
        "Allow outbound traffic from all VMs to all VMs in VNET",
        "VirtualNetwork",
        "VirtualNetwork",
        "Allow",
        65000,
        "Outbound",
    ),
    (
        "AllowInternetOutBound",
        "Allow outbound traffic from all VMs to Internet",
        "*",
        "Internet",
        "Allow",
        65001,
        "Outbound",
    ),
    ("DenyAllOutBound", "Deny all outbound traffic", "*", "*", "Deny", 65500, "Outbound"),
)
# GET route: the lower-cased resource type segment → the resource type ARM names in its messages.
_TYPES: Final = {
    "networkinterfaces": "networkInterfaces",
    "virtualnetworks": "virtualNetworks",
    "routetables": "routeTables",
    "natgateways": "natGateways",
    "loadbalancers": "loadBalancers",
    "networksecuritygroups": "networkSecurityGroups",
    "publicipaddresses": "publicIPAddresses",
}


@dataclass(slots=True)
class _Operation:
    nic_key: str
    ends: float
    location: str


class NetworkApi:
    """The simulated ``Microsoft.Network`` of an estate; thread-safe (the estate is immutable)."""

    def __init__(
        self,
        estate: Estate,
        *,
        latency_s: float = 0.05,
        count: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.estate = estate
        self.network: NetworkSpec | None = estate.network
        self.latency_s = latency_s
        self._count = count or (lambda kind: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._operations: dict[str, _Operation] = {}
        self._nics: dict[str, tuple[VmSpec, NicSpec]] = {}
        self._pips: dict[str, tuple[VmSpec, str]] = {}  # public IP id → (VM, IP configuration)
        for vm in estate.vms:
            if vm.nic is not None:
                self._nics[nic_id(vm.id).lower()] = (vm, vm.nic)
                for config, spec in vm.nic.configs():
                    if spec.public_ip:
                        self._pips[_pip_id(vm.id, config).lower()] = (vm, config)

    @staticmethod
    def handles(path: str) -> bool:
        low = [p.lower() for p in path.split("/") if p]
        return "microsoft.network" in low[:6]

    def handle(self, method: str, path: str, query: Mapping[str, str], *, base_url: str) -> ArmResponse:
        parts = [p for p in path.split("/") if p]
        low = [p.lower() for p in parts]
        q = {k.lower(): v for k, v in query.items()}
        if not q.get("api-version"):
            return arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if (
            len(low) == 8
            and low[2:4] == ["providers", "microsoft.network"]
            and low[4] == "locations"
            and low[6] == "operationresults"
        ):
            self._count("network_operation")
            if method != "GET":
                return arm_error(405, "MethodNotAllowed", f"{method} is not allowed on {path[:200]}")
            return self._operation(parts[7], parts[1], q["api-version"], base_url)
        if len(low) < 8 or low[2] != "resourcegroups" or low[4:6] != ["providers", "microsoft.network"]:
            self._count("not_found")
            return arm_error(404, "NotFound", f"No route for {method} {path[:200]}")
        kind = _TYPES.get(low[6])
        resource_id = "/" + "/".join(parts[:8])
        if kind is None:
            self._count("not_found")
            return arm_error(404, "NotFound", f"No route for {method} {path[:200]}")
        tail = low[8:]
        if kind == "networkInterfaces" and tail == ["effectiveroutetable"]:
            self._count("network_effective_routes")
            if method != "POST":
                return arm_error(405, "MethodNotAllowed", f"{method} is not allowed on {path[:200]}")
            return self._begin_effective_routes(resource_id, parts, q["api-version"], base_url)
        if method != "GET":
            return arm_error(405, "MethodNotAllowed", f"{method} is not allowed on {path[:200]}")
        if kind == "virtualNetworks" and len(tail) == 2 and tail[0] == "subnets":
            self._count("network_get")
            subnet = self._subnet(f"{resource_id}/subnets/{parts[9]}")
            if subnet is None:
                return _not_found(f"virtualNetworks/{parts[7]}/subnets/{parts[9]}", parts[3])
            return ArmResponse(200, self._subnet_json(subnet))
        if tail:
            self._count("not_found")
            return arm_error(404, "NotFound", f"No route for {method} {path[:200]}")
        self._count("network_get")
        body = self._resource(kind, resource_id)
        if body is None:
            return _not_found(f"{kind}/{parts[7]}", parts[3])
        return ArmResponse(200, body)

    # ------------------------------------------------------------------ effective routes (LRO)

    def _begin_effective_routes(
        self, resource_id: str, parts: list[str], api_version: str, base_url: str
    ) -> ArmResponse:
        found = self._nics.get(resource_id.lower())
        if found is None:
            return _not_found(f"networkInterfaces/{parts[7]}", parts[3])
        vm, _ = found
        op_id = str(uuid.uuid4())
        with self._lock:
            self._operations[op_id] = _Operation(
                resource_id.lower(), self._clock() + self.latency_s, vm.location
            )
        return ArmResponse(202, None, self._poll_headers(parts[1], vm.location, op_id, api_version, base_url))

    def _poll_headers(
        self, sub: str, location: str, op_id: str, api_version: str, base_url: str
    ) -> dict[str, str]:
        url = (
            f"{base_url}/subscriptions/{sub}/providers/Microsoft.Network/locations/{location}"
            f"/operationResults/{op_id}?api-version={api_version}"
        )
        # Whole seconds: azure-mgmt-network parses the 202's Retry-After as an int.
        return {"Location": url, "Retry-After": str(int(self.latency_s))}

    def _operation(self, op_id: str, sub: str, api_version: str, base_url: str) -> ArmResponse:
        with self._lock:
            op = self._operations.get(op_id)
        if op is None:
            return arm_error(404, "NotFound", f"The operation '{op_id[:60]}' was not found.")
        if self._clock() < op.ends:
            return ArmResponse(202, None, self._poll_headers(sub, op.location, op_id, api_version, base_url))
        _, nic = self._nics[op.nic_key]
        assert self.network is not None
        routes = []
        for route in effective_routes(nic, self.network):
            item: dict[str, Any] = {
                "source": route.source,
                "state": route.state,
                "addressPrefix": [route.prefix],
                "nextHopType": route.next_hop_type,
                "nextHopIpAddress": [route.next_hop_ip] if route.next_hop_ip else [],
            }
            if route.name:
                item = {"name": route.name, **item}
            routes.append(item)
        return ArmResponse(200, {"value": routes})

    # ------------------------------------------------------------------ resources

    def _subnet(self, subnet_id: str) -> SubnetSpec | None:
        if self.network is None:
            return None
        return self.network.subnets.get(subnet_id.lower())

    def _resource(self, kind: str, resource_id: str) -> dict[str, Any] | None:
        key = resource_id.lower()
        if kind == "networkInterfaces":
            found = self._nics.get(key)
            return self._nic_json(*found) if found else None
        if kind == "publicIPAddresses":
            found_pip = self._pips.get(key)
            return self._pip_json(*found_pip) if found_pip else None
        net = self.network
        if net is None:
            return None
        if kind == "virtualNetworks" and key in net.vnets:
            vnet = net.vnets[key]
            return {
                "name": _name(vnet.id),
                "id": vnet.id,
                "type": "Microsoft.Network/virtualNetworks",
                "location": vnet.location,
                "properties": {
                    "provisioningState": "Succeeded",
                    "addressSpace": {"addressPrefixes": list(vnet.address_prefixes)},
                    "subnets": [self._subnet_json(s) for s in vnet.subnets],
                },
            }
        if kind == "routeTables" and key in net.route_tables:
            table = net.route_tables[key]
            routes = []
            for route in table.routes:
                props: dict[str, Any] = {
                    "provisioningState": "Succeeded",
                    "addressPrefix": route.address_prefix,
                    "nextHopType": route.next_hop_type,
                }
                if route.next_hop_ip:
                    props["nextHopIpAddress"] = route.next_hop_ip
                routes.append(
                    {"name": route.name, "id": f"{table.id}/routes/{route.name}", "properties": props}
                )
            return {
                "name": _name(table.id),
                "id": table.id,
                "type": "Microsoft.Network/routeTables",
                "location": table.location,
                "properties": {
                    "provisioningState": "Succeeded",
                    "disableBgpRoutePropagation": table.disable_bgp_route_propagation,
                    "routes": routes,
                    "subnets": self._subnets_with("route_table", table.id),
                },
            }
        if kind == "natGateways" and key in net.nat_gateways:
            nat = net.nat_gateways[key]
            return {
                "name": _name(nat.id),
                "sku": {"name": "Standard"},
                "id": nat.id,
                "location": nat.location,
                "properties": {
                    "idleTimeoutInMinutes": 4,
                    "provisioningState": "Succeeded",
                    "publicIpAddresses": [
                        {"id": _sibling(nat.id, "publicIPAddresses", f"{_name(nat.id)}-pip")}
                    ],
                    "subnets": self._subnets_with("nat_gateway", key),
                },
                "type": "Microsoft.Network/natGateways",
            }
        if kind == "loadBalancers" and key in net.load_balancers:
            return self._lb_json(key)
        if kind == "networkSecurityGroups" and key in net.nsgs:
            return self._nsg_json(net.nsgs[key])
        return None

    def _subnets_with(self, attribute: str, resource_id: str) -> list[dict[str, str]]:
        assert self.network is not None
        return [
            {"id": s.id}
            for s in self.network.subnets.values()
            if (getattr(s, attribute) or "").lower() == resource_id.lower()
        ]

    def _subnet_json(self, subnet: SubnetSpec) -> dict[str, Any]:
        props: dict[str, Any] = {"addressPrefix": subnet.address_prefix, "provisioningState": "Succeeded"}
        if subnet.default_outbound_access is not None:
            props["defaultOutboundAccess"] = subnet.default_outbound_access
        if subnet.route_table:
            props["routeTable"] = {"id": subnet.route_table}
        if subnet.nat_gateway:
            props["natGateway"] = {"id": subnet.nat_gateway}
        if subnet.nsg:
            props["networkSecurityGroup"] = {"id": subnet.nsg}
        props["ipConfigurations"] = [
            {"id": f"{nic_id(vm.id)}/ipConfigurations/{config}"}
            for vm, nic in self._nics.values()
            if nic.subnet.lower() == subnet.id.lower()
            for config, _ in nic.configs()
        ]
        return {
            "id": subnet.id,
            "name": subnet.name,
            "type": "Microsoft.Network/virtualNetworks/subnets",
            "properties": props,
        }

    def _nic_json(self, vm: VmSpec, nic: NicSpec) -> dict[str, Any]:
        the_id = nic_id(vm.id)
        assert self.network is not None
        configs: list[dict[str, Any]] = []
        for name, spec in nic.configs():
            config: dict[str, Any] = {
                "provisioningState": "Succeeded",
                "privateIPAddress": spec.private_ip,
                "privateIPAllocationMethod": "Dynamic" if name == "ipconfig1" else "Static",
                "subnet": {"id": nic.subnet},
                "primary": name == "ipconfig1",
                "privateIPAddressVersion": "IPv4",
            }
            if spec.public_ip:
                config["publicIPAddress"] = {"id": _pip_id(vm.id, name)}
            pools = [pool_of(ref, self.network) for ref in spec.load_balancers]
            if pools:
                config["loadBalancerBackendAddressPools"] = [
                    {"id": lb.pool_id(pool)} for lb, pool in (p for p in pools if p is not None)
                ]
            configs.append({"name": name, "id": f"{the_id}/ipConfigurations/{name}", "properties": config})
        props: dict[str, Any] = {
            "provisioningState": "Succeeded",
            "ipConfigurations": configs,
            "dnsSettings": {"dnsServers": [], "appliedDnsServers": []},
            "macAddress": _mac(the_id),
            "enableAcceleratedNetworking": True,
            "enableIPForwarding": False,
            "primary": True,
            "virtualMachine": {"id": vm.id},
        }
        if nic.nsg:
            props["networkSecurityGroup"] = {"id": nic.nsg}
        return {
            "name": _name(the_id),
            "id": the_id,
            "location": vm.location,
            "properties": props,
            "type": "Microsoft.Network/networkInterfaces",
        }

    def _pip_json(self, vm: VmSpec, config: str) -> dict[str, Any]:
        the_id = _pip_id(vm.id, config)
        # An address of TEST-NET-2 (RFC 5737), stable per VM: the simulator's, never a real one.
        address = str(
            ipaddress.ip_address("198.51.100.0")
            + uuid.uuid5(uuid.NAMESPACE_URL, the_id.lower()).int % 254
            + 1
        )
        return {
            "name": _name(the_id),
            "id": the_id,
            "location": vm.location,
            "sku": {"name": "Standard", "tier": "Regional"},
            "type": "Microsoft.Network/publicIPAddresses",
            "properties": {
                "provisioningState": "Succeeded",
                "publicIPAddressVersion": "IPv4",
                "publicIPAllocationMethod": "Static",
                "idleTimeoutInMinutes": 4,
                "ipAddress": address,
                "ipConfiguration": {"id": f"{nic_id(vm.id)}/ipConfigurations/{config}"},
            },
        }

    def _lb_json(self, key: str) -> dict[str, Any]:
        """LoadBalancerGet.json / LoadBalancerCreate.json / LoadBalancerCreateWithOutboundRules.json:
        one frontend, the backend pools with the IP configurations in each, one outbound rule per
        pool that has one, the load-balancing rules (``backendAddressPool``, ``disableOutboundSnat``)."""
        assert self.network is not None
        lb = self.network.load_balancers[key]
        members: dict[str, list[str]] = {pool: [] for pool in lb.pools}  # pool → IP configuration ids
        first_subnet: str | None = None
        for vm, nic in self._nics.values():
            for config, spec in nic.configs():
                for ref in spec.load_balancers:
                    found = pool_of(ref, self.network)
                    if found is not None and found[0] is lb:
                        members[found[1]].append(f"{nic_id(vm.id)}/ipConfigurations/{config}")
                        first_subnet = first_subnet or nic.subnet
        frontend: dict[str, Any] = {"provisioningState": "Succeeded", "privateIPAllocationMethod": "Dynamic"}
        if lb.public:
            frontend["publicIPAddress"] = {"id": _sibling(lb.id, "publicIPAddresses", f"{_name(lb.id)}-pip")}
        elif first_subnet is not None:
            # An internal frontend sits in a subnet; the simulator puts it in its first member's.
            subnet = self.network.subnets[first_subnet.lower()]
            hosts = ipaddress.ip_network(subnet.address_prefix).num_addresses
            frontend["privateIPAddress"] = str(ipaddress.ip_network(subnet.address_prefix)[max(hosts - 2, 0)])
            frontend["subnet"] = {"id": subnet.id}
        frontend["privateIPAddressVersion"] = "IPv4"
        fe_id = f"{lb.id}/frontendIPConfigurations/fe"
        pools: list[dict[str, Any]] = []
        outbound_rules: list[dict[str, Any]] = []
        rules: list[dict[str, Any]] = []
        for pool in lb.pools:
            props: dict[str, Any] = {
                "provisioningState": "Succeeded",
                "backendIPConfigurations": [{"id": c} for c in members[pool]],
            }
            if pool in lb.outbound_pools:
                # The first pool's rule keeps the name it had when an estate had one pool.
                rule_name = "outbound" if pool == lb.pools[0] else f"outbound-{pool}"
                rule_id = f"{lb.id}/outboundRules/{rule_name}"
                frontend.setdefault("outboundRules", []).append({"id": rule_id})
                props["outboundRules"] = [{"id": rule_id}]
                outbound_rules.append(
                    {
                        "name": rule_name,
                        "id": rule_id,
                        "type": "Microsoft.Network/loadBalancers/outboundRules",
                        "properties": {
                            "provisioningState": "Succeeded",
                            "allocatedOutboundPorts": 1024,
                            "protocol": "All",
                            "enableTcpReset": False,
                            "idleTimeoutInMinutes": 4,
                            "backendAddressPool": {"id": lb.pool_id(pool)},
                            "frontendIPConfigurations": [{"id": fe_id}],
                        },
                    }
                )
            rule_refs = [{"id": f"{lb.id}/loadBalancingRules/{r.name}"} for r in lb.rules if r.pool == pool]
            if rule_refs:
                props["loadBalancingRules"] = rule_refs
            pools.append(
                {
                    "name": pool,
                    "id": lb.pool_id(pool),
                    "type": "Microsoft.Network/loadBalancers/backendAddressPools",
                    "properties": props,
                }
            )
        for rule in lb.rules:
            rule_id = f"{lb.id}/loadBalancingRules/{rule.name}"
            frontend.setdefault("loadBalancingRules", []).append({"id": rule_id})
            rules.append(
                {
                    "name": rule.name,
                    "id": rule_id,
                    "type": "Microsoft.Network/loadBalancers/loadBalancingRules",
                    "properties": {
                        "provisioningState": "Succeeded",
                        "frontendIPConfiguration": {"id": fe_id},
                        "frontendPort": 80,
                        "backendPort": 80,
                        "enableFloatingIP": False,
                        "idleTimeoutInMinutes": 4,
                        "protocol": "Tcp",
                        "enableTcpReset": False,
                        "loadDistribution": "Default",
                        "backendAddressPool": {"id": lb.pool_id(rule.pool)},
                        "disableOutboundSnat": rule.disable_outbound_snat,
                    },
                }
            )
        return {
            "name": _name(lb.id),
            "id": lb.id,
            "type": "Microsoft.Network/loadBalancers",
            "location": lb.location,
            "sku": {"name": lb.sku},
            "properties": {
                "provisioningState": "Succeeded",
                "frontendIPConfigurations": [{"name": "fe", "id": fe_id, "properties": frontend}],
                "backendAddressPools": pools,
                "loadBalancingRules": rules,
                "probes": [],
                "inboundNatRules": [],
                "outboundRules": outbound_rules,
                "inboundNatPools": [],
            },
        }

    def _nsg_json(self, nsg: NsgSpec) -> dict[str, Any]:
        def rule(name: str, props: dict[str, Any], child: str) -> dict[str, Any]:
            return {
                "name": name,
                "id": f"{nsg.id}/{child}/{name}",
                "properties": {"provisioningState": "Succeeded", **props},
            }

        def one_or_many(key: str, many: str, values: tuple[str, ...]) -> dict[str, Any]:
            # As ARM answers (az network nsg show): the singular for one value, with the plural
            # empty; the plural alone for an augmented rule.
            if len(values) == 1:
                return {key: values[0], many: []}
            return {many: list(values)}

        rules = [
            rule(
                r.name,
                {
                    "protocol": r.protocol,
                    "sourcePortRange": "*",
                    **one_or_many("destinationPortRange", "destinationPortRanges", r.ports),
                    **one_or_many("sourceAddressPrefix", "sourceAddressPrefixes", r.source),
                    **one_or_many("destinationAddressPrefix", "destinationAddressPrefixes", r.destination),
                    "access": r.access,
                    "priority": r.priority,
                    "direction": r.direction,
                },
                "securityRules",
            )
            for r in nsg.rules
        ]
        defaults = [
            rule(
                name,
                {
                    "description": text,
                    "protocol": "*",
                    "sourcePortRange": "*",
                    "destinationPortRange": "*",
                    "sourceAddressPrefix": source,
                    "destinationAddressPrefix": destination,
                    "access": access,
                    "priority": priority,
                    "direction": direction,
                },
                "defaultSecurityRules",
            )
            for name, text, source, destination, access, priority, direction in DEFAULT_NSG_RULES
        ]
        return {
            "name": _name(nsg.id),
            "id": nsg.id,
            "type": "Microsoft.Network/networkSecurityGroups",
            "location": nsg.location,
            "properties": {
                "provisioningState": "Succeeded",
                "securityRules": rules,
                "defaultSecurityRules": defaults,
            },
        }


def _pip_id(vm_id: str, config: str) -> str:
    """The public IP of one IP configuration: ``{vm}-pip`` for the primary (as before), else
    ``{vm}-{config}-pip``."""
    primary = public_ip_id(vm_id)
    return primary if config == "ipconfig1" else f"{primary[: -len('-pip')]}-{config}-pip"


def _not_found(what: str, rg: str) -> ArmResponse:
    return arm_error(
        404,
        "ResourceNotFound",
        f"The Resource 'Microsoft.Network/{what}' under resource group '{rg}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def _sibling(resource_id: str, kind: str, name: str) -> str:
    head, _, _ = resource_id.partition("/providers/Microsoft.Network/")
    return f"{head}/providers/Microsoft.Network/{kind}/{name}"


def _mac(resource_id: str) -> str:
    digest = uuid.uuid5(uuid.NAMESPACE_URL, resource_id.lower()).hex[:10].upper()
    return "00-0D-" + "-".join(digest[i : i + 2] for i in range(0, 8, 2))
