"""Review r11b of the network check (issue 11): NSG rules with plural prefixes and port ranges, the
priorities at the ends (100 and 4096), a deny on the NIC's NSG with an allow on the subnet's, IP
configurations with no primary marked, and fixes that must not undo each other, each held to the
simulator (the oracle) where the estate can say it, and the fix applied to the estate where it can.

Sources: MicrosoftDocs/azure-docs articles/virtual-network/network-security-groups-overview.md
("Augmented security rules"; "A number between 100 and 4096"; "You can't create two security rules
with the same priority and direction"; "Azure platform considerations"); Azure/azure-rest-api-specs
specification/network/resource-manager/Microsoft.Network/stable/2024-07-01/examples/
NetworkInterfaceGet.json (every IP configuration marked ``primary`` true or false); Azure/azure-cli
src/azure-cli/azure/cli/command_modules/network/aaz/latest/network/nsg/rule/_create.py (the rule's
name is the PUT's resource name: a second create with the same name replaces the first).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared.kms_endpoints import kms_of
from shared.model import Outcome, OutcomeKind
from shared.network_fix import fix_for
from shared.network_path import INTERNAL_LB, NSG_DENY, ROUTE_APPLIANCE, PathFacts, PathVerdict, judge
from shared.report import path_groups
from simulator import Estate, EstateError
from tests.network_estate import SPOKE
from tests.test_network_gaps import KMS1, KMS2, NIC, NSG, SUB, TABLE, both, network
from tests.test_network_path import _small, one

PUBLIC = kms_of("AzureCloud")
SCOPE = f"--subscription {SUB} --resource-group rg-net"
LB = SPOKE.replace("virtualNetworks/vnet-spoke", "loadBalancers/lb-int")
NIC_NSG = SPOKE.replace("virtualNetworks/vnet-spoke", "networkSecurityGroups/nsg-nic")


def rule(name: str, priority: int, access: str = "Deny", **match: Any) -> dict[str, Any]:
    return {"name": name, "priority": priority, "direction": "Outbound", "access": access, **match}


def locked(rules: list[dict[str, Any]], *, tunnel: bool = False) -> dict[str, Any]:
    """The subnet with ``rules`` in its NSG; ``tunnel``: a BGP 0.0.0.0/0 (the licensing platform
    rule off) with /32 user routes to Internet for the KMS, so the routes themselves are fine."""
    net = network({"networkSecurityGroup": NSG}, networkSecurityGroups=[{"id": NSG, "rules": rules}])
    if tunnel:
        net["virtualNetworks"][0]["gatewayRoutes"] = ["0.0.0.0/0"]
        net["virtualNetworks"][0]["subnets"][0]["routeTable"] = TABLE
        net["routeTables"] = [
            {
                "id": TABLE,
                "routes": [
                    {"name": f"kms-{i}", "addressPrefix": f"{a}/32", "nextHopType": "Internet"}
                    for i, a in enumerate(PUBLIC.required)
                ],
            }
        ]
    return net


def with_rule(estate: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    fixed = copy.deepcopy(estate)
    fixed["network"]["networkSecurityGroups"][0]["rules"].append(added)
    return fixed


def blocked_outcome(name: str, verdict: PathVerdict) -> Outcome:
    findings = [{**f.as_dict(), "fix": fix_for(f, PUBLIC)} for f in verdict.findings]
    vm = f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"
    details = {"kmsPath": {"state": "blocked", "findings": findings}}
    return Outcome(vm, OutcomeKind.WOULD_REMEDIATE, "avma-kms-unreachable", details=details)


# ------------------------------------------------------------------ one NSG, two denying rules


def test_two_denying_rules_of_one_nsg_are_one_finding_whose_one_allow_repairs_both() -> None:
    """Adjacent denies (300, 301) of one KMS address each, the platform rule off: two fixes would
    both take the free priority 299 under one name, and the second would replace the first."""
    rules = [
        rule("deny-a", 300, destinationAddressPrefix=f"{KMS1}/32"),
        rule("deny-b", 301, destinationAddressPrefix=f"{KMS2}/32"),
    ]
    estate = _small(locked(rules, tunnel=True), NIC)
    verdict, reachable = both(estate)
    finding = one(verdict)
    assert (finding.cause, finding.resource_id, finding.priority, reachable) == (NSG_DENY, NSG, 300, False)
    assert finding.addresses == (KMS1, KMS2)
    assert "rule deny-a (priority 300)" in finding.text and "rule deny-b (priority 301)" in finding.text
    assert fix_for(finding, PUBLIC) == [
        f"az network nsg rule create {SCOPE} --nsg-name nsg-app --name allow-azure-kms-299 --priority 299 "
        "--direction Outbound --access Allow --protocol Tcp "
        f"--destination-address-prefixes {KMS1}/32 {KMS2}/32 --destination-port-ranges 1688"
    ]
    # the written rule, added to the estate, repairs the path for both codes
    allow = rule(
        "allow-azure-kms-299",
        299,
        "Allow",
        protocol="Tcp",
        destinationAddressPrefixes=[f"{KMS1}/32", f"{KMS2}/32"],
        destinationPortRanges=["1688"],
    )
    verdict, reachable = both(with_rule(estate, allow))
    assert (verdict.state, reachable) == ("ok", True), verdict


# ------------------------------------------------------------------ plural prefixes and port ranges


@pytest.mark.parametrize(
    ("match", "state"),
    [
        # the source's second prefix holds the NIC's 10.10.1.4
        ({"sourceAddressPrefixes": ["10.9.0.0/16", "10.10.1.0/24"]}, "blocked"),
        ({"sourceAddressPrefixes": ["10.9.0.0/16", "10.10.2.0/24"]}, "ok"),
        # the second port range holds 1688
        ({"destinationPortRanges": ["443", "1000-2000"]}, "blocked"),
        ({"destinationPortRanges": ["443", "1689-2000"]}, "ok"),
        ({"destinationPortRanges": ["1688"], "protocol": "Udp"}, "ok"),
        ({"destinationPortRanges": ["1688"], "protocol": "Tcp"}, "blocked"),
    ],
)
def test_augmented_rules_match_on_any_entry_for_both_codes(match: dict[str, Any], state: str) -> None:
    estate = _small(
        locked([rule("no-licensing", 200, destinationAddressPrefix="AzurePlatformLKM", **match)]), NIC
    )
    verdict, reachable = both(estate)
    assert (verdict.state, reachable) == (state, state == "ok"), verdict


def test_a_plural_destination_that_holds_a_kms_address_blocks_only_when_the_platform_rule_is_off() -> None:
    deny = rule("deny-some", 500, destinationAddressPrefixes=["10.0.0.0/8", f"{KMS2}/32"])
    held = both(_small(locked([deny]), NIC))  # the platform rule keeps the KMS out of this deny
    assert (held[0].state, held[1]) == ("ok", True), held[0]
    verdict, reachable = both(_small(locked([deny], tunnel=True), NIC))
    finding = one(verdict)
    assert (finding.cause, finding.addresses, reachable) == (NSG_DENY, (KMS2,), False)


def test_the_estate_takes_one_form_of_each_rule_key_not_both() -> None:
    both_forms = rule("x", 200, destinationAddressPrefix="Internet", destinationAddressPrefixes=["Internet"])
    with pytest.raises(EstateError) as error:
        Estate.from_dict(_small(locked([both_forms]), NIC))
    assert error.value.path.endswith("rules[0].destinationAddressPrefixes")
    with pytest.raises(EstateError) as error:
        Estate.from_dict(_small(locked([rule("x", 200, destinationAddressPrefixes=[])]), NIC))
    assert error.value.path.endswith("rules[0].destinationAddressPrefixes")
    with pytest.raises(EstateError) as error:
        Estate.from_dict(_small(locked([rule("x", 200)]), NIC))
    assert error.value.path.endswith("rules[0].destinationAddressPrefix")


# ------------------------------------------------------------------ priorities at the ends


def test_a_deny_at_priority_100_has_no_allow_before_it_and_its_removal_repairs_the_path() -> None:
    estate = _small(locked([rule("no-licensing", 100, destinationAddressPrefix="AzurePlatformLKM")]), NIC)
    verdict, reachable = both(estate)
    finding = one(verdict)
    assert (finding.priority, reachable) == (100, False)
    commands = fix_for(finding, PUBLIC)
    assert commands[0].endswith(f"az network nsg rule delete {SCOPE} --nsg-name nsg-app --name no-licensing")
    assert commands[1] == (
        "# the denying rule has priority 100, the first there is, so no rule can come before it: move "
        "it to a higher number, then allow TCP 1688 to AzurePlatformLKM at a number below it"
    )
    assert not any(c.startswith("az network nsg rule create") for c in commands)
    removed = copy.deepcopy(estate)
    removed["network"]["networkSecurityGroups"][0]["rules"] = []
    verdict, reachable = both(removed)
    assert (verdict.state, reachable) == ("ok", True)


def test_a_deny_at_priority_4096_gets_its_allow_at_4095() -> None:
    estate = _small(locked([rule("no-licensing", 4096, destinationAddressPrefix="AzurePlatformLKM")]), NIC)
    commands = fix_for(one(both(estate)[0]), PUBLIC)
    assert commands[-1].startswith(
        f"az network nsg rule create {SCOPE} --nsg-name nsg-app --name allow-azure-kms-4095 --priority 4095 "
    )
    allow = rule(
        "allow-azure-kms-4095",
        4095,
        "Allow",
        protocol="Tcp",
        destinationAddressPrefix="AzurePlatformLKM",
        destinationPortRange="1688",
    )
    verdict, reachable = both(with_rule(estate, allow))
    assert (verdict.state, reachable) == ("ok", True)


# ------------------------------------------------------------------ NIC's NSG and subnet's NSG


@pytest.mark.parametrize("denying", ["nic", "subnet"])
def test_both_nsgs_must_allow_a_deny_of_azure_platform_lkm_in_either_blocks(denying: str) -> None:
    deny = {
        "id": NSG if denying == "subnet" else NIC_NSG,
        "rules": [rule("no-licensing", 300, destinationAddressPrefix="AzurePlatformLKM")],
    }
    allow = {
        "id": NIC_NSG if denying == "subnet" else NSG,
        "rules": [rule("allow-all", 100, "Allow", destinationAddressPrefix="*")],
    }
    net = network({"networkSecurityGroup": NSG}, networkSecurityGroups=[deny, allow])
    verdict, reachable = both(_small(net, {**NIC, "networkSecurityGroup": NIC_NSG}))
    finding = one(verdict)
    assert (finding.cause, finding.resource_id, reachable) == (NSG_DENY, deny["id"], False)


# ------------------------------------------------------------------ which IP configuration is primary

_SUB_NET = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network"
_SUBNET = {"id": f"{_SUB_NET}/virtualNetworks/v/subnets/app", "properties": {"addressPrefix": "10.0.1.0/24"}}
_SYSTEM = [
    {"source": "Default", "state": "Active", "addressPrefix": ["10.0.0.0/16"], "nextHopType": "VnetLocal"},
    {"source": "Default", "state": "Active", "addressPrefix": ["0.0.0.0/0"], "nextHopType": "Internet"},
]


def _nic(*configs: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{_SUB_NET}/networkInterfaces/vm-nic",
        "properties": {
            "ipConfigurations": [{"name": f"ipconfig{i + 1}", "properties": c} for i, c in enumerate(configs)]
        },
    }


_PIP = {"publicIPAddress": {"id": f"{_SUB_NET}/publicIPAddresses/pip"}}


@pytest.mark.parametrize(
    "flags",
    [
        (None, None),  # neither marked
        (True, True),  # two marked
        (False, False),
    ],
)
def test_two_ip_configurations_without_one_primary_are_unknown_not_the_first_ones_public_ip(
    flags: tuple[bool | None, bool | None],
) -> None:
    first = {"privateIPAddress": "10.0.1.5", **_PIP}
    second = {"privateIPAddress": "10.0.1.4"}
    for config, flag in zip((first, second), flags, strict=True):
        if flag is not None:
            config["primary"] = flag
    verdict = judge(PathFacts(_nic(first, second), _SUBNET, _SYSTEM), PUBLIC)
    assert verdict.state == "unknown", verdict
    assert "2 IP configurations" in verdict.note


def test_the_configuration_marked_primary_counts_wherever_it_is_listed_an_ipv6_one_before_it_too() -> None:
    ipv6 = {
        "privateIPAddress": "ace:cab:deca::4",
        "privateIPAddressVersion": "IPv6",
        "primary": False,
        **_PIP,
    }
    ipv4 = {"privateIPAddress": "10.0.1.4", "privateIPAddressVersion": "IPv4", "primary": True}
    private = {**_SUBNET, "properties": {**_SUBNET["properties"], "defaultOutboundAccess": False}}
    verdict = judge(PathFacts(_nic(ipv6, ipv4), private, _SYSTEM), PUBLIC)
    assert verdict.state == "blocked" and verdict.outbound is None  # not the IPv6 configuration's public IP
    ok = judge(PathFacts(_nic({**ipv6, **_PIP}, {**ipv4, **_PIP}), private, _SYSTEM), PUBLIC)
    assert (ok.state, ok.outbound) == ("ok", "public-ip")
    single = judge(PathFacts(_nic({"privateIPAddress": "10.0.1.4", **_PIP}), private, _SYSTEM), PUBLIC)
    assert (single.state, single.outbound) == ("ok", "public-ip")  # one configuration: it is the primary


# ------------------------------------------------------------------ "What to do": one entry per fix


def test_one_internal_load_balancer_over_two_subnets_gets_a_nat_gateway_fix_for_each_subnet() -> None:
    def behind_lb(subnet: str, ip: str) -> PathVerdict:
        net = network(loadBalancers=[{"id": LB, "sku": "Standard", "public": False}])
        net["virtualNetworks"][0]["subnets"] = [
            {"name": "app", "addressPrefix": "10.10.1.0/24"},
            {"name": "web", "addressPrefix": "10.10.2.0/24"},
        ]
        verdict, reachable = both(
            _small(net, {"subnet": f"{SPOKE}/subnets/{subnet}", "privateIp": ip, "loadBalancers": [LB]})
        )
        assert reachable is False
        assert (one(verdict).cause, one(verdict).resource_id) == (INTERNAL_LB, LB)
        return verdict

    lines = path_groups(
        [
            blocked_outcome("a1", behind_lb("app", "10.10.1.4")),
            blocked_outcome("w1", behind_lb("web", "10.10.2.4")),
        ]
    )
    text = "\n".join(lines)
    assert (
        f"az network vnet subnet update {SCOPE} --vnet-name vnet-spoke --name app --nat-gateway nat-app"
        in text
    )
    assert (
        f"az network vnet subnet update {SCOPE} --vnet-name vnet-spoke --name web --nat-gateway nat-web"
        in text
    )
    assert [line for line in lines if line.startswith("  KMS path")] == [
        line for line in lines if line.startswith("  KMS path") and "(1 VM: " in line
    ]


def test_two_findings_of_one_vm_in_one_route_table_each_keep_their_fix() -> None:
    """A /32 route to a firewall for one KMS address and 0.0.0.0/0 to it for the other: the first
    is updated, the second created; "What to do" shows both, and the VM once in each."""
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
    verdict, _ = both(_small(net, NIC))
    assert [f.cause for f in verdict.findings] == [ROUTE_APPLIANCE, ROUTE_APPLIANCE]
    lines = path_groups([blocked_outcome("vm-x", verdict)])
    for finding in verdict.findings:
        for command in fix_for(finding, PUBLIC):
            assert f"      {command}" in lines
    assert not any("2 VMs" in line for line in lines)


def test_two_vms_denied_by_different_rules_of_one_nsg_get_allows_that_do_not_replace_each_other() -> None:
    def denied(ip: str) -> PathVerdict:
        rules = [
            rule(
                "deny-a", 300, destinationAddressPrefix="AzurePlatformLKM", sourceAddressPrefix="10.10.1.4/32"
            ),
            rule(
                "deny-b", 200, destinationAddressPrefix="AzurePlatformLKM", sourceAddressPrefix="10.10.1.5/32"
            ),
        ]
        verdict, reachable = both(_small(locked(rules), {**NIC, "privateIp": ip}))
        assert reachable is False
        return verdict

    lines = path_groups(
        [blocked_outcome("a", denied("10.10.1.4")), blocked_outcome("b", denied("10.10.1.5"))]
    )
    creates = [line.strip() for line in lines if line.strip().startswith("az network nsg rule create")]
    assert len(creates) == 2
    assert "--name allow-azure-kms-299 --priority 299 " in creates[0]
    assert "--name allow-azure-kms-199 --priority 199 " in creates[1]


def test_a_deny_naming_azure_platform_lkm_in_its_plural_destination_blocks_while_the_platform_rule_holds() -> (
    None
):
    """An ARM template may write the tag in ``destinationAddressPrefixes`` (the az CLI moves a single
    entry to the singular; the simulator answers one entry singular, so only the engine sees it)."""
    rules = [
        {
            "name": "no-licensing",
            "properties": {
                "direction": "Outbound",
                "priority": 300,
                "access": "Deny",
                "protocol": "*",
                "sourceAddressPrefix": "*",
                "destinationPortRange": "*",
                "destinationAddressPrefixes": ["AzurePlatformLKM"],
            },
        }
    ]
    nsg = {"id": f"{_SUB_NET}/networkSecurityGroups/nsg", "properties": {"securityRules": rules}}
    nic = _nic({"privateIPAddress": "10.0.1.4", "primary": True})
    verdict = judge(PathFacts(nic, _SUBNET, _SYSTEM, nsgs=[nsg]), PUBLIC)
    assert verdict.state == "blocked", verdict
    (finding,) = verdict.findings
    assert (finding.cause, finding.platform_tag, finding.addresses) == (NSG_DENY, True, PUBLIC.required)
