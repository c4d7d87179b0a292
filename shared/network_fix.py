"""The fix for each resource at fault on a VM's path to the KMS, written out as ``az`` commands.

Never applied: the identity has no right to change networks (infra/ grants only reads and the
effective-route action). The commands follow Microsoft's own cure: a ``/32`` route with next hop
``Internet`` per KMS address in the subnet's route table (custom-routes-enable-kms-activation.md),
a NAT gateway on the subnet for a VM with no outbound (default-outbound-access.md, "Add an
explicit outbound method": "Note this is the recommended method for most scenarios"), and an NSG
rule that allows TCP 1688 to the KMS addresses before the rule that denies it, at the nearest
priority below the deny that no outbound rule of the NSG uses, named after that priority so that
two fixes for one NSG (two VMs denied by different rules) never replace each other (to the
``AzurePlatformLKM`` service tag when the deny names that tag, with its removal as the other way:
the tag exists "to disable the defaults for licensing", service-tags-overview.md). A user route
already at a KMS address's /32 with another next hop is changed (``az network route-table route
update``), since a second route with that prefix cannot be created. The CLI syntax is that of the
Azure CLI reference (``az network route-table route create``, ``az network nat gateway
create``, ``az network vnet subnet update --nat-gateway/--route-table``, ``az network nsg rule
create``); docs/troubleshooting.md cites each page.
"""

from __future__ import annotations

import re

from shared.kms_endpoints import CloudKms
from shared.network_path import (
    NSG_DENY,
    OUTBOUND_CAUSES,
    ROUTE_CAUSES,
    Finding,
    name_of,
)

_RG = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/", re.IGNORECASE)


def fix_for(finding: Finding, kms: CloudKms) -> list[str]:
    """The commands that repair ``finding``'s resource, in the order to run them."""
    if finding.cause in ROUTE_CAUSES:
        return _routes(finding, kms)
    if finding.cause in OUTBOUND_CAUSES:
        return _nat_gateway(finding)
    if finding.cause == NSG_DENY:
        return _nsg_rule(finding, kms)
    return []


def _scope(resource_id: str) -> str:
    match = _RG.search(resource_id + "/")
    if match is None:
        return ""
    return f"--subscription {match[1]} --resource-group {match[2]}"


def _subnet_parts(subnet_id: str) -> tuple[str, str]:
    """(virtual network name, subnet name) of a subnet id."""
    parts = subnet_id.rstrip("/").split("/")
    return (parts[-3], parts[-1]) if len(parts) >= 3 else ("", name_of(subnet_id))


def _routes(finding: Finding, kms: CloudKms) -> list[str]:
    addresses = finding.addresses or kms.required
    commands: list[str] = []
    if "/providers/Microsoft.Network/routeTables/".lower() in finding.resource_id.lower():
        table_id, table = finding.resource_id, name_of(finding.resource_id)
    else:
        # No route table on the subnet (the route came over BGP): create one and attach it.
        vnet, subnet = _subnet_parts(finding.subnet_id)
        table_id, table = finding.subnet_id, f"rt-azure-kms-{subnet}"
        location = f" --location {finding.location}" if finding.location else ""
        commands.append(f"az network route-table create {_scope(table_id)} --name {table}{location}")
    existing = {address: (name, has_ip) for address, name, has_ip in finding.existing}
    for address in addresses:
        if address in existing:
            # A route already holds this /32 (with another next hop): a second route with the same
            # prefix would fail, so the route is changed. ``null`` clears the appliance's address
            # (the argument is nullable in the CLI's aaz route update).
            name, has_ip = existing[address]
            clear = " --next-hop-ip-address null" if has_ip else ""
            commands.append(
                f"az network route-table route update {_scope(table_id)} --route-table-name {table} "
                f"--name {name} --next-hop-type Internet{clear}"
            )
            continue
        commands.append(
            f"az network route-table route create {_scope(table_id)} --route-table-name {table} "
            f"--name azure-kms-{address.replace('.', '-')} --address-prefix {address}/32 "
            "--next-hop-type Internet"
        )
    if table_id == finding.subnet_id:
        vnet, subnet = _subnet_parts(finding.subnet_id)
        commands.append(
            f"az network vnet subnet update {_scope(finding.subnet_id)} --vnet-name {vnet} --name {subnet} "
            f"--route-table {table}"
        )
    return commands


def _nat_gateway(finding: Finding) -> list[str]:
    vnet, subnet = _subnet_parts(finding.subnet_id)
    scope = _scope(finding.subnet_id)
    location = f" --location {finding.location}" if finding.location else ""
    return [
        f"az network public-ip create {scope} --name pip-nat-{subnet} --sku Standard "
        f"--allocation-method Static{location}",
        f"az network nat gateway create {scope} --name nat-{subnet} "
        f"--public-ip-addresses pip-nat-{subnet}{location}",
        f"az network vnet subnet update {scope} --vnet-name {vnet} --name {subnet} "
        f"--nat-gateway nat-{subnet}",
    ]


def free_priority(deny: int, taken: tuple[int, ...]) -> int | None:
    """The highest priority number below ``deny`` (so the allow is processed first) that no outbound
    rule of the NSG uses: "You can't create two security rules with the same priority and
    direction" (network-security-groups-overview.md). None when 100 to ``deny`` − 1 are all taken."""
    used = set(taken)
    return next((p for p in range(deny - 1, 99, -1) if p not in used), None)


def _nsg_rule(finding: Finding, kms: CloudKms) -> list[str]:
    """An allow before the denying rule: of the KMS addresses, or, when the deny names the
    ``AzurePlatformLKM`` service tag, of that tag (the same addresses, kept up to date by Azure), with
    a comment line saying that removing that deny is the other fix."""
    if finding.platform_tag:
        destination = "AzurePlatformLKM"
    else:
        destination = " ".join(f"{a}/32" for a in (finding.addresses or kms.required))
    scope = _scope(finding.resource_id)
    nsg = name_of(finding.resource_id)
    priority = free_priority(finding.priority, finding.taken)
    commands = []
    if finding.platform_tag and finding.rule:
        commands.append(
            f"# rule {finding.rule} denies the AzurePlatformLKM service tag, which exists to turn off "
            f"Windows licensing; if no one needs that, remove it instead: az network nsg rule delete "
            f"{scope} --nsg-name {nsg} --name {finding.rule}"
        )
    if priority is None:
        # Nothing free can come before the denying rule: the denying rule itself must move.
        before = (
            "the denying rule has priority 100, the first there is, so no rule can come before it"
            if finding.priority <= 100
            else f"no priority from 100 to {finding.priority - 1} is free before the denying rule "
            f"(priority {finding.priority})"
        )
        commands.append(
            f"# {before}: move it to a higher number, then allow TCP {kms.port} to {destination} "
            "at a number below it"
        )
        return commands
    if priority != finding.priority - 1:
        commands.append(
            f"# priorities {priority + 1} to {finding.priority - 1} are taken: the allow goes at {priority}, "
            f"the nearest free priority before the denying rule ({finding.priority})"
        )
    commands.append(
        f"az network nsg rule create {scope} --nsg-name {nsg} "
        f"--name allow-azure-kms-{priority} --priority {priority} --direction Outbound --access Allow "
        f"--protocol Tcp --destination-address-prefixes {destination} --destination-port-ranges {kms.port}"
    )
    return commands
