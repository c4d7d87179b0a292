"""The VM's path to the KMS from Azure's side: a pure function of what ARM said, to ``ok`` or
``blocked`` with the exact cause and the resource at fault (issue 11).

Inputs are the wire JSON of the reads shared/azure/network.py makes: the NIC, its subnet, the NIC's
effective route table (``NetworkInterfaces_GetEffectiveRouteTable``), the subnet's route table,
the load balancers whose backend pools hold the NIC, and the NIC's and the subnet's NSGs.

The rules (sources in docs/troubleshooting.md, "The path to the KMS"):

- **Next hop.** For every KMS address of the cloud (shared/kms_endpoints.py), the active effective
  route with the longest prefix must have next hop ``Internet``; ``VirtualAppliance`` (an NVA or a
  firewall), ``VirtualNetworkGateway`` (forced tunnelling to on-premises, by a user route or BGP)
  and ``None`` take activation traffic away from an Azure public IP (custom-routes-enable-kms-
  activation.md: "The activation requires that the activation request come from an Azure public
  IP address"). Routes that cover only the retired 23.102.135.246 are named as such.
- **Outbound.** The VM needs an explicit outbound method, a public IP on the NIC, a NAT gateway on
  the subnet, or a public load balancer that gives outbound (Basic, or Standard with outbound
  rules), or else default outbound access: which a private subnet (``defaultOutboundAccess``
  false; the default for new virtual networks after 31 March 2026) and membership of a Standard
  load balancer's backend pool turn off (default-outbound-access.md; includes/ephemeral-ip-note.md).
- **NSGs.** The NIC's and the subnet's outbound rules (then the default ones) must not deny TCP
  1688 to a KMS address. Azure's licensing platform rule keeps activation traffic out of the NSG
  rules that do not name the ``AzurePlatformLKM`` service tag (network-security-groups-overview.md,
  "Azure platform considerations": "these services aren't subject to the configured network
  security groups unless targeted by service tags specific to each service"; "For deployments
  using default route 0.0.0.0/0 configuration, this platform rule is disabled"): while it holds,
  only a deny naming ``AzurePlatformLKM`` blocks; it is off when an active route ``0.0.0.0/0``
  other than the system one (a user route or a BGP route, of any next hop: a GUESS at what
  "default route 0.0.0.0/0 configuration" means, taken so that a doubt gives ``blocked`` and a
  still-licensed VM is not re-keyed) is in the NIC's effective routes, and then every rule counts.

Only the NIC's primary IP configuration counts: the guest's traffic leaves from its private IP, a
public IP serves only its own IP configuration's flows, and a secondary IP configuration gets no
load balancer outbound (load-balancer-outbound-connections.md). A load balancer gives outbound only
to the backend pool that an outbound rule, or a load-balancing rule with outbound SNAT on a public
frontend, names. An NSG rule applies only if its source holds the primary private IP; the service
tags that hold a KMS address are ``Internet``, ``AzurePlatformLKM``, ``VirtualNetwork`` (when a
route prefix holds it) and, a guess, ``AzureCloud`` (docs/troubleshooting.md).

The verdict says what it could not read (``unknown``) rather than guess.

The simulator (simulator/network.py) is the oracle of this check: the two are written apart on
purpose, each from the public sources, and tests/test_network_path.py and tests/test_network_gaps.py
hold them to each other; neither imports the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shared.kms_endpoints import CloudKms

OK: Final = "ok"
BLOCKED: Final = "blocked"
UNKNOWN: Final = "unknown"

# Cause words: the same in the JSON output, the ledger and the "What to do" grouping.
ROUTE_APPLIANCE: Final = "route-to-appliance"
ROUTE_GATEWAY: Final = "route-to-gateway"
ROUTE_NONE: Final = "route-to-none"
ROUTE_OTHER: Final = "route-not-internet"
RETIRED_ONLY: Final = "routes-for-retired-kms-only"
PRIVATE_SUBNET: Final = "private-subnet-no-outbound"
INTERNAL_LB: Final = "internal-load-balancer-only"
LB_NO_OUTBOUND: Final = "load-balancer-no-outbound"
SECONDARY_PIP: Final = "public-ip-on-secondary-config-only"
NSG_DENY: Final = "nsg-denies-kms"
ROUTE_CAUSES: Final = frozenset({ROUTE_APPLIANCE, ROUTE_GATEWAY, ROUTE_NONE, ROUTE_OTHER, RETIRED_ONLY})
OUTBOUND_CAUSES: Final = frozenset({PRIVATE_SUBNET, INTERNAL_LB, LB_NO_OUTBOUND, SECONDARY_PIP})
_HOP_CAUSE: Final = {
    "VirtualAppliance": ROUTE_APPLIANCE,
    "VirtualNetworkGateway": ROUTE_GATEWAY,
    "None": ROUTE_NONE,
}


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What ARM said about one NIC's path (wire JSON)."""

    nic: Mapping[str, Any]
    subnet: Mapping[str, Any]
    routes: Sequence[Mapping[str, Any]]
    route_table: Mapping[str, Any] | None = None
    load_balancers: Sequence[Mapping[str, Any]] = ()
    nsgs: Sequence[Mapping[str, Any]] = ()  # the NIC's, then the subnet's


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason the path is blocked, and the one resource to change."""

    cause: str
    resource_id: str
    text: str
    addresses: tuple[str, ...] = ()
    subnet_id: str = ""
    location: str = ""
    priority: int = 0  # NSG_DENY: the denying rule's priority
    taken: tuple[int, ...] = ()  # NSG_DENY: the priorities the NSG's outbound rules already use
    rule: str = ""  # NSG_DENY: the denying rule's name
    platform_tag: bool = False  # NSG_DENY: the rule names AzurePlatformLKM (licensing turned off)
    # Route causes: (address, route name, has a next hop IP) of each user route already at the
    # address's /32 in the route table, which the fix updates instead of creating a duplicate.
    existing: tuple[tuple[str, str, bool], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cause": self.cause, "resource": self.resource_id, "text": self.text}
        if self.addresses:
            out["addresses"] = list(self.addresses)
        if self.subnet_id:
            out["subnet"] = self.subnet_id
        return out


@dataclass(frozen=True, slots=True)
class PathVerdict:
    state: str  # ok | blocked | unknown
    findings: tuple[Finding, ...] = ()
    outbound: str | None = None  # public-ip | nat-gateway | load-balancer | default-outbound-access
    note: str = ""  # unknown: why; ok: anything worth saying (default outbound access is retiring)
    nic_id: str = ""
    subnet_id: str = ""

    @property
    def blocked(self) -> bool:
        return self.state == BLOCKED

    def summary(self) -> str:
        if self.state == BLOCKED:
            return "; ".join(f.text for f in self.findings)
        return self.note or self.state

    def as_details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.findings:
            out["findings"] = [f.as_dict() for f in self.findings]
        if self.outbound:
            out["outbound"] = self.outbound
        if self.note:
            out["note"] = self.note
        if self.nic_id:
            out["nic"] = self.nic_id
        return out


def unknown(why: str, *, nic_id: str = "") -> PathVerdict:
    return PathVerdict(UNKNOWN, note=why, nic_id=nic_id)


def judge(facts: PathFacts, kms: CloudKms) -> PathVerdict:
    """``ok`` or ``blocked`` (with every finding) for the NIC in ``facts``."""
    subnet = facts.subnet
    subnet_id = str(subnet.get("id") or "")
    subnet_name = name_of(subnet_id)
    location = str(facts.nic.get("location") or "")
    nic_id = str(facts.nic.get("id") or "")
    silent = _routes_unreadable(facts, kms) or _primary_unclear(facts.nic)
    if silent:
        return unknown(silent, nic_id=nic_id)
    findings: list[Finding] = []
    findings += _route_findings(facts, kms, subnet_id, subnet_name, location)
    way, outbound_finding = _outbound(facts, subnet_id, subnet_name, location)
    if outbound_finding is not None:
        findings.append(outbound_finding)
    nsg_findings, exempt = _nsg_findings(facts, kms, subnet_id, location)
    findings += nsg_findings
    if findings:
        return PathVerdict(
            BLOCKED, tuple(findings), way, note="; ".join(exempt), nic_id=nic_id, subnet_id=subnet_id
        )
    notes = []
    if way == "default-outbound-access":
        notes.append(
            f"outbound through default outbound access (subnet {subnet_name} is not private); new "
            "virtual networks get private subnets after 31 March 2026, so an explicit outbound "
            "method (a NAT gateway) keeps activation working"
        )
    notes += exempt
    return PathVerdict(OK, (), way, note="; ".join(notes), nic_id=nic_id, subnet_id=subnet_id)


# ------------------------------------------------------------------ routes


# ARM spells these in one case; an answer in another (a proxy, an older API version) means the same.
_HOP_TYPES: Final = {
    name.lower(): name
    for name in ("Internet", "VirtualAppliance", "VirtualNetworkGateway", "None", "VnetLocal")
}
_SOURCES: Final = {name.lower(): name for name in ("User", "VirtualNetworkGateway", "Default")}
# Among routes with the same prefix: user route, then BGP, then system (virtual-networks-udr-overview.md).
_SOURCE_RANK: Final = {"User": 0, "VirtualNetworkGateway": 1, "Default": 2}


def hop_type(route: Mapping[str, Any]) -> str:
    """The route's ``nextHopType`` in ARM's spelling (``""`` when the answer has none)."""
    text = str(route.get("nextHopType") or "")
    return _HOP_TYPES.get(text.lower(), text)


def _source(route: Mapping[str, Any]) -> str:
    text = str(route.get("source") or "")
    return _SOURCES.get(text.lower(), text)


def _active(routes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in routes if str(r.get("state") or "Active").lower() == "active"]


def _routes_unreadable(facts: PathFacts, kms: CloudKms) -> str:
    """Why the effective routes cannot be judged (``""`` when they can): every NIC has the system
    routes (NetworkInterfaceEffectiveRouteTableList.json), so an empty answer, or a winning route
    without a next hop, says nothing about the path; neither is a route to ``None``."""
    routes = _active(facts.routes)
    if not routes:
        return "the effective route table of the network interface is empty (is the VM running?)"
    for address in kms.required:
        hop = best_route(routes, address)
        if hop is not None and not hop_type(hop):
            return f"the effective route for {address} names no next hop"
    return ""


def _route_findings(
    facts: PathFacts, kms: CloudKms, subnet_id: str, subnet_name: str, location: str
) -> list[Finding]:
    routes = _active(facts.routes)
    table = facts.route_table
    table_id = str(table.get("id") or "") if table else ""
    # Blocking routes, grouped: one finding per route, naming every KMS address it takes.
    blocked: dict[tuple[str, str, str, str], list[str]] = {}
    for address in kms.required:
        hop = best_route(routes, address)
        kind = hop_type(hop) if hop else "None"
        if kind == "Internet":
            continue
        prefix = _prefix_of(hop, address) if hop else "(no route)"
        ip = next(iter(_list(hop.get("nextHopIpAddress"))), "") if hop else ""
        source = _source(hop) if hop else ""
        blocked.setdefault((prefix, kind, str(ip), source), []).append(address)
    if not blocked:
        return []
    retired_routes = _routes_for(table, kms.retired) if table else []
    findings: list[Finding] = []
    for (prefix, kind, ip, source), addresses in blocked.items():
        target = f"{kind} {ip}".strip()
        if source == "User" and table_id:
            where = f"in route table {name_of(table_id)} (subnet {subnet_name})"
            resource = table_id
        elif source == "VirtualNetworkGateway":
            where = f"learned from the virtual network gateway over BGP (subnet {subnet_name})"
            resource = table_id or subnet_id
        else:
            where = f"(subnet {subnet_name})"
            resource = table_id or subnet_id
        text = (
            f"route {prefix} → {target} {where}: TCP {kms.port} to {_and(addresses)} does not leave "
            "from an Azure public IP"
        )
        cause = _HOP_CAUSE.get(kind, ROUTE_OTHER)
        if retired_routes:
            cause = RETIRED_ONLY
            text = (
                f"routes exist for {_and(kms.retired)} only, not for {_and(addresses)}: "
                f"route table {name_of(table_id)} (subnet {subnet_name}) sends them by route "
                f"{prefix} → {target}"
            )
        existing = _routes_at(table, addresses) if table and resource == table_id else ()
        findings.append(
            Finding(cause, resource, text, tuple(addresses), subnet_id, location, existing=existing)
        )
    return findings


def _routes_at(table: Mapping[str, Any], addresses: Sequence[str]) -> tuple[tuple[str, str, bool], ...]:
    """(address, route name, has a next hop IP) for each user route of ``table`` whose prefix is the
    address's /32: a second route with the same prefix cannot be created, the route is updated."""
    found: list[tuple[str, str, bool]] = []
    for address in addresses:
        host = ipaddress.ip_network(f"{address}/32")
        for route in _list(_obj(table.get("properties")).get("routes")):
            props = _obj(_obj(route).get("properties"))
            try:
                network = ipaddress.ip_network(str(props.get("addressPrefix") or ""), strict=False)
            except ValueError:
                continue
            name = str(_obj(route).get("name") or "")
            if network == host and name:
                found.append((address, name, bool(props.get("nextHopIpAddress"))))
                break
    return tuple(found)


