"""KMS client setup keys (GVLKs) and the strict rule that picks one for a VM.

Keys are copied from Microsoft's official table; a key is only chosen when the build, the product
type, the registry EditionID and Win32_OperatingSystem.OperatingSystemSKU all point at the same
row. Anything unknown or ambiguous gives ``None``: installing the wrong edition's key is worse than
doing nothing, and re-keying a multi-session VM cannot be undone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.guest.facts import OsFacts

SOURCE = (
    "https://learn.microsoft.com/windows-server/get-started/kms-client-activation-keys (ms.date 10/01/2024)"
)

# OperatingSystemSKU values (PRODUCT_* constants). Verified in Microsoft's Win32_OperatingSystem
# reference (MicrosoftDocs/win32 desktop-src/CIMWin32Prov/win32-operatingsystem.md): 4 Enterprise,
# 7 Standard, 8 Datacenter, 10 Enterprise Server, 12 Datacenter Server Core, 13 Standard Server
# Core, 14 Enterprise Server Core, 27 Enterprise N, 50 Windows Server Essentials, 147/148
# Datacenter/Standard (Server Core installation), 175 Enterprise for Virtual Desktops, 407
# Datacenter: Azure Edition. GetProductInfo (MicrosoftDocs/sdk-api nf-sysinfoapi-getproductinfo.md)
# adds 125/126 Enterprise LTSB/LTSC (S) and S N, and says that from Server 2012 on, Server Core
# reports the full-installation value (7/8), so both are accepted. 408 (Azure Edition core) is
# PRODUCT_DATACENTER_SERVER_CORE_AZURE_EDITION and 409 (0x199)
# PRODUCT_DATACENTER_WS_SERVER_CORE_AZURE_EDITION in the Windows SDK headers (winnt.h copies, and
# the win32metadata projections of them: 407/408/409 next to each other); 409 is what Azure Edition
# Server Core can report, as 147 is for Datacenter Server Core.
ENTERPRISE = 4
STANDARD = 7
DATACENTER = 8
ENTERPRISE_SERVER = 10
DATACENTER_CORE = 12
STANDARD_CORE = 13
ENTERPRISE_SERVER_CORE = 14
ENTERPRISE_N = 27
SERVER_ESSENTIALS = 50
ENTERPRISE_S = 125
DATACENTER_WS_CORE = 147
STANDARD_WS_CORE = 148
ENTERPRISE_FOR_VIRTUAL_DESKTOPS = 175
DATACENTER_AZURE_EDITION = 407
DATACENTER_AZURE_EDITION_CORE = 408
DATACENTER_WS_AZURE_EDITION_CORE = 409

# Registry EditionID values. The edition-name table that pairs each EditionID with its PRODUCT_*
# value (public copies of the Windows SKU list, e.g. "serverturbine,PRODUCT_DATACENTER_SERVER_
# AZURE_EDITION,0x197", "serversolution,PRODUCT_SB_SOLUTION_SERVER,0x32", "serverrdsh,
# PRODUCT_SERVERRDSH,0xAF", "serverdatacentercor,PRODUCT_DATACENTER_WS_SERVER_CORE,0x93") gives
# ServerTurbine/ServerTurbineCor for Azure Edition, ServerSolution for Essentials (SKU 50, not 52:
# 52 is ServerSolutionsPremium), ServerRdsh for multi-session, *Core for 2008 R2 Server Core and
# *Cor for 2016+ Server Core. Multi-session: the Azure 0xC004F074 article shows
# "Name: Windows(R), ServerRdsh edition" on multi-session VMs and says a re-key cannot be undone.
MULTI_SESSION_EDITION_IDS = frozenset({"serverrdsh"})
MULTI_SESSION_SKUS = frozenset({ENTERPRISE_FOR_VIRTUAL_DESKTOPS})

# Exact server builds: 2008 R2 SP1, 2012, 2012 R2, 2016, 2019, 2022, 2025.
WS2008R2, WS2012, WS2012R2, WS2016, WS2019, WS2022, WS2025 = 7601, 9200, 9600, 14393, 17763, 20348, 26100
# AVMA guests are Windows Server 2012 R2 and later (Microsoft's "Automatic Virtual Machine Activation
# in Windows Server", MicrosoftDocs/windowsserverdocs WindowsServerDocs/get-started/
# automatic-vm-activation.md: the guest columns stop at 2012 R2, and there are no AVMA keys for
# older versions). An AVMA channel reported on an older build contradicts itself and is never
# re-keyed (shared.decide checks the build before it asks for a key). The 2008 R2 and 2012 rows
# below stay for the repair path only: those versions are KMS clients there, and a repair sets the
# Azure KMS without installing a key; select_key still returns them so that the table stays whole.
AVMA_MIN_BUILD = WS2012R2
# Released Windows 10 (1507 .. 22H2) and Windows 11 (21H2 .. 25H2) builds; an Insider or unknown
# build gives None.
WINDOWS10_BUILDS = (
    10240,
    10586,
    14393,
    15063,
    16299,
    17134,
    17763,
    18362,
    18363,
    19041,
    19042,
    19043,
    19044,
    19045,
)
WINDOWS11_BUILDS = (22000, 22621, 22631, 26100, 26200)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One row of the official table, with the facts a VM must show for it to apply."""

    edition: str  # exactly as in the official table, e.g. "Windows Server 2022 Datacenter: Azure Edition"
    product_key: str
    source: str  # URL + ms.date of the official table
    edition_ids: tuple[str, ...]  # registry EditionID values it applies to
    skus: tuple[int, ...]  # OperatingSystemSKU values (incl. Server Core variants)
    builds: tuple[int, ...] | range  # exact build numbers / ranges
    product_type: str  # "server" | "workstation"


