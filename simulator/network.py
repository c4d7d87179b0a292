"""The simulated estate's network: virtual networks, subnets, NICs, route tables, NAT gateways, load
balancers and NSGs, and what each guest's path to the KMS is, derived from them as Azure would.

An estate file may hold a ``network`` object (docs/simulator.md, "Networks") and give each VM a
``nic``. :func:`parse_network` validates both strictly (the JSON path of any problem in
``EstateError``); :func:`kms_path` is Azure's behaviour as Microsoft documents it:

- routes: the system routes of an effective route table (NetworkInterfaceEffectiveRouteTableList.json
  in azure-rest-api-specs Microsoft.Network stable 2024-07-01: the VNet's prefixes ``VnetLocal``,
  ``0.0.0.0/0`` ``Internet``, 10/8, 100.64/10, 172.16/12, 192.168/16 ``None``), the routes a VPN or
  ExpressRoute gateway learns over BGP (``gatewayRoutes``, next hop ``VirtualNetworkGateway``,
  unless the route table disables propagation) and the route table's user routes; the longest
  prefix wins, and on equal prefixes a user route beats a BGP route beats a system route
  (MicrosoftDocs/azure-docs articles/virtual-network/virtual-networks-udr-overview.md, "How Azure
  selects a route"); a replaced route is listed ``Invalid``.
- outbound: a public IP on the NIC, a NAT gateway on the subnet, a public load balancer that gives
  outbound (Basic, or Standard with outbound rules), else default outbound access, which a private
  subnet (``defaultOutboundAccess: false``) and membership of any Standard load balancer's backend
  pool turn off (MicrosoftDocs/azure-docs articles/virtual-network/ip-services/default-outbound-access.md,
  ms.date 12/03/2025; includes/ephemeral-ip-note.md, ms.date 04/15/2024). A route to ``Internet``
  in a private subnet without explicit outbound goes nowhere (the same article, "Limitations of
  private subnets").
- NSGs: the NIC's and the subnet's outbound rules, lowest priority number first, the default rules
  last (NetworkSecurityGroupGet.json); the first rule that matches TCP 1688 to the address decides,
  except that Azure's licensing platform rule keeps KMS traffic out of every deny that does not
  name ``AzurePlatformLKM`` unless a route ``0.0.0.0/0`` replaces the system default route
  (network-security-groups-overview.md, "Azure platform considerations"; :func:`licensing_platform_rule`).

The KMS addresses here are Azure's side of the contract, kept apart from the engine's table
(shared/kms_endpoints.py) on purpose: tests/test_kms_endpoints.py holds both to the same source.

This module is the oracle of the engine's check (shared/network_path.py): the two are written
apart on purpose, each from the public sources (docs/simulator.md, "Networks"), and the tests hold
them to each other; neither imports the other. What the issue 11 review left open, and both now
model the same way: only the NIC's primary IP configuration carries the guest's traffic (a public IP
or a backend pool on a secondary one gives it no outbound); a load balancer gives outbound only to
the backend pool an outbound rule, or a load-balancing rule with outbound SNAT, names; an NSG rule
applies only when its source holds the primary private IP; the service tags the KMS addresses fall
in (``Internet``, ``AzurePlatformLKM``, ``VirtualNetwork`` when a route prefix holds them, and, a
guess, ``AzureCloud``) match; two rules of one NSG never share a priority and direction.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from simulator.estate import EstateError

# Azure's KMS addresses per cloud (custom-routes-enable-kms-activation.md; the public cloud's
# 23.102.135.246 is retired: windows-activation-stopped-working.md, "Timeline").
KMS_ADDRESSES: Final[Mapping[str, tuple[str, ...]]] = {
    "AzureCloud": ("20.118.99.224", "40.83.235.53"),
    "AzureUSGovernment": ("23.97.0.13", "52.126.105.2"),
    "AzureChinaCloud": ("159.27.28.100", "163.228.64.161", "42.159.7.249"),
}
KMS_PORT: Final = 1688
NEXT_HOP_TYPES: Final = ("Internet", "VirtualAppliance", "VirtualNetworkGateway", "VnetLocal", "None")
LB_SKUS: Final = ("Standard", "Basic")
# The system routes of the spec example, after the VNet's own prefixes.
SYSTEM_ROUTES: Final = (
    ("0.0.0.0/0", "Internet"),
    ("10.0.0.0/8", "None"),
    ("100.64.0.0/10", "None"),
    ("172.16.0.0/12", "None"),
    ("192.168.0.0/16", "None"),
)
_SOURCE_RANK: Final = {"User": 0, "VirtualNetworkGateway": 1, "Default": 2}
_NET_ID = re.compile(
    r"^/subscriptions/(?P<sub>[0-9a-fA-F-]{36})/resourceGroups/(?P<rg>[-\w._()]{1,90})"
    r"/providers/Microsoft\.Network/(?P<type>[A-Za-z]+)/(?P<name>[A-Za-z0-9][-\w.]{0,79})$",
    re.IGNORECASE,
)
_NAME = re.compile(r"^[A-Za-z0-9][-\w.]{0,79}$")
_LOCATION = re.compile(r"^[a-z0-9]{2,40}$")


# ------------------------------------------------------------------ the model


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    address_prefix: str
    next_hop_type: str
    next_hop_ip: str | None = None


@dataclass(frozen=True, slots=True)
class RouteTableSpec:
    id: str
    location: str
    routes: tuple[Route, ...]
    disable_bgp_route_propagation: bool = False


@dataclass(frozen=True, slots=True)
class SubnetSpec:
    vnet_id: str
    name: str
    address_prefix: str
    default_outbound_access: bool | None = None  # null (absent): default outbound allowed
    route_table: str | None = None
    nat_gateway: str | None = None
    nsg: str | None = None

    @property
    def id(self) -> str:
        return f"{self.vnet_id}/subnets/{self.name}"


@dataclass(frozen=True, slots=True)
class VnetSpec:
    id: str
    location: str
    address_prefixes: tuple[str, ...]
    subnets: tuple[SubnetSpec, ...]
    gateway_routes: tuple[str, ...] = ()  # prefixes a VPN/ExpressRoute gateway advertises over BGP


@dataclass(frozen=True, slots=True)
class NatGatewaySpec:
    id: str
    location: str


@dataclass(frozen=True, slots=True)
class LbRule:
    """A load-balancing rule: its backend pool and whether it gives that pool outbound SNAT."""

    name: str
    pool: str
    disable_outbound_snat: bool = False


@dataclass(frozen=True, slots=True)
class LoadBalancerSpec:
    id: str
    location: str
    sku: str
    public: bool
    outbound_pools: tuple[str, ...] = ()  # the backend pools an outbound rule names
    pools: tuple[str, ...] = ("be",)
    rules: tuple[LbRule, ...] = ()
    raw_outbound: object = field(default=False, compare=False)

    @property
    def outbound_rules(self) -> bool:
        return bool(self.outbound_pools)

    def pool_id(self, pool: str) -> str:
        return f"{self.id}/backendAddressPools/{pool}"

    def gives_outbound(self, pool: str) -> bool:
        """Whether this load balancer SNATs the outbound flows of ``pool``'s members: an outbound
        rule naming the pool (public Standard), or a load-balancing rule on the public frontend with
        outbound SNAT (load-balancer-outbound-connections.md)."""
        if not self.public:
            return False
        if pool in self.outbound_pools:
            return True
        return any(r.pool == pool and not r.disable_outbound_snat for r in self.rules)


@dataclass(frozen=True, slots=True)
class SecurityRule:
    name: str
    priority: int
    direction: str
    access: str
    protocol: str
    destination: tuple[str, ...]
    ports: tuple[str, ...]
    source: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class NsgSpec:
    id: str
    location: str
    rules: tuple[SecurityRule, ...]


@dataclass(frozen=True, slots=True)
class IpConfigSpec:
    """A secondary IP configuration of a NIC (``ipconfig2``, ...): same subnet, its own private IP,
    optionally its own public IP and backend pools."""

    private_ip: str
    public_ip: bool = False
    load_balancers: tuple[str, ...] = ()  # load balancer ids (first pool) or backend pool ids

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"privateIp": self.private_ip}
        if self.public_ip:
            out["publicIp"] = True
        if self.load_balancers:
            out["loadBalancers"] = list(self.load_balancers)
        return out


@dataclass(frozen=True, slots=True)
class NicSpec:
    """A VM's network interface: its subnet, the primary IP configuration's private IP (and public
    IP and backend pools), secondary IP configurations, and its NSG."""

    subnet: str
    private_ip: str
    public_ip: bool = False
    load_balancers: tuple[str, ...] = ()  # load balancer ids (first pool) or backend pool ids
    nsg: str | None = None
    secondary: tuple[IpConfigSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subnet": self.subnet, "privateIp": self.private_ip}
        if self.public_ip:
            out["publicIp"] = True
        if self.load_balancers:
            out["loadBalancers"] = list(self.load_balancers)
        if self.nsg:
            out["networkSecurityGroup"] = self.nsg
        if self.secondary:
            out["secondaryIpConfigurations"] = [c.to_dict() for c in self.secondary]
        return out

    def configs(self) -> list[tuple[str, IpConfigSpec]]:
        """Every IP configuration by name, the primary (``ipconfig1``) first."""
        primary = IpConfigSpec(self.private_ip, self.public_ip, self.load_balancers)
        return [("ipconfig1", primary)] + [(f"ipconfig{i + 2}", c) for i, c in enumerate(self.secondary)]


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """Every network resource of an estate, by lower-cased ARM id; ``raw`` is the file's form."""

    vnets: Mapping[str, VnetSpec]
    subnets: Mapping[str, SubnetSpec]
    route_tables: Mapping[str, RouteTableSpec]
    nat_gateways: Mapping[str, NatGatewaySpec]
    load_balancers: Mapping[str, LoadBalancerSpec]
    nsgs: Mapping[str, NsgSpec]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class EffectiveRoute:
    source: str  # Default | User | VirtualNetworkGateway
    state: str  # Active | Invalid
    prefix: str
    next_hop_type: str
    next_hop_ip: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class KmsPath:
    """Whether the NIC reaches every KMS address of the cloud on TCP 1688, and why not."""

    reachable: bool
    why: str


