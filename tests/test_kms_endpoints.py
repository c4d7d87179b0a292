"""The KMS endpoint table (shared/kms_endpoints.py) is pinned to Microsoft's own words.

tests/data/kms-endpoints.md holds verbatim excerpts of the two Microsoft Learn articles the table
cites; the table must say exactly what they say: the same names and addresses per cloud, port 1688,
every address the custom-routes article asks to route, and 23.102.135.246 retired since the
"Timeline" of March 2023 moved kms.core.windows.net to 20.118.99.224.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.clouds import CLOUDS
from shared.decide import custom_kms_host
from shared.kms_endpoints import KMS_ENDPOINTS, KMS_PORT, SOURCE_DATE, kms_of, routes_text
from shared.settings import Settings
from tests.guestfacts import detected, license_facts

EXCERPT = (Path(__file__).parent / "data" / "kms-endpoints.md").read_text(encoding="utf-8")
PLATFORMS = {"Azure Global": "AzureCloud", "Azure US Government": "AzureUSGovernment"}
PLATFORMS["Azure China 21Vianet"] = "AzureChinaCloud"
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")


def source_table() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Platform → [(host, its addresses)], read from the article's table (`<br>` pairs the columns)."""
    rows: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for line in EXCERPT.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("Platform", "------"):
            continue
        hosts = [h.strip() for h in cells[1].split("<br>")]
        groups = [tuple(_IP.findall(g)) for g in cells[2].split("<br>")]
        assert len(hosts) == len(groups), line
        rows[cells[0]] = list(zip(hosts, groups, strict=True))
    return rows


def test_the_excerpt_is_the_articles_table() -> None:
    table = source_table()
    assert set(table) == {*PLATFORMS, "Azure Germany"}
    assert "ms.date 07/17/2024" in EXCERPT and SOURCE_DATE == "2024-07-17"


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_every_cloud_has_exactly_the_names_and_addresses_the_article_gives(platform: str) -> None:
    ours = kms_of(PLATFORMS[platform])
    theirs = source_table()[platform]
    assert set(ours.hosts) == {host for host, _ in theirs}
    assert set(ours.addresses) == {ip for _, ips in theirs for ip in ips}
    assert ours.port == KMS_PORT == 1688
    # "All the three IP addresses for the Azure Global cloud and Azure China, as well as the two IP
    # addresses for Azure US Government should be added to the custom route": each one is either
    # required or (public cloud only) retired, never dropped.
    assert len(ours.addresses) == {"AzureUSGovernment": 2}.get(ours.cloud, 3)


def test_the_public_clouds_old_address_is_retired_and_kms_core_points_to_the_new_one() -> None:
    public = kms_of("AzureCloud")
    assert (
        "After March 1, 2023, all Windows VMs in Azure rely on the new KMS IP addresses `20.118.99.224` and `40.83.235.53`"
        in EXCERPT
    )
    assert (
        "The `kms.core.windows.net` domain name now points to the first of these new IP addresses (`20.118.99.224`)"
        in EXCERPT
    )
    assert public.required == ("20.118.99.224", "40.83.235.53")
    assert public.retired == ("23.102.135.246",)
    assert {e.host: e.addresses for e in public.endpoints}["kms.core.windows.net"] == ("20.118.99.224",)
    assert public.default_host == "azkms.core.windows.net"
    assert all(not kms.retired for name, kms in KMS_ENDPOINTS.items() if name != "AzureCloud")


@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_the_probe_hints_and_cloud_profiles_use_the_table(cloud: str) -> None:
    profile, kms = CLOUDS[cloud], kms_of(cloud)
    settings = Settings.from_env({"AZURE_CLOUD": cloud})
    # the guest probe's parameters: detect_command(settings.kms_host, settings.kms_port)
    assert (settings.kms_host, settings.kms_port) == (kms.default_host, kms.port)
    assert (profile.azure_kms_hosts, profile.kms_ips, profile.retired_kms_ips) == (
        kms.hosts,
        kms.required,
        kms.retired,
    )
    assert routes_text(cloud) == ", ".join(f"{ip}/32" for ip in kms.required)


def test_a_vm_set_to_the_retired_address_is_not_on_a_custom_kms() -> None:
    settings = Settings.from_env({})
    guest = detected(lic=license_facts("KMS_CLIENT", 5, "23.102.135.246:1688"))
    assert custom_kms_host(guest, settings) is None