def _server(
    edition: str, key: str, build: int, edition_ids: tuple[str, ...], skus: tuple[int, ...]
) -> CatalogEntry:
    return CatalogEntry(edition, key, SOURCE, edition_ids, skus, (build,), "server")


def _standard(version: str, key: str, build: int) -> CatalogEntry:
    if build in (WS2008R2, WS2012, WS2012R2):
        return _server(
            f"Windows Server {version} Standard",
            key,
            build,
            ("ServerStandard", "ServerStandardCore"),
            (STANDARD, STANDARD_CORE),
        )
    return _server(
        f"Windows Server {version} Standard",
        key,
        build,
        ("ServerStandard", "ServerStandardCor"),
        (STANDARD, STANDARD_CORE, STANDARD_WS_CORE),
    )


def _datacenter(version: str, key: str, build: int) -> CatalogEntry:
    if build in (WS2008R2, WS2012, WS2012R2):
        return _server(
            f"Windows Server {version} Datacenter",
            key,
            build,
            ("ServerDatacenter", "ServerDatacenterCore"),
            (DATACENTER, DATACENTER_CORE),
        )
    return _server(
        f"Windows Server {version} Datacenter",
        key,
        build,
        ("ServerDatacenter", "ServerDatacenterCor"),
        (DATACENTER, DATACENTER_CORE, DATACENTER_WS_CORE),
    )


def _essentials(version: str, key: str, build: int) -> CatalogEntry:
    return _server(
        f"Windows Server {version} Essentials", key, build, ("ServerSolution",), (SERVER_ESSENTIALS,)
    )


def _azure_edition(version: str, key: str, build: int) -> CatalogEntry:
    return _server(
        f"Windows Server {version} Datacenter: Azure Edition",
        key,
        build,
        ("ServerTurbine", "ServerTurbineCor"),
        (DATACENTER_AZURE_EDITION, DATACENTER_AZURE_EDITION_CORE, DATACENTER_WS_AZURE_EDITION_CORE),
    )


def _client(edition: str, key: str, builds: tuple[int, ...], edition_id: str, sku: int) -> CatalogEntry:
    return CatalogEntry(edition, key, SOURCE, (edition_id,), (sku,), builds, "workstation")