# ------------------------------------------------------------------ parsing


def parse_network(raw: object, path: str = "$.network") -> NetworkSpec:
    obj = _object(raw, path)
    _keys(
        obj, path, ("virtualNetworks", "routeTables", "natGateways", "loadBalancers", "networkSecurityGroups")
    )
    route_tables: dict[str, RouteTableSpec] = {}
    for i, item in enumerate(_array(obj.get("routeTables", []), f"{path}.routeTables")):
        table = _route_table(item, f"{path}.routeTables[{i}]")
        _unique(route_tables, table.id, f"{path}.routeTables[{i}].id")
        route_tables[table.id.lower()] = table
    nats: dict[str, NatGatewaySpec] = {}
    for i, item in enumerate(_array(obj.get("natGateways", []), f"{path}.natGateways")):
        where = f"{path}.natGateways[{i}]"
        o = _object(item, where)
        _keys(o, where, ("id", "location"), required=("id",))
        nat_id = _id(o["id"], f"{where}.id", "natGateways")
        _unique(nats, nat_id, f"{where}.id")
        nats[nat_id.lower()] = NatGatewaySpec(
            nat_id, _location(o.get("location", "westeurope"), f"{where}.location")
        )
    lbs: dict[str, LoadBalancerSpec] = {}
    for i, item in enumerate(_array(obj.get("loadBalancers", []), f"{path}.loadBalancers")):
        lb = _load_balancer(item, f"{path}.loadBalancers[{i}]")
        _unique(lbs, lb.id, f"{path}.loadBalancers[{i}].id")
        lbs[lb.id.lower()] = lb
    nsgs: dict[str, NsgSpec] = {}
    for i, item in enumerate(_array(obj.get("networkSecurityGroups", []), f"{path}.networkSecurityGroups")):
        nsg = _nsg(item, f"{path}.networkSecurityGroups[{i}]")
        _unique(nsgs, nsg.id, f"{path}.networkSecurityGroups[{i}].id")
        nsgs[nsg.id.lower()] = nsg
    vnets: dict[str, VnetSpec] = {}
    subnets: dict[str, SubnetSpec] = {}
    for i, item in enumerate(_array(obj.get("virtualNetworks", []), f"{path}.virtualNetworks")):
        vnet = _vnet(item, f"{path}.virtualNetworks[{i}]", route_tables, nats, nsgs)
        _unique(vnets, vnet.id, f"{path}.virtualNetworks[{i}].id")
        vnets[vnet.id.lower()] = vnet
        for subnet in vnet.subnets:
            subnets[subnet.id.lower()] = subnet
    return NetworkSpec(vnets, subnets, route_tables, nats, lbs, nsgs, raw=dict(obj))


