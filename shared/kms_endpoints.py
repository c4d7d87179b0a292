"""The Azure KMS of each cloud: host names, addresses and port, with the public source and its date.

One table, used by the guest probe's parameters (the default ``KMS_HOST``/``KMS_PORT``, through
shared/clouds.py), the operator hints (the ``/32`` routes to add) and the Azure-side path check
(shared/network_path.py: which addresses must have next hop ``Internet``).

Sources (verbatim excerpts in tests/data/kms-endpoints.md, which tests/test_kms_endpoints.py pins
this table to):

- MicrosoftDocs/SupportArticles-docs ``support/azure/virtual-machines/windows/
  custom-routes-enable-kms-activation.md`` ("Windows activation fails in forced tunneling
  scenario", ms.date 07/17/2024): the table of KMS DNS names and IP addresses per platform, and
  "All the three IP addresses for the Azure Global cloud and Azure China, as well as the two IP
  addresses for Azure US Government should be added to the custom route".
- MicrosoftDocs/SupportArticles-docs ``support/azure/virtual-machines/windows/
  windows-activation-stopped-working.md`` (ms.date 04/04/2023), "Timeline": after 1 March 2023
  every Windows VM in the public cloud relies on ``20.118.99.224`` and ``40.83.235.53``, and
  ``kms.core.windows.net`` points to ``20.118.99.224``. So ``23.102.135.246``, the address
  ``kms.core.windows.net`` had before, is retired: a route or firewall rule that names only it no
  longer reaches any KMS (still listed by the custom-routes article; routing it does no harm).

Azure Germany (``kms.core.cloudapi.de``, ``51.4.143.248`` in the same table) closed in 2021 and is
not a cloud this product supports (shared/clouds.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KMS_PORT: Final = 1688
SOURCE: Final = (
    "Microsoft Learn, 'Windows activation fails in forced tunneling scenario' "
    "(custom-routes-enable-kms-activation.md, 2024-07-17) and 'Windows Virtual Machine activation "
    "no longer works in Azure' (windows-activation-stopped-working.md, 2023-04-04)"
)
SOURCE_DATE: Final = "2024-07-17"


@dataclass(frozen=True, slots=True)
class KmsEndpoint:
    """One KMS host name and the addresses it answers on (TCP ``port``)."""

    host: str
    addresses: tuple[str, ...]
    port: int = KMS_PORT


@dataclass(frozen=True, slots=True)
class CloudKms:
    """The KMS of one cloud: its host names (the first is the default ``KMS_HOST``), the addresses a
    VM must reach on TCP 1688 (every one of them: each route or rule must cover all), and addresses
    that are retired (a route to them alone reaches no KMS)."""

    cloud: str
    endpoints: tuple[KmsEndpoint, ...]
    required: tuple[str, ...]
    retired: tuple[str, ...] = ()
    port: int = KMS_PORT

    @property
    def default_host(self) -> str:
        return self.endpoints[0].host

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(endpoint.host for endpoint in self.endpoints)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the source names for this cloud, required and retired."""
        return (*self.required, *self.retired)


KMS_ENDPOINTS: Final[dict[str, CloudKms]] = {
    "AzureCloud": CloudKms(
        cloud="AzureCloud",
        endpoints=(
            KmsEndpoint("azkms.core.windows.net", ("20.118.99.224", "40.83.235.53")),
            # Since 1 March 2023 the old name points to the first new address.
            KmsEndpoint("kms.core.windows.net", ("20.118.99.224",)),
        ),
        required=("20.118.99.224", "40.83.235.53"),
        retired=("23.102.135.246",),
    ),
    "AzureUSGovernment": CloudKms(
        cloud="AzureUSGovernment",
        endpoints=(
            KmsEndpoint("kms.core.usgovcloudapi.net", ("23.97.0.13",)),
            KmsEndpoint("azkms.core.usgovcloudapi.net", ("52.126.105.2",)),
        ),
        required=("23.97.0.13", "52.126.105.2"),
    ),
    "AzureChinaCloud": CloudKms(
        cloud="AzureChinaCloud",
        endpoints=(
            KmsEndpoint("azkms.core.chinacloudapi.cn", ("159.27.28.100", "163.228.64.161")),
            KmsEndpoint("kms.core.chinacloudapi.cn", ("42.159.7.249",)),
        ),
        required=("159.27.28.100", "163.228.64.161", "42.159.7.249"),
    ),
}


def kms_of(cloud: str) -> CloudKms:
    """The KMS table of ``cloud`` (a name of shared/clouds.py's CLOUDS)."""
    return KMS_ENDPOINTS[cloud]


def routes_text(cloud: str) -> str:
    """``a/32, b/32``: the routes to add for a cloud's KMS, as the hints say them."""
    return ", ".join(f"{address}/32" for address in kms_of(cloud).required)