# Keys from the official table (copied in tests/data/kms-client-setup-keys.md; the tests hold
# every entry to it).
CATALOG: tuple[CatalogEntry, ...] = (
    _standard("2025", "TVRH6-WHNXV-R9WG3-9XRFY-MY832", WS2025),
    _datacenter("2025", "D764K-2NDRG-47T6Q-P8T8W-YP6DF", WS2025),
    _azure_edition("2025", "XGN3F-F394H-FD2MY-PP6FD-8MCRC", WS2025),
    _standard("2022", "VDYBN-27WPP-V4HQT-9VMD4-VMK7H", WS2022),
    _datacenter("2022", "WX4NM-KYWYW-QJJR4-XV3QB-6VM33", WS2022),
    _azure_edition("2022", "NTBV8-9K7Q8-V27C6-M2BTV-KHMXV", WS2022),
    _standard("2019", "N69G4-B89J2-4G8F4-WWYCC-J464C", WS2019),
    _datacenter("2019", "WMDGN-G9PQG-XVVXX-R3X43-63DFG", WS2019),
    _essentials("2019", "WVDHN-86M7X-466P6-VHXV7-YY726", WS2019),
    _standard("2016", "WC2BQ-8NRM3-FDDYY-2BFGV-KHKQY", WS2016),
    _datacenter("2016", "CB7KF-BWN84-R7R2Y-793K2-8XDDG", WS2016),
    _essentials("2016", "JCKRF-N37P4-C2D82-9YXRT-4M63B", WS2016),
    _standard("2012 R2", "D2N9P-3P6X9-2R39C-7RTCD-MDVJX", WS2012R2),
    _datacenter("2012 R2", "W3GGN-FT8W3-Y4M27-J84CP-Q3VJ9", WS2012R2),
    _essentials("2012 R2", "KNC87-3J2TX-XB4WP-VCPJV-M4FWM", WS2012R2),
    _standard("2012", "XC9B7-NBPP2-83J2H-RHMBY-92BT4", WS2012),
    _datacenter("2012", "48HP8-DN98B-MYWDG-T2DCC-8W83P", WS2012),
    _essentials("2012", "HTDQM-NBMMG-KGYDT-2DTKT-J2MPV", WS2012),
    _standard("2008 R2", "YC6KT-GKW9T-YTKYR-T4X34-R7VHC", WS2008R2),
    _server(
        "Windows Server 2008 R2 Enterprise",
        "489J6-VHDMP-X63PK-3K798-CPX3Y",
        WS2008R2,
        ("ServerEnterprise", "ServerEnterpriseCore"),
        (ENTERPRISE_SERVER, ENTERPRISE_SERVER_CORE),
    ),
    _datacenter("2008 R2", "74YFP-3QFB3-KQT8W-PMXWJ-7M648", WS2008R2),
    _client(
        "Windows 11 / Windows 10 Enterprise",
        "NPPR9-FWDCX-D2C8J-H872K-2YT43",
        WINDOWS10_BUILDS + WINDOWS11_BUILDS,
        "Enterprise",
        ENTERPRISE,
    ),
    _client(
        "Windows 11 / Windows 10 Enterprise N",
        "DPH2V-TTNVB-4X9Q3-TJR4H-KHJW4",
        WINDOWS10_BUILDS + WINDOWS11_BUILDS,
        "EnterpriseN",
        ENTERPRISE_N,
    ),
    # LTSC 2019 = 1809 (17763), LTSC 2021 = 21H2 (19044), Windows 11 LTSC 2024 = 24H2 (26100).
    _client(
        "Windows 11 Enterprise LTSC 2024 / Windows 10 Enterprise LTSC 2021, 2019",
        "M7XTQ-FN8P6-TTKYV-9D4CC-J462D",
        (17763, 19044, 26100),
        "EnterpriseS",
        ENTERPRISE_S,
    ),
    # LTSB 2016 = 1607 (14393).
    _client(
        "Windows 10 Enterprise LTSB 2016",
        "DCPHK-NFMTC-H88MJ-PFHPY-QJ4BJ",
        (14393,),
        "EnterpriseS",
        ENTERPRISE_S,
    ),
)

_PRODUCT_TYPES = {1: "workstation", 2: "server", 3: "server"}  # 2 is a domain controller


def select_key(os: OsFacts) -> CatalogEntry | None:
    """Return the one catalog entry that every fact of ``os`` agrees with, or ``None``."""
    edition_id = os.edition_id.casefold()
    if edition_id in MULTI_SESSION_EDITION_IDS or os.sku in MULTI_SESSION_SKUS:
        return None
    kind = _PRODUCT_TYPES.get(os.product_type)
    if kind is None:
        return None
    matches = [
        entry
        for entry in CATALOG
        if entry.product_type == kind
        and os.build in entry.builds
        and os.sku in entry.skus
        and edition_id in (known.casefold() for known in entry.edition_ids)
    ]
    return matches[0] if len(matches) == 1 else None


# ARM's instance view of a running VM names the guest's OS as its VM agent reports it: ``osName``
# "Windows Server 2016 Datacenter", ``osVersion`` "Microsoft Windows NT 10.0.14393.0" (Azure/
# azure-rest-api-specs, specification/compute/resource-manager/Microsoft.Compute/ComputeRP/stable/
# 2024-07-01/examples/virtualMachineExamples/VirtualMachine_Get_InstanceView.json). Azure Edition is
# matched written either way ("Datacenter: Azure Edition", as the caption reads, or without the
# colon); anything else (Evaluation, Core wording, a client) names no row.
_ARM_OS_VERSION = re.compile(
    r"(?:Microsoft Windows NT )?[0-9]{1,2}\.[0-9]{1,2}\.([0-9]{4,6})(?:\.[0-9]{1,6})?"
)
_ARM_AZURE_EDITION = " Azure Edition"


def entry_for_arm_os(os_name: str, os_version: str) -> CatalogEntry | None:
    """The one server row whose edition name and build ARM's ``osName``/``osVersion`` give, or None.

    Only a guess of what the guest will report: it decides nothing. The first Run Command may carry
    this row's key only with the exact facts the guest must show (``shared.guessed_rekey``).
    """
    if not isinstance(os_name, str) or not isinstance(os_version, str):
        return None
    version = _ARM_OS_VERSION.fullmatch(os_version.strip())
    if version is None:
        return None
    build = int(version.group(1))
    name = os_name.strip().removeprefix("Microsoft ")
    if name.endswith(_ARM_AZURE_EDITION) and not name.endswith(":" + _ARM_AZURE_EDITION):
        name = name[: -len(_ARM_AZURE_EDITION)] + ":" + _ARM_AZURE_EDITION
    matches = [
        entry
        for entry in CATALOG
        if entry.product_type == "server" and entry.edition == name and build in entry.builds
    ]
    return matches[0] if len(matches) == 1 else None