def parse_nic(raw: object, path: str, network: NetworkSpec | None) -> NicSpec:
    obj = _object(raw, path)
    _keys(
        obj,
        path,
        (
            "subnet",
            "privateIp",
            "publicIp",
            "loadBalancers",
            "networkSecurityGroup",
            "secondaryIpConfigurations",
        ),
        required=("subnet", "privateIp"),
    )
    if network is None:
        raise EstateError(path, "a nic needs the estate's $.network (its subnet is defined there)")
    subnet_id = _string(obj["subnet"], f"{path}.subnet")
    subnet = network.subnets.get(subnet_id.lower())
    if subnet is None:
        raise EstateError(f"{path}.subnet", f"no subnet {subnet_id[:200]!r} in $.network.virtualNetworks")
    primary = _ip_config(obj, path, subnet, network)
    secondary: list[IpConfigSpec] = []
    seen = {primary.private_ip}
    for i, item in enumerate(
        _array(obj.get("secondaryIpConfigurations", []), f"{path}.secondaryIpConfigurations")
    ):
        where = f"{path}.secondaryIpConfigurations[{i}]"
        config_obj = _object(item, where)
        _keys(config_obj, where, ("privateIp", "publicIp", "loadBalancers"), required=("privateIp",))
        config = _ip_config(config_obj, where, subnet, network)
        if config.private_ip in seen:
            raise EstateError(f"{where}.privateIp", f"{config.private_ip} is already on this NIC")
        seen.add(config.private_ip)
        secondary.append(config)
    nsg: str | None = None
    if obj.get("networkSecurityGroup") is not None:
        nsg_id = _string(obj["networkSecurityGroup"], f"{path}.networkSecurityGroup")
        if nsg_id.lower() not in network.nsgs:
            raise EstateError(
                f"{path}.networkSecurityGroup", f"no NSG {nsg_id[:200]!r} in $.network.networkSecurityGroups"
            )
        nsg = network.nsgs[nsg_id.lower()].id
    return NicSpec(
        subnet=subnet.id,
        private_ip=primary.private_ip,
        public_ip=primary.public_ip,
        load_balancers=primary.load_balancers,
        nsg=nsg,
        secondary=tuple(secondary),
    )