def best_route(routes: Iterable[Mapping[str, Any]], address: str) -> Mapping[str, Any] | None:
    """The route with the longest prefix that holds ``address``; among equal prefixes the user
    route, then the BGP route, then the system route (virtual-networks-udr-overview.md). Azure
    marks the losers ``Invalid`` already; the order is kept for an answer that leaves two active."""
    ip = ipaddress.ip_address(address)
    best: tuple[int, int, Mapping[str, Any]] | None = None
    for route in routes:
        rank = _SOURCE_RANK.get(_source(route), len(_SOURCE_RANK))
        for text in _list(route.get("addressPrefix")):
            try:
                network = ipaddress.ip_network(str(text), strict=False)
            except ValueError:
                continue  # a service tag or something not an address: never the KMS's route here
            if ip not in network:
                continue
            if best is None or (network.prefixlen, -rank) > (best[0], -best[1]):
                best = (network.prefixlen, rank, route)
    return best[2] if best else None


def _prefix_of(route: Mapping[str, Any], address: str) -> str:
    ip = ipaddress.ip_address(address)
    held = [str(p) for p in _list(route.get("addressPrefix")) if _holds(str(p), ip)]
    return held[0] if held else str(next(iter(_list(route.get("addressPrefix"))), "?"))


def _holds(prefix: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ip in ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return False


def _routes_for(table: Mapping[str, Any], addresses: Sequence[str]) -> list[str]:
    """User routes (next hop Internet) whose prefix holds one of ``addresses`` and is narrower than /8."""
    found = []
    for route in _list(_obj(table.get("properties")).get("routes")):
        props = _obj(_obj(route).get("properties"))
        prefix = str(props.get("addressPrefix") or "")
        if hop_type(props) != "Internet":
            continue
        try:
            network = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            continue
        if network.prefixlen >= 8 and any(ipaddress.ip_address(a) in network for a in addresses):
            found.append(prefix)
    return found


# ------------------------------------------------------------------ outbound


def _configs(nic: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The NIC's IP configurations (name, properties), the primary first (``primary: true``, else the
    first one, as NetworkInterfaceGet.json lists a single configuration)."""
    configs = [
        (str(_obj(c).get("name") or ""), _obj(_obj(c).get("properties")))
        for c in _list(_obj(nic.get("properties")).get("ipConfigurations"))
    ]
    at = next((i for i, (_, c) in enumerate(configs) if c.get("primary") is True), 0)
    return configs[at : at + 1] + configs[:at] + configs[at + 1 :]


def _primary_unclear(nic: Mapping[str, Any]) -> str:
    """Why the primary IP configuration cannot be told (``""`` when it can): ARM marks each IP
    configuration of a NIC ``primary`` true or false (NetworkInterfaceGet.json), and exactly one is
    primary; with two or more and not exactly one marked, taking the first could read a public IP
    or a backend pool the guest's traffic never uses (review r11b)."""
    configs = _list(_obj(nic.get("properties")).get("ipConfigurations"))
    if len(configs) < 2:
        return ""
    marked = sum(1 for c in configs if _obj(_obj(c).get("properties")).get("primary") is True)
    if marked == 1:
        return ""
    return (
        f"the network interface has {len(configs)} IP configurations and {marked or 'none'} of them "
        "marked primary: which one the guest's traffic leaves from is not known"
    )


def _pools(config: Mapping[str, Any]) -> set[str]:
    pools = _list(config.get("loadBalancerBackendAddressPools"))
    return {str(_obj(pool).get("id") or "").lower() for pool in pools} - {""}


def _ids(props: Mapping[str, Any], one: str, many: str) -> set[str]:
    refs = [props.get(one), *_list(props.get(many))]
    return {str(_obj(r).get("id") or "").lower() for r in refs} - {""}


def _gives_outbound(lb: Mapping[str, Any], pool: str) -> bool:
    """Whether ``lb`` SNATs the outbound flows of backend pool ``pool`` (a lower-case id): an
    outbound rule that names it, or a load-balancing rule that names it, on a public frontend,
    without ``disableOutboundSnat`` (load-balancer-outbound-connections.md, LoadBalancerCreate.json)."""
    props = _obj(lb.get("properties"))
    public_frontends = {
        str(_obj(fe).get("id") or "").lower()
        for fe in _list(props.get("frontendIPConfigurations"))
        if _obj(_obj(_obj(fe).get("properties")).get("publicIPAddress")).get("id")
        or _obj(_obj(_obj(fe).get("properties")).get("publicIPPrefix")).get("id")
    }
    if not public_frontends:
        return False
    for rule in _list(props.get("outboundRules")):
        if pool in _ids(_obj(_obj(rule).get("properties")), "backendAddressPool", "backendAddressPools"):
            return True
    for rule in _list(props.get("loadBalancingRules")):
        rule_props = _obj(_obj(rule).get("properties"))
        if rule_props.get("disableOutboundSnat") is True:
            continue
        frontend = str(_obj(rule_props.get("frontendIPConfiguration")).get("id") or "").lower()
        if frontend and frontend not in public_frontends:
            continue
        if pool in _ids(rule_props, "backendAddressPool", "backendAddressPools"):
            return True
    return False


def _pools_of(lb: Mapping[str, Any], pools: set[str]) -> list[str]:
    head = str(lb.get("id") or "").lower() + "/backendaddresspools/"
    return sorted(p for p in pools if p.startswith(head))


def _outbound(
    facts: PathFacts, subnet_id: str, subnet_name: str, location: str
) -> tuple[str | None, Finding | None]:
    subnet_props = _obj(facts.subnet.get("properties"))
    if _obj(subnet_props.get("natGateway")).get("id"):
        return "nat-gateway", None
    configs = _configs(facts.nic)
    if not configs:
        configs = [("", {})]
    primary_name, primary = configs[0]
    secondaries = configs[1:]
    # A public IP serves its own IP configuration's flows only, and the guest's leave from the
    # primary's private IP (load-balancer-outbound-connections.md: "Azure uses the public IP
    # assigned to the IP configuration of the instance's NIC for all outbound flows").
    if _obj(primary.get("publicIPAddress")).get("id"):
        return "public-ip", None
    primary_pools = _pools(primary)
    every_pool = primary_pools.union(*(_pools(c) for _, c in secondaries))
    standard: list[tuple[Mapping[str, Any], list[str]]] = []
    for lb in facts.load_balancers:
        if any(_gives_outbound(lb, pool) for pool in _pools_of(lb, primary_pools)):
            return "load-balancer", None
        sku = str(_obj(lb.get("sku")).get("name") or "Basic")
        held = _pools_of(lb, every_pool)
        if sku == "Standard" and held:
            standard.append((lb, held))
    if standard:
        lb, held = standard[0]
        lb_id = str(lb.get("id") or "")
        pools = _and([name_of(p) for p in held])
        internal = not any(
            _obj(_obj(_obj(fe).get("properties")).get("publicIPAddress")).get("id")
            for fe in _list(_obj(lb.get("properties")).get("frontendIPConfigurations"))
        )
        if internal:
            text = (
                f"the VM is behind the Standard internal load balancer {name_of(lb_id)} only, which turns "
                f"off default outbound access, and subnet {subnet_name} has no NAT gateway"
            )
            return None, Finding(INTERNAL_LB, lb_id, text, (), subnet_id, location)
        text = (
            f"the Standard public load balancer {name_of(lb_id)} has no outbound rule, nor a "
            f"load-balancing rule with outbound SNAT, for the backend pool {pools} of the primary IP "
            f"configuration, and its backend pool members get no default outbound access (subnet "
            f"{subnet_name} has no NAT gateway)"
        )
        return None, Finding(LB_NO_OUTBOUND, lb_id, text, (), subnet_id, location)
    with_pip = [name for name, c in secondaries if _obj(c.get("publicIPAddress")).get("id")]
    if with_pip:
        # "having a single NIC with a standard public IP prevents default outbound access for the
        # virtual machine" (default-outbound-access.md); Basic public IPs are retired.
        nic_id = str(facts.nic.get("id") or "")
        text = (
            f"network interface {name_of(nic_id)} has a public IP on its secondary IP configuration "
            f"{_and(with_pip)} only: activation leaves from the primary IP configuration "
            f"{primary_name or '(primary)'} ({primary.get('privateIPAddress') or 'its private IP'}), "
            "which has none, and a public IP on the NIC turns off default outbound access; subnet "
            f"{subnet_name} has no NAT gateway"
        )
        return None, Finding(SECONDARY_PIP, nic_id, text, (), subnet_id, location)
    if subnet_props.get("defaultOutboundAccess") is False:
        text = (
            f"subnet {subnet_name} is private (defaultOutboundAccess false) and has no NAT gateway, and "
            "the VM has no public IP or load balancer outbound rule"
        )
        return None, Finding(PRIVATE_SUBNET, subnet_id, text, (), subnet_id, location)
    return "default-outbound-access", None


# ------------------------------------------------------------------ NSGs

_DEFAULT_OUTBOUND: Final = (
    {
        "name": "AllowVnetOutBound",
        "priority": 65000,
        "access": "Allow",
        "protocol": "*",
        "destinationAddressPrefix": "VirtualNetwork",
        "destinationPortRange": "*",
    },
    {
        "name": "AllowInternetOutBound",
        "priority": 65001,
        "access": "Allow",
        "protocol": "*",
        "destinationAddressPrefix": "Internet",
        "destinationPortRange": "*",
    },
    {
        "name": "DenyAllOutBound",
        "priority": 65500,
        "access": "Deny",
        "protocol": "*",
        "destinationAddressPrefix": "*",
        "destinationPortRange": "*",
    },
)


@dataclass(frozen=True, slots=True)
class _Match:
    """What an NSG rule is matched against besides the destination: the primary IP configuration's
    private IP and application security groups, the ``VirtualNetwork`` tag's prefixes, the KMS."""

    source_ip: str
    asgs: frozenset[str]
    vnet_space: tuple[str, ...]
    kms: frozenset[str]
    port: int


def _match_context(facts: PathFacts, kms: CloudKms) -> _Match:
    configs = _configs(facts.nic)
    primary = configs[0][1] if configs else {}
    asgs = frozenset(
        str(_obj(a).get("id") or "").lower() for a in _list(primary.get("applicationSecurityGroups"))
    )
    # "The virtual network address space ..., all connected on-premises address spaces, ... and
    # address prefixes used on user-defined routes. This tag might also contain default routes."
    # (service-tags-overview.md): the effective routes' VnetLocal, BGP and user route prefixes.
    space: list[str] = []
    for route in facts.routes:
        if hop_type(route) == "VnetLocal" or _source(route) in ("User", "VirtualNetworkGateway"):
            space += [str(p) for p in _list(route.get("addressPrefix"))]
    return _Match(
        source_ip=str(primary.get("privateIPAddress") or ""),
        asgs=asgs - {""},
        vnet_space=tuple(space),
        kms=frozenset((*kms.required, *kms.retired)),
        port=kms.port,
    )


# The licensing platform rule (network-security-groups-overview.md, "Azure platform considerations"):
# activation traffic "isn't subject to the configured network security groups unless targeted by"
# the AzurePlatformLKM service tag, and "For deployments using default route 0.0.0.0/0
# configuration, this platform rule is disabled" (the link goes to virtual-networks-udr-overview.md,
# "0.0.0.0/0 address prefix": the system route overridden by a user or BGP route). The field reports
# agree (a Deny of the Internet tag did not stop TCP 1688; faultbucket.ca 2021/06), and so does
# SupportArticles-docs windows-vm-activation-error-0xc004f074.md ("activation traffic to the KMS
# IPs on port 1688 remains enabled because of platform internal rules").
_PLATFORM_TAG: Final = "azureplatformlkm"


def default_route(routes: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The active route ``0.0.0.0/0`` that is not the system one (a user route, or one learned over
    BGP), whatever its next hop, or None: the "default route 0.0.0.0/0 configuration" that turns
    the licensing platform rule off. That any next hop counts (a user route 0.0.0.0/0 to
    ``Internet`` too) is a GUESS: the sources do not say, and a doubt must give ``blocked``."""
    found = [
        r
        for r in _active(routes)
        if _source(r) in ("User", "VirtualNetworkGateway")
        and any(_is_default(str(p)) for p in _list(r.get("addressPrefix")))
    ]
    found.sort(key=lambda r: _SOURCE_RANK.get(_source(r), len(_SOURCE_RANK)))
    return found[0] if found else None


def _is_default(prefix: str) -> bool:
    try:
        return ipaddress.ip_network(prefix.strip(), strict=False) == ipaddress.ip_network("0.0.0.0/0")
    except ValueError:
        return False


def _describe_default(route: Mapping[str, Any], table: Mapping[str, Any] | None) -> str:
    target = f"{hop_type(route)} {next(iter(_list(route.get('nextHopIpAddress'))), '')}".strip()
    if _source(route) == "User":
        where = f" in route table {name_of(str(table.get('id') or ''))}" if table else ""
        return f"route 0.0.0.0/0 → {target}{where}"
    return f"route 0.0.0.0/0 → {target} learned over BGP"


def _names_platform_tag(rule: Mapping[str, Any]) -> bool:
    prefixes = [rule.get("destinationAddressPrefix"), *_list(rule.get("destinationAddressPrefixes"))]
    return any(str(p).lower() == _PLATFORM_TAG for p in prefixes if p)


def _nsg_findings(
    facts: PathFacts, kms: CloudKms, subnet_id: str, location: str
) -> tuple[list[Finding], list[str]]:
    """The NSG rules that deny TCP 1688 to a KMS address (findings), and the remarks on the rules
    that would deny it but do not apply while the licensing platform rule holds (notes)."""
    findings: list[Finding] = []
    notes: list[str] = []
    context = _match_context(facts, kms)
    override = default_route(facts.routes)
    platform = override is None  # the licensing platform rule holds
    for nsg in facts.nsgs:
        nsg_id = str(nsg.get("id") or "")
        props = _obj(nsg.get("properties"))
        rules = [
            {**_obj(_obj(r).get("properties")), "name": _obj(r).get("name")}
            for r in _list(props.get("securityRules"))
            if str(_obj(_obj(r).get("properties")).get("direction") or "").lower() == "outbound"
        ]
        rules.sort(key=lambda r: int(r.get("priority") or 0))
        defaults = [
            {**_obj(_obj(r).get("properties")), "name": _obj(r).get("name")}
            for r in _list(props.get("defaultSecurityRules"))
            if str(_obj(_obj(r).get("properties")).get("direction") or "").lower() == "outbound"
        ] or list(_DEFAULT_OUTBOUND)
        defaults.sort(key=lambda r: int(r.get("priority") or 0))
        taken = tuple(sorted({int(r.get("priority") or 0) for r in rules}))
        denied: dict[tuple[str, int, bool], list[str]] = {}
        exempt: dict[tuple[str, int], list[str]] = {}
        for address in kms.required:
            matching = [r for r in (*rules, *defaults) if _rule_matches(r, address, context)]
            # While the platform rule holds, a deny that does not name AzurePlatformLKM does not
            # touch activation traffic; the first rule left decides (an allow, or such a deny). That
            # an allow before an AzurePlatformLKM deny still lets it through (NSG priority order)
            # is a GUESS; so is that a deny of the KMS's own addresses does not apply either (the
            # article names service tags only).
            applies = [
                r
                for r in matching
                if not platform or str(r.get("access") or "").lower() != "deny" or _names_platform_tag(r)
            ]
            rule = applies[0] if applies else None
            if rule is not None and str(rule.get("access") or "").lower() == "deny":
                key = (str(rule.get("name")), int(rule.get("priority") or 0), _names_platform_tag(rule))
                denied.setdefault(key, []).append(address)
                continue
            first = matching[0] if matching else None
            if first is not None and str(first.get("access") or "").lower() == "deny":
                exempt.setdefault((str(first.get("name")), int(first.get("priority") or 0)), []).append(
                    address
                )
        texts: list[str] = []
        for (rule_name, priority, tagged), addresses in denied.items():
            text = (
                f"network security group {name_of(nsg_id)} rule {rule_name} (priority {priority}) denies "
                f"TCP {kms.port} to {_and(addresses)}"
            )
            if tagged:
                text += " (a deny of the service tag AzurePlatformLKM, which turns Windows licensing off)"
            elif override is not None:
                text += (
                    f": the {_describe_default(override, facts.route_table)} turns off Azure's licensing "
                    "platform rule, which otherwise keeps activation traffic out of NSG rules that do "
                    "not name AzurePlatformLKM"
                )
            texts.append(text)
        if denied:
            # One finding per NSG: its fix is one allow before the first of the denying rules, for
            # every KMS address they deny. Two fixes for one NSG would be two allows at the same
            # free priority, or the second would replace the first (review r11b).
            keys = sorted(denied, key=lambda k: k[1])
            rule_name, priority, _ = keys[0]
            addresses = [a for a in kms.required if any(a in denied[k] for k in keys)]
            findings.append(
                Finding(
                    NSG_DENY,
                    nsg_id,
                    "; ".join(texts),
                    tuple(addresses),
                    subnet_id,
                    location,
                    priority,
                    taken,
                    rule=rule_name,
                    platform_tag=all(k[2] for k in keys),
                )
            )
        for (rule_name, priority), addresses in exempt.items():
            notes.append(
                f"network security group {name_of(nsg_id)} rule {rule_name} (priority {priority}) matches "
                f"TCP {kms.port} to {_and(addresses)} but does not block activation: Azure's licensing "
                "platform rule keeps it out of NSG rules that do not name AzurePlatformLKM while no "
                "route 0.0.0.0/0 replaces the system default route; with one (forced tunnelling) this "
                "rule would block it"
            )
    return findings, notes


def _rule_matches(rule: Mapping[str, Any], address: str, context: _Match) -> bool:
    if str(rule.get("protocol") or "*").lower() not in ("*", "tcp"):
        return False
    ports = [rule.get("destinationPortRange"), *_list(rule.get("destinationPortRanges"))]
    if not any(_port_in(str(p), context.port) for p in ports if p):
        return False
    if not _source_holds(rule, context):
        return False  # a rule for other sources than this VM's primary private IP
    prefixes = [rule.get("destinationAddressPrefix"), *_list(rule.get("destinationAddressPrefixes"))]
    # destinationApplicationSecurityGroups hold VMs, never a KMS address: such a rule does not match.
    return any(_address_in(str(p), address, context) for p in prefixes if p)


def _source_holds(rule: Mapping[str, Any], context: _Match) -> bool:
    """Whether the rule's source holds the VM: its prefixes (or service tags) hold the primary private
    IP, or its application security groups hold the primary IP configuration. A rule that names no
    source at all (not what ARM answers) and a NIC without a private IP count as held."""
    prefixes = [
        str(p) for p in [rule.get("sourceAddressPrefix"), *_list(rule.get("sourceAddressPrefixes"))] if p
    ]
    groups = {
        str(_obj(g).get("id") or "").lower() for g in _list(rule.get("sourceApplicationSecurityGroups"))
    }
    groups -= {""}
    if groups:
        return bool(groups & context.asgs)
    if not prefixes or not context.source_ip:
        return True
    return any(_address_in(p, context.source_ip, context) for p in prefixes)


def _port_in(spec: str, port: int) -> bool:
    if spec == "*":
        return True
    low, _, high = spec.partition("-")
    try:
        return int(low) <= port <= int(high or low)
    except ValueError:
        return False


# Service tags that hold the KMS: AzurePlatformLKM is "Windows licensing or key management service"
# (service-tags-overview.md). AzureCloud ("All datacenter public IP addresses") is a GUESS: no public
# source lists the KMS addresses in it, but they are Azure's own public addresses.
_KMS_TAGS: Final = frozenset({"azureplatformlkm", "azurecloud"})


def _address_in(spec: str, address: str, context: _Match) -> bool:
    """``*``, a prefix, or a service tag: ``Internet`` (public addresses), ``VirtualNetwork`` (the
    VNet, BGP and user route prefixes), the tags that hold the KMS (for a KMS address). Other tags
    (``Storage``, ``AzureCloud.westeurope``, ...) are not resolved (their lists are not read) and
    never match: a guess that docs/troubleshooting.md states."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if spec == "*":
        return True
    tag = spec.lower()
    if tag == "internet":
        return ip.is_global
    if tag == "virtualnetwork":
        return any(_holds(p, ip) for p in context.vnet_space)
    if tag in _KMS_TAGS:
        return address in context.kms
    return _holds(spec, ip)


# ------------------------------------------------------------------ helpers


def name_of(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1] if resource_id else ""


def _and(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