def _ip_config(obj: Mapping[str, Any], path: str, subnet: SubnetSpec, network: NetworkSpec) -> IpConfigSpec:
    private_ip = _string(obj["privateIp"], f"{path}.privateIp")
    try:
        inside = ipaddress.ip_address(private_ip) in ipaddress.ip_network(subnet.address_prefix)
    except ValueError as error:
        raise EstateError(f"{path}.privateIp", f"not an IPv4 address: {private_ip[:40]!r}") from error
    if not inside:
        raise EstateError(
            f"{path}.privateIp", f"{private_ip} is not in subnet {subnet.name} ({subnet.address_prefix})"
        )
    lbs: list[str] = []
    for i, lb in enumerate(_array(obj.get("loadBalancers", []), f"{path}.loadBalancers")):
        ref = _string(lb, f"{path}.loadBalancers[{i}]")
        found = pool_of(ref, network)
        if found is None:
            raise EstateError(
                f"{path}.loadBalancers[{i}]",
                f"no load balancer or backend pool {ref[:200]!r} in $.network.loadBalancers",
            )
        lbs.append(found[0].id if "/backendaddresspools/" not in ref.lower() else found[0].pool_id(found[1]))
    return IpConfigSpec(private_ip, _bool(obj.get("publicIp", False), f"{path}.publicIp"), tuple(lbs))


def _vnet(
    raw: object,
    path: str,
    route_tables: Mapping[str, RouteTableSpec],
    nats: Mapping[str, NatGatewaySpec],
    nsgs: Mapping[str, NsgSpec],
) -> VnetSpec:
    obj = _object(raw, path)
    _keys(
        obj,
        path,
        ("id", "location", "addressPrefixes", "subnets", "gatewayRoutes"),
        required=("id", "addressPrefixes", "subnets"),
    )
    vnet_id = _id(obj["id"], f"{path}.id", "virtualNetworks")
    prefixes = tuple(
        _prefix(p, f"{path}.addressPrefixes[{i}]")
        for i, p in enumerate(_array(obj["addressPrefixes"], f"{path}.addressPrefixes"))
    )
    if not prefixes:
        raise EstateError(f"{path}.addressPrefixes", "a virtual network needs at least one address prefix")
    gateway = tuple(
        _prefix(p, f"{path}.gatewayRoutes[{i}]")
        for i, p in enumerate(_array(obj.get("gatewayRoutes", []), f"{path}.gatewayRoutes"))
    )
    subnets: list[SubnetSpec] = []
    for i, item in enumerate(_array(obj["subnets"], f"{path}.subnets")):
        where = f"{path}.subnets[{i}]"
        o = _object(item, where)
        _keys(
            o,
            where,
            (
                "name",
                "addressPrefix",
                "defaultOutboundAccess",
                "routeTable",
                "natGateway",
                "networkSecurityGroup",
            ),
            required=("name", "addressPrefix"),
        )
        name = _string(o["name"], f"{where}.name")
        if not _NAME.match(name) or any(s.name.lower() == name.lower() for s in subnets):
            raise EstateError(f"{where}.name", f"not a subnet name, or a duplicate: {name[:80]!r}")
        prefix = _prefix(o["addressPrefix"], f"{where}.addressPrefix")
        if not any(ipaddress.ip_network(prefix).subnet_of(ipaddress.ip_network(p)) for p in prefixes):  # type: ignore[arg-type]
            raise EstateError(
                f"{where}.addressPrefix", f"{prefix} is not inside the virtual network's prefixes"
            )
        doa = o.get("defaultOutboundAccess")
        subnets.append(
            SubnetSpec(
                vnet_id=vnet_id,
                name=name,
                address_prefix=prefix,
                default_outbound_access=None if doa is None else _bool(doa, f"{where}.defaultOutboundAccess"),
                route_table=_ref(
                    o.get("routeTable"), f"{where}.routeTable", route_tables, "$.network.routeTables"
                ),
                nat_gateway=_ref(o.get("natGateway"), f"{where}.natGateway", nats, "$.network.natGateways"),
                nsg=_ref(
                    o.get("networkSecurityGroup"),
                    f"{where}.networkSecurityGroup",
                    nsgs,
                    "$.network.networkSecurityGroups",
                ),
            )
        )
    return VnetSpec(
        id=vnet_id,
        location=_location(obj.get("location", "westeurope"), f"{path}.location"),
        address_prefixes=prefixes,
        subnets=tuple(subnets),
        gateway_routes=gateway,
    )


def _route_table(raw: object, path: str) -> RouteTableSpec:
    obj = _object(raw, path)
    _keys(obj, path, ("id", "location", "routes", "disableBgpRoutePropagation"), required=("id", "routes"))
    routes: list[Route] = []
    for i, item in enumerate(_array(obj["routes"], f"{path}.routes")):
        where = f"{path}.routes[{i}]"
        o = _object(item, where)
        _keys(
            o,
            where,
            ("name", "addressPrefix", "nextHopType", "nextHopIpAddress"),
            required=("name", "addressPrefix", "nextHopType"),
        )
        hop = _choice(o["nextHopType"], f"{where}.nextHopType", NEXT_HOP_TYPES)
        ip = o.get("nextHopIpAddress")
        if (hop == "VirtualAppliance") != (ip is not None):
            raise EstateError(f"{where}.nextHopIpAddress", "required for VirtualAppliance, and only there")
        if ip is not None:
            _prefix(f"{_string(ip, f'{where}.nextHopIpAddress')}/32", f"{where}.nextHopIpAddress")
        name = _string(o["name"], f"{where}.name")
        if not _NAME.match(name):
            raise EstateError(f"{where}.name", f"not a route name: {name[:80]!r}")
        routes.append(Route(name, _prefix(o["addressPrefix"], f"{where}.addressPrefix"), hop, ip))
    return RouteTableSpec(
        id=_id(obj["id"], f"{path}.id", "routeTables"),
        location=_location(obj.get("location", "westeurope"), f"{path}.location"),
        routes=tuple(routes),
        disable_bgp_route_propagation=_bool(
            obj.get("disableBgpRoutePropagation", False), f"{path}.disableBgpRoutePropagation"
        ),
    )


def _load_balancer(raw: object, path: str) -> LoadBalancerSpec:
    o = _object(raw, path)
    _keys(
        o,
        path,
        ("id", "location", "sku", "public", "outboundRules", "backendPools", "loadBalancingRules"),
        required=("id", "public"),
    )
    pools: list[str] = []
    for i, name in enumerate(_array(o.get("backendPools", ["be"]), f"{path}.backendPools")):
        text = _string(name, f"{path}.backendPools[{i}]")
        if not _NAME.match(text) or text.lower() in (p.lower() for p in pools):
            raise EstateError(f"{path}.backendPools[{i}]", f"not a pool name, or a duplicate: {text[:80]!r}")
        pools.append(text)
    if not pools:
        raise EstateError(f"{path}.backendPools", "a load balancer needs at least one backend pool")

    def pool(value: object, where: str) -> str:
        text = _string(value, where)
        found = next((p for p in pools if p.lower() == text.lower()), None)
        if found is None:
            raise EstateError(where, f"no backend pool {text[:80]!r} in backendPools")
        return found

    public = _bool(o["public"], f"{path}.public")
    sku = _choice(o.get("sku", "Standard"), f"{path}.sku", LB_SKUS)
    raw_outbound = o.get("outboundRules", False)
    if isinstance(raw_outbound, list):
        outbound = tuple(
            pool(p, f"{path}.outboundRules[{i}]")
            for i, p in enumerate(_array(raw_outbound, f"{path}.outboundRules"))
        )
    else:
        outbound = (pools[0],) if _bool(raw_outbound, f"{path}.outboundRules") else ()
    if outbound and not (public and sku == "Standard"):
        raise EstateError(f"{path}.outboundRules", "only a public Standard load balancer has outbound rules")
    rules: list[LbRule] = []
    for i, item in enumerate(_array(o.get("loadBalancingRules", []), f"{path}.loadBalancingRules")):
        where = f"{path}.loadBalancingRules[{i}]"
        r = _object(item, where)
        _keys(r, where, ("name", "backendPool", "disableOutboundSnat"), required=("name",))
        name = _string(r["name"], f"{where}.name")
        if not _NAME.match(name) or any(x.name.lower() == name.lower() for x in rules):
            raise EstateError(f"{where}.name", f"not a rule name, or a duplicate: {name[:80]!r}")
        rules.append(
            LbRule(
                name,
                pool(r.get("backendPool", pools[0]), f"{where}.backendPool"),
                _bool(r.get("disableOutboundSnat", False), f"{where}.disableOutboundSnat"),
            )
        )
    return LoadBalancerSpec(
        id=_id(o["id"], f"{path}.id", "loadBalancers"),
        location=_location(o.get("location", "westeurope"), f"{path}.location"),
        sku=sku,
        public=public,
        outbound_pools=outbound,
        pools=tuple(pools),
        rules=tuple(rules),
        raw_outbound=raw_outbound,
    )


def pool_of(ref: str, network: NetworkSpec) -> tuple[LoadBalancerSpec, str] | None:
    """The load balancer and backend pool a NIC's ``loadBalancers`` entry names: a load balancer id
    (its first pool) or a backend pool id ``{load balancer id}/backendAddressPools/{name}``."""
    low = ref.lower()
    at = low.find(_POOLS)
    lb = network.load_balancers.get(low if at < 0 else low[:at])
    if lb is None:
        return None
    if at < 0:
        return lb, lb.pools[0]
    name = low[at + len(_POOLS) :]
    found = next((p for p in lb.pools if p.lower() == name), None)
    return (lb, found) if found is not None else None


_POOLS: Final = "/backendaddresspools/"


def _nsg(raw: object, path: str) -> NsgSpec:
    obj = _object(raw, path)
    _keys(obj, path, ("id", "location", "rules"), required=("id", "rules"))
    rules: list[SecurityRule] = []
    for i, item in enumerate(_array(obj["rules"], f"{path}.rules")):
        where = f"{path}.rules[{i}]"
        o = _object(item, where)
        _keys(
            o,
            where,
            (
                "name",
                "priority",
                "direction",
                "access",
                "protocol",
                "destinationAddressPrefix",
                "destinationAddressPrefixes",
                "destinationPortRange",
                "destinationPortRanges",
                "sourceAddressPrefix",
                "sourceAddressPrefixes",
            ),
            required=("name", "priority", "direction", "access"),
        )
        priority = o["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or not 100 <= priority <= 4096:
            raise EstateError(f"{where}.priority", "expected a whole number from 100 to 4096")
        # "You can't create two security rules with the same priority and direction."
        # (network-security-groups-overview.md, "Security rules")
        if any(r.priority == priority and r.direction == o.get("direction") for r in rules):
            raise EstateError(
                f"{where}.priority", f"another {o.get('direction')} rule of this NSG has priority {priority}"
            )
        rules.append(
            SecurityRule(
                name=_string(o["name"], f"{where}.name"),
                priority=priority,
                direction=_choice(o["direction"], f"{where}.direction", ("Inbound", "Outbound")),
                access=_choice(o["access"], f"{where}.access", ("Allow", "Deny")),
                protocol=_choice(o.get("protocol", "*"), f"{where}.protocol", ("*", "Tcp", "Udp", "Icmp")),
                destination=_one_or_many(o, where, "destinationAddressPrefix", "destinationAddressPrefixes"),
                ports=_one_or_many(o, where, "destinationPortRange", "destinationPortRanges", "*"),
                source=_one_or_many(o, where, "sourceAddressPrefix", "sourceAddressPrefixes", "*"),
            )
        )
    return NsgSpec(
        id=_id(obj["id"], f"{path}.id", "networkSecurityGroups"),
        location=_location(obj.get("location", "westeurope"), f"{path}.location"),
        rules=tuple(rules),
    )


def _one_or_many(
    o: Mapping[str, Any], where: str, key: str, many: str, default: str | None = None
) -> tuple[str, ...]:
    """A rule's ``key`` or its augmented plural ``many`` (network-security-groups-overview.md,
    "Augmented security rules"; the ``--destination-address-prefixes`` of ``az network nsg rule
    create``), never both; ``default`` when neither is given (None: one of them is required)."""
    if key in o and many in o:
        raise EstateError(f"{where}.{many}", f"give {key} or {many}, not both")
    if many in o:
        items = _array(o[many], f"{where}.{many}")
        if not items:
            raise EstateError(f"{where}.{many}", "expected at least one entry")
        return tuple(_string(v, f"{where}.{many}[{i}]") for i, v in enumerate(items))
    if key not in o and default is None:
        raise EstateError(f"{where}.{key}", "required key is missing")
    return (_string(o.get(key, default), f"{where}.{key}"),)


# ------------------------------------------------------------------ derivation


def effective_routes(nic: NicSpec, network: NetworkSpec) -> list[EffectiveRoute]:
    """The NIC's effective routes: system, BGP-learned and user routes, replaced ones Invalid."""
    subnet = network.subnets[nic.subnet.lower()]
    vnet = network.vnets[subnet.vnet_id.lower()]
    table = network.route_tables.get((subnet.route_table or "").lower())
    candidates: list[EffectiveRoute] = [
        EffectiveRoute("Default", "Active", p, "VnetLocal") for p in vnet.address_prefixes
    ]
    candidates += [EffectiveRoute("Default", "Active", p, hop) for p, hop in SYSTEM_ROUTES]
    if table is None or not table.disable_bgp_route_propagation:
        candidates += [
            EffectiveRoute("VirtualNetworkGateway", "Active", p, "VirtualNetworkGateway")
            for p in vnet.gateway_routes
        ]
    if table is not None:
        candidates += [
            EffectiveRoute("User", "Active", r.address_prefix, r.next_hop_type, r.next_hop_ip, r.name)
            for r in table.routes
        ]
    best: dict[str, EffectiveRoute] = {}
    for route in candidates:
        key = str(ipaddress.ip_network(route.prefix))
        held = best.get(key)
        if held is None or _SOURCE_RANK[route.source] < _SOURCE_RANK[held.source]:
            best[key] = route
    return [r if best[str(ipaddress.ip_network(r.prefix))] is r else _invalid(r) for r in candidates]


def _invalid(route: EffectiveRoute) -> EffectiveRoute:
    return EffectiveRoute(
        route.source, "Invalid", route.prefix, route.next_hop_type, route.next_hop_ip, route.name
    )


def next_hop(routes: Sequence[EffectiveRoute], address: str) -> EffectiveRoute | None:
    """The active route with the longest prefix that holds ``address``."""
    ip = ipaddress.ip_address(address)
    matching = [r for r in routes if r.state == "Active" and ip in ipaddress.ip_network(r.prefix)]
    return max(matching, key=lambda r: ipaddress.ip_network(r.prefix).prefixlen, default=None)


def outbound(nic: NicSpec, network: NetworkSpec) -> str | None:
    """How the NIC's primary IP configuration (the one the guest's traffic leaves from) reaches
    public endpoints, or None when it has no way.

    A public IP serves the flows of its own IP configuration only ("Azure uses the public IP
    assigned to the IP configuration of the instance's NIC for all outbound flows"; "Secondary IP
    configurations of a network interface don't provide outbound communication (unless a public IP
    is associated to it) via a load balancer": load-balancer-outbound-connections.md), and a Standard
    public IP on any of the VM's NICs turns off default outbound access (default-outbound-access.md,
    "Add an explicit outbound method"): a public IP on a secondary configuration alone leaves the
    primary with nothing."""
    subnet = network.subnets[nic.subnet.lower()]
    if subnet.nat_gateway:
        return "nat-gateway"
    if nic.public_ip:
        return "public-ip"
    for ref in nic.load_balancers:
        found = pool_of(ref, network)
        if found is not None and found[0].gives_outbound(found[1]):
            return "load-balancer"
    if any(c.public_ip for c in nic.secondary):
        return None  # a Standard public IP on the NIC: no default outbound access for the VM
    members = [pool_of(ref, network) for _, c in nic.configs() for ref in c.load_balancers]
    if any(found is not None and found[0].sku == "Standard" for found in members):
        return None  # a Standard pool member gets no default outbound access
    if subnet.default_outbound_access is False:
        return None
    return "default-outbound-access"


def licensing_platform_rule(nic: NicSpec, network: NetworkSpec) -> bool:
    """Whether Azure's licensing platform rule holds for this NIC: activation traffic (TCP 1688 to
    the KMS) "isn't subject to the configured network security groups unless targeted by" the
    ``AzurePlatformLKM`` service tag, and "For deployments using default route 0.0.0.0/0
    configuration, this platform rule is disabled" (MicrosoftDocs/azure-docs
    articles/virtual-network/network-security-groups-overview.md, "Azure platform considerations";
    the link goes to virtual-networks-udr-overview.md, "0.0.0.0/0 address prefix", where the system
    route is overridden by a user-defined or a BGP route). So it holds unless the subnet's effective
    routes have an active ``0.0.0.0/0`` that is not the system route. A GUESS: that a user route
    ``0.0.0.0/0`` of any next hop (``Internet`` too) turns it off; the sources do not say."""
    return not any(
        r.state == "Active" and r.source != "Default" and ipaddress.ip_network(r.prefix).prefixlen == 0
        for r in effective_routes(nic, network)
    )


def nsg_verdict(nic: NicSpec, network: NetworkSpec, address: str) -> str | None:
    """The NSG rule that denies TCP 1688 to ``address`` (``nsg/rule``), or None when allowed.

    While the licensing platform rule holds, only a ``Deny`` naming ``AzurePlatformLKM`` touches
    the KMS traffic: other denies (``Internet``, ``*``, the KMS address itself) are passed over, and
    the first rule left decides. GUESSES: that an allow before such a deny still wins (the
    ordinary priority order), and that a deny of the KMS address by prefix is passed over too (the
    article names service tags only)."""
    subnet = network.subnets[nic.subnet.lower()]
    vnet_space = virtual_network_tag(nic, network)
    platform = licensing_platform_rule(nic, network)
    for nsg_id in (nic.nsg, subnet.nsg):
        if not nsg_id:
            continue
        nsg = network.nsgs[nsg_id.lower()]
        for rule in (*sorted(nsg.rules, key=lambda r: r.priority), *DEFAULT_OUTBOUND):
            if rule.direction != "Outbound" or not rule_matches(
                rule, nic.private_ip, address, KMS_PORT, vnet_space
            ):
                continue
            if rule.access == "Deny" and platform and not _names_lkm(rule):
                continue  # the platform rule keeps activation traffic out of this rule
            if rule.access == "Deny":
                return f"{_name(nsg.id)}/{rule.name}"
            break
    return None


def _names_lkm(rule: SecurityRule) -> bool:
    return any(spec.lower() == "azureplatformlkm" for spec in rule.destination)


def virtual_network_tag(nic: NicSpec, network: NetworkSpec) -> tuple[str, ...]:
    """The prefixes the ``VirtualNetwork`` service tag holds for this NIC: "The virtual network
    address space ..., all connected on-premises address spaces, ... and address prefixes used on
    user-defined routes. This tag might also contain default routes." (service-tags-overview.md):
    the network's prefixes, the gateway's BGP prefixes and the subnet's user route prefixes (so a
    ``/32`` route for a KMS address puts it in the tag)."""
    subnet = network.subnets[nic.subnet.lower()]
    vnet = network.vnets[subnet.vnet_id.lower()]
    table = network.route_tables.get((subnet.route_table or "").lower())
    user = tuple(r.address_prefix for r in table.routes) if table else ()
    # The BGP prefixes as the effective routes show them: not where propagation is off.
    bgp = vnet.gateway_routes if table is None or not table.disable_bgp_route_propagation else ()
    return (*vnet.address_prefixes, *bgp, *user)


# Service tags that hold a KMS address: AzurePlatformLKM is "Windows licensing or key management
# service" (service-tags-overview.md); AzureCloud ("All datacenter public IP addresses") is a GUESS:
# no public source lists the KMS addresses in it, but they are Azure's own public addresses.
_KMS_TAGS: Final = frozenset({"azureplatformlkm", "azurecloud"})


def rule_matches(
    rule: SecurityRule, source_ip: str, address: str, port: int, vnet_space: Sequence[str] = ()
) -> bool:
    if rule.protocol not in ("*", "Tcp"):
        return False
    if not any(_port_in(spec, port) for spec in rule.ports):
        return False
    if not any(_address_in(spec, source_ip, vnet_space) for spec in rule.source):
        return False  # the rule is for other sources than this VM's primary private IP
    return any(_address_in(spec, address, vnet_space) for spec in rule.destination)


def _port_in(spec: str, port: int) -> bool:
    if spec == "*":
        return True
    low, _, high = spec.partition("-")
    try:
        return int(low) <= port <= int(high or low)
    except ValueError:
        return False


def _address_in(spec: str, address: str, vnet_space: Sequence[str] = ()) -> bool:
    """``*``, a prefix, or a service tag: ``Internet`` (every public address), ``VirtualNetwork``
    (``vnet_space``), the tags that hold the KMS (``_KMS_TAGS``, for a KMS address only); every
    other tag (``Storage``, ``AzureCloud.westeurope``, ...) never holds a KMS address or a VM here."""
    ip = ipaddress.ip_address(address)
    if spec == "*":
        return True
    tag = spec.lower()
    if tag == "internet":
        return ip.is_global
    if tag == "virtualnetwork":
        return any(ip in ipaddress.ip_network(p) for p in vnet_space)
    if tag in _KMS_TAGS:
        return any(address in kms for kms in KMS_ADDRESSES.values())
    try:
        return ip in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


DEFAULT_OUTBOUND: Final = (
    SecurityRule(
        "AllowVnetOutBound", 65000, "Outbound", "Allow", "*", ("VirtualNetwork",), ("*",), ("VirtualNetwork",)
    ),
    SecurityRule("AllowInternetOutBound", 65001, "Outbound", "Allow", "*", ("Internet",), ("*",)),
    SecurityRule("DenyAllOutBound", 65500, "Outbound", "Deny", "*", ("*",), ("*",)),
)


def kms_path(nic: NicSpec, network: NetworkSpec, cloud: str) -> KmsPath:
    """Whether the guest behind ``nic`` reaches every KMS address of ``cloud`` on TCP 1688."""
    routes = effective_routes(nic, network)
    for address in KMS_ADDRESSES[cloud]:
        hop = next_hop(routes, address)
        if hop is None or hop.next_hop_type != "Internet":
            kind = hop.next_hop_type if hop else "no route"
            return KmsPath(False, f"{address}: next hop {kind}")
        denied = nsg_verdict(nic, network, address)
        if denied is not None:
            return KmsPath(False, f"{address}: denied by {denied}")
    way = outbound(nic, network)
    if way is None:
        return KmsPath(False, "no outbound connectivity")
    return KmsPath(True, way)


# ------------------------------------------------------------------ REST shapes


def nic_id(vm_id: str) -> str:
    """The NIC id the VM model names (``{vm}-nic`` in the VM's resource group, as arm.py writes it)."""
    head, _, name = vm_id.rpartition("/providers/Microsoft.Compute/virtualMachines/")
    return f"{head}/providers/Microsoft.Network/networkInterfaces/{name}-nic"


def public_ip_id(vm_id: str) -> str:
    head, _, name = vm_id.rpartition("/providers/Microsoft.Compute/virtualMachines/")
    return f"{head}/providers/Microsoft.Network/publicIPAddresses/{name}-pip"


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


# ------------------------------------------------------------------ validation helpers


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise EstateError(path, "expected an object")
    return value


def _array(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise EstateError(path, "expected an array")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise EstateError(path, "expected a non-empty string")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise EstateError(path, "expected true or false")
    return value


def _choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise EstateError(path, f"expected one of {', '.join(choices)}")
    return value


def _keys(obj: Mapping[str, Any], path: str, allowed: Sequence[str], *, required: Sequence[str] = ()) -> None:
    for name in required:
        if name not in obj:
            raise EstateError(f"{path}.{name}", "required key is missing")
    for name in obj:
        if name not in allowed:
            raise EstateError(f"{path}.{name}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _id(value: object, path: str, kind: str) -> str:
    text = _string(value, path)
    match = _NET_ID.match(text)
    if match is None or match["type"].lower() != kind.lower():
        raise EstateError(path, f"not a Microsoft.Network/{kind} resource id: {text[:200]!r}")
    return text


def _prefix(value: object, path: str) -> str:
    text = _string(value, path)
    try:
        network = ipaddress.ip_network(text)
    except ValueError as error:
        raise EstateError(path, f"not an IPv4 prefix (a.b.c.d/n, host bits zero): {text[:60]!r}") from error
    if network.version != 4:
        raise EstateError(path, "only IPv4 prefixes are modelled")
    return text


def _location(value: object, path: str) -> str:
    text = _string(value, path)
    if not _LOCATION.match(text):
        raise EstateError(path, f"not an Azure region name: {text[:60]!r}")
    return text


def _ref(value: object, path: str, known: Mapping[str, Any], where: str) -> str | None:
    if value is None:
        return None
    text = _string(value, path)
    if text.lower() not in known:
        raise EstateError(path, f"no {text[:200]!r} in {where}")
    return text


def _unique(seen: Mapping[str, Any], resource_id: str, path: str) -> None:
    if resource_id.lower() in seen:
        raise EstateError(path, f"duplicate id {resource_id[:200]} (ids ignore case)")
