"""A Windows guest's software-licensing state, answering the two guest scripts as Windows would.

This is the independent oracle of the end-to-end tests: it keeps its own table of which product key
fits which edition (from Microsoft's published KMS client setup keys and AVMA keys), so a wrong entry
in the engine's catalog shows up as Windows would show it, with ``install-key`` failing
``0xC004F069``, instead of being agreed with. Nothing here imports the engine.

Contract: docs/guest-contract.md. HRESULTs (slerror.h): 0xC004F050 SL_E_INVALID_PRODUCT_KEY,
0xC004F069 SL_E_MISMATCHED_PRODUCT_SKU ("the product SKU is not found"), 0xC004F074 no KMS could be
contacted, 0xC004FD02 AVMA parent partition not activated (every Azure host), 0x8007232B DNS name
does not exist (no KMS host set and none discovered), 0xC004C003 online activation refused,
0x80070032 HRESULT_FROM_WIN32(ERROR_NOT_SUPPORTED) (the scripts' version guard).

Which states Windows can be in (AVMA only on Server 2012 R2 and later editions that have an AVMA
key, the Windows PowerShell versions each Windows can run) is checked here too, by
:func:`spec_problem`, so that an estate cannot describe a VM Windows could not be. Sources:
docs/simulator.md, "The Windows guest model".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from simulator.estate import GuestSpec

DETECT_FIRST_LINE: Final = "# avma-remediator guest script: detect v2"
REMEDIATE_FIRST_LINE: Final = "# avma-remediator guest script: remediate v2"
RESULT_MARKER: Final = "AVMA-REMEDIATOR-RESULT "

S_OK: Final = 0x00000000
E_INVALIDARG: Final = 0x80070057
SL_E_INVALID_PRODUCT_KEY: Final = 0xC004F050
SL_E_MISMATCHED_PRODUCT_SKU: Final = 0xC004F069
SL_E_KMS_UNREACHABLE: Final = 0xC004F074
SL_E_IA_PARENT_PARTITION_NOT_ACTIVATED: Final = 0xC004FD02
DNS_ERROR_RCODE_NAME_ERROR: Final = 0x8007232B
SL_E_ONLINE_ACTIVATION_REFUSED: Final = 0xC004C003
HRESULT_NOT_SUPPORTED: Final = 0x80070032  # HRESULT_FROM_WIN32(ERROR_NOT_SUPPORTED)
POWERSHELL_VERSION_STEP: Final = "powershell-version"
PRODUCT_UNLICENSED: Final = 0xABCDABCD  # OperatingSystemSKU of an invalid or expired license
UINT32_MAX: Final = 0xFFFF_FFFF

# Windows PowerShell versions there are (powershell.exe; PowerShell 6+ is another program that Run
# Command does not use). "1.0" is what the guard reports when $PSVersionTable does not exist.
PS_VERSIONS: Final = ("1.0", "2.0", "3.0", "4.0", "5.0", "5.1")

# KMS hosts that answer in each cloud (troubleshoot-activation-problems.md, custom-routes article).
KMS_HOSTS: Final[Mapping[str, frozenset[str]]] = {
    "AzureCloud": frozenset({"azkms.core.windows.net", "kms.core.windows.net"}),
    "AzureUSGovernment": frozenset({"kms.core.usgovcloudapi.net", "azkms.core.usgovcloudapi.net"}),
    "AzureChinaCloud": frozenset({"azkms.core.chinacloudapi.cn", "kms.core.chinacloudapi.cn"}),
}
KMS_PORT: Final = 1688

DESCRIPTIONS: Final[Mapping[str, str]] = {
    "AVMA": "Windows(R) Operating System, VIRTUAL_MACHINE_ACTIVATION channel",
    "KMS_CLIENT": "Windows(R) Operating System, VOLUME_KMSCLIENT channel",
    "MAK": "Windows(R) Operating System, VOLUME_MAK channel",
    "RETAIL": "Windows(R) Operating System, RETAIL channel",
    "OEM": "Windows(R) Operating System, OEM_DM channel",
}
# ProductKeyChannel (Windows 8 / Server 2012 and later). "Volume:AVMA" is an assumption: no public
# capture of an AVMA product's ProductKeyChannel was found (docs/simulator.md, deviations).
PRODUCT_KEY_CHANNELS: Final[Mapping[str, str]] = {
    "AVMA": "Volume:AVMA",
    "KMS_CLIENT": "Volume:GVLK",
    "MAK": "Volume:MAK",
    "RETAIL": "Retail",
    "OEM": "OEM:DM",
}

_KEY_FORMAT = re.compile(r"\A[A-Z0-9]{5}(?:-[A-Z0-9]{5}){4}\Z")
_PORT_FORMAT = re.compile(r"\A[0-9]{1,5}\Z")
_HOSTNAME = re.compile(
    r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_KEY_ALPHABET = "BCDFGHJKMPQRTVWXY2346789"
_KMS_GRACE_MINUTES = 259_200  # a KMS activation lasts 180 days
_AVMA_GRACE_MINUTES = 10_080  # an AVMA activation lasts 7 days
_OTHER_GRACE_MINUTES = 43_200


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What Windows knows about a product key: the channel it installs and the edition/builds it fits."""

    channel: str
    edition: str
    builds: frozenset[int]


_SERVER = {
    "2008R2": frozenset({7600, 7601}),
    "2012": frozenset({9200}),
    "2012R2": frozenset({9600}),
    "2016": frozenset({14393}),
    "2019": frozenset({17763}),
    "2022": frozenset({20348}),
    "2025": frozenset({26100}),
}
_CLIENT_10_11 = frozenset(range(10240, 100_000))
# Windows Server semi-annual channel builds the AVMA page lists: 1709, 1803 (the 2016 keys) and
# 1903, 1909 (the 2019 keys; 1809 is 17763, Server 2019's own build).
_SAC_1709_1803 = frozenset({16299, 17134})
_SAC_1903_1909 = frozenset({18362, 18363})

# MicrosoftDocs/windowsserverdocs kms-client-activation-keys.md (ms.date 10/01/2024) and
# automatic-vm-activation.md (ms.date 09/19/2023).
KEYS: Final[Mapping[str, KeyInfo]] = {
    # KMS client setup keys (GVLK)
    "TVRH6-WHNXV-R9WG3-9XRFY-MY832": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2025"]),
    "D764K-2NDRG-47T6Q-P8T8W-YP6DF": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2025"]),
    "XGN3F-F394H-FD2MY-PP6FD-8MCRC": KeyInfo("KMS_CLIENT", "ServerTurbine", _SERVER["2025"]),
    "VDYBN-27WPP-V4HQT-9VMD4-VMK7H": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2022"]),
    "WX4NM-KYWYW-QJJR4-XV3QB-6VM33": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2022"]),
    "NTBV8-9K7Q8-V27C6-M2BTV-KHMXV": KeyInfo("KMS_CLIENT", "ServerTurbine", _SERVER["2022"]),
    "N69G4-B89J2-4G8F4-WWYCC-J464C": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2019"]),
    "WMDGN-G9PQG-XVVXX-R3X43-63DFG": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2019"]),
    "WVDHN-86M7X-466P6-VHXV7-YY726": KeyInfo("KMS_CLIENT", "ServerSolution", _SERVER["2019"]),
    "WC2BQ-8NRM3-FDDYY-2BFGV-KHKQY": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2016"]),
    "CB7KF-BWN84-R7R2Y-793K2-8XDDG": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2016"]),
    "JCKRF-N37P4-C2D82-9YXRT-4M63B": KeyInfo("KMS_CLIENT", "ServerSolution", _SERVER["2016"]),
    "D2N9P-3P6X9-2R39C-7RTCD-MDVJX": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2012R2"]),
    "W3GGN-FT8W3-Y4M27-J84CP-Q3VJ9": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2012R2"]),
    "KNC87-3J2TX-XB4WP-VCPJV-M4FWM": KeyInfo("KMS_CLIENT", "ServerSolution", _SERVER["2012R2"]),
    "XC9B7-NBPP2-83J2H-RHMBY-92BT4": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2012"]),
    "48HP8-DN98B-MYWDG-T2DCC-8W83P": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2012"]),
    "HTDQM-NBMMG-KGYDT-2DTKT-J2MPV": KeyInfo("KMS_CLIENT", "ServerSolution", _SERVER["2012"]),
    "YC6KT-GKW9T-YTKYR-T4X34-R7VHC": KeyInfo("KMS_CLIENT", "ServerStandard", _SERVER["2008R2"]),
    "489J6-VHDMP-X63PK-3K798-CPX3Y": KeyInfo("KMS_CLIENT", "ServerEnterprise", _SERVER["2008R2"]),
    "74YFP-3QFB3-KQT8W-PMXWJ-7M648": KeyInfo("KMS_CLIENT", "ServerDatacenter", _SERVER["2008R2"]),
    "NPPR9-FWDCX-D2C8J-H872K-2YT43": KeyInfo("KMS_CLIENT", "Enterprise", _CLIENT_10_11),
    "DPH2V-TTNVB-4X9Q3-TJR4H-KHJW4": KeyInfo("KMS_CLIENT", "EnterpriseN", _CLIENT_10_11),
    "YYVX9-NTFWV-6MDM3-9PT4T-4M68B": KeyInfo("KMS_CLIENT", "EnterpriseG", _CLIENT_10_11),
    "W269N-WFGWX-YVC9B-4J6C9-T83GX": KeyInfo("KMS_CLIENT", "Professional", _CLIENT_10_11),
    "M7XTQ-FN8P6-TTKYV-9D4CC-J462D": KeyInfo("KMS_CLIENT", "EnterpriseS", frozenset({17763, 19044, 26100})),
    "DCPHK-NFMTC-H88MJ-PFHPY-QJ4BJ": KeyInfo("KMS_CLIENT", "EnterpriseS", frozenset({14393})),
    # Multi-session: not on Microsoft's page; Windows still accepts this widely published key.
    "CPWHC-NT2C7-VYW78-DHDB2-PG3GK": KeyInfo("KMS_CLIENT", "ServerRdsh", frozenset(range(17763, 100_000))),
    # AVMA keys. 2025: the page's current "Windows Server 2025" tab (learn.microsoft.com
    # automatic-vm-activation?tabs=server2025), known here from public copies of it; the stored
    # page (ms.date 09/19/2023) stops at 2022.
    "YQB4H-NKHHJ-Q6K4R-4VMY6-VCH67": KeyInfo("AVMA", "ServerDatacenter", _SERVER["2025"]),
    "6NMQ9-T38WF-6MFGM-QYGYM-88J4F": KeyInfo("AVMA", "ServerTurbine", _SERVER["2025"]),
    "WWVGQ-PNHV9-B89P4-8GGM9-9HPQ4": KeyInfo("AVMA", "ServerStandard", _SERVER["2025"]),
    "W3GNR-8DDXR-2TFRP-H8P33-DV9BG": KeyInfo("AVMA", "ServerDatacenter", _SERVER["2022"]),
    "F7TB6-YKN8Y-FCC6R-KQ484-VMK3J": KeyInfo("AVMA", "ServerTurbine", _SERVER["2022"]),
    "YDFWN-MJ9JR-3DYRK-FXXRW-78VHK": KeyInfo("AVMA", "ServerStandard", _SERVER["2022"]),
    "H3RNG-8C32Q-Q8FRX-6TDXV-WMBMW": KeyInfo("AVMA", "ServerDatacenter", _SERVER["2019"] | _SAC_1903_1909),
    "TNK62-RXVTB-4P47B-2D623-4GF74": KeyInfo("AVMA", "ServerStandard", _SERVER["2019"] | _SAC_1903_1909),
    "2CTP7-NHT64-BP62M-FV6GG-HFV28": KeyInfo("AVMA", "ServerSolution", _SERVER["2019"]),
    "TMJ3Y-NTRTM-FJYXT-T22BY-CWG3J": KeyInfo("AVMA", "ServerDatacenter", _SERVER["2016"] | _SAC_1709_1803),
    "C3RCX-M6NRP-6CXC9-TW2F2-4RHYD": KeyInfo("AVMA", "ServerStandard", _SERVER["2016"] | _SAC_1709_1803),
    "B4YNW-62DX9-W8V6M-82649-MHBKQ": KeyInfo("AVMA", "ServerSolution", _SERVER["2016"]),
    "Y4TGP-NPTV9-HTC2H-7MGQ3-DV4TW": KeyInfo("AVMA", "ServerDatacenter", _SERVER["2012R2"]),
    "DBGBW-NPF86-BJVTX-K3WKJ-MTB6V": KeyInfo("AVMA", "ServerStandard", _SERVER["2012R2"]),
    "K2XGM-NMBT3-2R6Q8-WF2FK-P36R2": KeyInfo("AVMA", "ServerSolution", _SERVER["2012R2"]),
}


def base_edition(edition_id: str) -> str:
    """Server Core installs report a ``…Core``/``…Cor`` edition; the same keys fit them."""
    if edition_id.startswith("Server"):
        for suffix in ("Core", "Cor"):
            if edition_id.endswith(suffix) and len(edition_id) > len(suffix) + 6:
                return edition_id[: -len(suffix)]
    return edition_id


# EditionIDs Windows has, besides those in KEYS, that no AVMA key fits: Storage Server (OEM only)
# and the evaluation editions (TIMEBASED_EVAL channel; they take a key only through DISM
# /Set-Edition). An EditionID in neither list is one the tables do not know (it stands for an
# edition newer than Microsoft's pages) and is not judged.
_NO_AVMA_EDITIONS: Final = frozenset(
    {"ServerStorageStandard", "ServerStorageWorkgroup", "ServerWeb", "ServerHyper", "ServerSolutionsPremium"}
)
_KNOWN_EDITIONS: Final = frozenset(info.edition for info in KEYS.values()) | _NO_AVMA_EDITIONS
AVMA_SOURCE: Final = "Microsoft's AVMA page, automatic-vm-activation.md"


def known_edition(edition_id: str) -> bool:
    """Whether Microsoft's key tables (or the list of editions without keys) know this EditionID."""
    edition = base_edition(edition_id)
    return edition in _KNOWN_EDITIONS or edition.endswith("Eval")


def ps_versions(build: int, product_type: int) -> tuple[str, ...]:
    """The Windows PowerShell versions this Windows can have (the WMF availability table).

    wmf-overview.md: 2008 SP2 takes WMF 2.0 and 3.0 (1.0 was an optional feature of Server 2008);
    2008 R2 / 7 ship 2.0 and take 3.0-5.1 only with SP1 (build 7601); 2012 ships 3.0 and takes
    4.0-5.1 (Windows 8, the client, takes none); 2012 R2 / 8.1 ship 4.0 and take 5.0, 5.1;
    Windows 10 ships 5.0 before 1607 and 5.1 from 1607 (build 14393) on, as do Server 2016 and later.
    """
    server = product_type != 1
    if build < 7600:
        return ("1.0", "2.0", "3.0") if server and build >= 6002 else ("1.0", "2.0")
    if build < 7601:
        return ("2.0",)
    if build < 9200:
        return ("2.0", "3.0", "4.0", "5.0", "5.1")
    if build < 9600:
        return ("3.0", "4.0", "5.0", "5.1") if server else ("3.0",)
    if build < 10240:
        return ("4.0", "5.0", "5.1")
    if build < 14393:
        return ("5.0",)
    return ("5.1",)


def default_ps_version(build: int, product_type: int) -> str:
    """What the OS ships with: 2008 R2 2.0, 2012 3.0, 2012 R2 4.0, Windows 10 before 1607 5.0, 2016+ 5.1."""
    return ps_versions(build, product_type)[0]


def avma_problem(edition_id: str, build: int, product_type: int) -> str | None:
    """Why Windows cannot be on the AVMA channel in this state, or None if it can."""
    if build < 9600:
        return (
            f"AVMA exists only on Windows Server 2012 R2 (build 9600) and later; build {build} cannot "
            f"have an AVMA key ({AVMA_SOURCE}: the guest VM versions a host activates)"
        )
    if product_type == 1:
        return f"AVMA activates only Windows Server guests; productType 1 is a workstation ({AVMA_SOURCE})"
    if known_edition(edition_id) and key_for("AVMA", edition_id, build) is None:
        return (
            f"no AVMA key fits EditionID {edition_id} on build {build}: AVMA keys exist for Datacenter "
            f"and Standard (2012 R2 and later), Essentials (2012 R2-2019) and Datacenter: Azure Edition "
            f"(2022, 2025) only ({AVMA_SOURCE}, AVMA keys)"
        )
    return None


def is_azure_edition(edition_id: str) -> bool:
    """Windows Server Datacenter: Azure Edition (EditionID ServerTurbine, ServerTurbineCor)."""
    return edition_id.startswith("ServerTurbine")


def spec_problem(spec: GuestSpec, *, present: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """The first estate key (and why) that describes a state Windows cannot be in, or None.

    ``present`` is the set of keys the estate file gave (a default is never the culprit).
    """
    if spec.channel == "AVMA":
        problem = avma_problem(spec.edition_id, spec.build, spec.product_type)
        if problem is not None:
            return "channel", problem
    if spec.ps_version is not None:
        allowed = ps_versions(spec.build, spec.product_type)
        if spec.ps_version not in allowed:
            return "psVersion", (
                f"Windows PowerShell {spec.ps_version} cannot run on build {spec.build} "
                f"(productType {spec.product_type}); it can have {', '.join(allowed)} "
                "(wmf-overview.md, WMF availability across Windows operating systems)"
            )
    for key in ("imdsReachable", "imdsChainValid"):
        if key in present and not is_azure_edition(spec.edition_id):
            return key, "only Azure Edition (EditionID ServerTurbine*) reports attestation"
    return None


def key_for(channel: str, edition_id: str, build: int) -> str | None:
    """The published key of ``channel`` that fits this edition and build, if Windows has one."""
    edition = base_edition(edition_id)
    for key, info in KEYS.items():
        if info.channel == channel and info.edition == edition and build in info.builds:
            return key
    return None


def hresult(value: int) -> str:
    return f"0x{value & 0xFFFFFFFF:08X}"


@dataclass(slots=True)
class WindowsGuest:
    """Mutable licensing state of one Windows VM, changed only by the remediation script."""

    caption: str
    build: int
    product_type: int
    edition_id: str
    sku: int
    channel: str
    license_status: int
    partial_product_key: str
    grace_minutes: int
    kms_machine: str | None
    kms_port: int
    discovered_machine: str | None
    discovered_port: int
    kms_reachable: bool
    cloud: str = "AzureCloud"
    ps_version: str = "5.1"
    imds_reachable: bool = True
    imds_chain_valid: bool = True
    null_name: bool = False
    null_description: bool = False

    @classmethod
    def from_spec(cls, spec: GuestSpec, *, cloud: str, seed: str) -> WindowsGuest:
        """Initial state from the estate; ``seed`` (the VM id) makes any invented partial key stable."""
        partial = spec.partial_product_key
        if partial is None:
            published = None
            if spec.channel in ("AVMA", "KMS_CLIENT"):
                published = key_for(spec.channel, spec.edition_id, spec.build)
            partial = published[-5:] if published else _pseudo_partial_key(seed)
        grace = spec.grace_minutes
        if grace is None:
            grace = _default_grace(spec.channel, spec.license_status)
        licensed_kms = spec.license_status == 1 and spec.channel == "KMS_CLIENT" and spec.kms_host is not None
        return cls(
            caption=spec.caption,
            build=spec.build,
            product_type=spec.product_type,
            edition_id=spec.edition_id,
            sku=spec.sku,
            channel=spec.channel,
            license_status=spec.license_status,
            partial_product_key=partial,
            grace_minutes=grace,
            kms_machine=spec.kms_host,
            kms_port=spec.kms_port,
            discovered_machine=spec.kms_host if licensed_kms else None,
            discovered_port=spec.kms_port if licensed_kms else 0,
            kms_reachable=spec.kms_reachable and spec.network_reachable,
            cloud=cloud,
            ps_version=spec.ps_version or default_ps_version(spec.build, spec.product_type),
            imds_reachable=spec.imds_reachable,
            imds_chain_valid=spec.imds_chain_valid,
            null_name=spec.null_name,
            null_description=spec.null_description,
        )

    # ------------------------------------------------------------------ what state_dump shows

    @property
    def kms_target(self) -> str | None:
        """The configured KMS as ``host:port`` (port 1688 when only the host was set)."""
        return f"{self.kms_machine}:{self.kms_port or KMS_PORT}" if self.kms_machine else None

    def licensing(self) -> tuple[object, ...]:
        """Everything remediation can change; compared with the initial state for ``changed``."""
        return (
            self.edition_id,
            self.sku,
            self.channel,
            self.license_status,
            self.partial_product_key,
            self.kms_machine,
            self.kms_port,
        )

    # ------------------------------------------------------------------ running a script

    def run_script(self, script: Sequence[str], parameters: Sequence[Mapping[str, str]]) -> str:
        """Run a Run Command script as Windows would; give its stdout and apply its effects."""
        first = _first_line(script)
        params = {str(p.get("name", "")).lower(): str(p.get("value", "")) for p in parameters}
        if first in (DETECT_FIRST_LINE, REMEDIATE_FIRST_LINE) and self.ps_version in ("1.0", "2.0"):
            # The version guard, the scripts' first statement: one line, nothing changed.
            return self._version_guard("detect" if first == DETECT_FIRST_LINE else "remediate")
        if first == DETECT_FIRST_LINE:
            return self._detect(params)
        if first == REMEDIATE_FIRST_LINE:
            return self._remediate(params)
        return ""  # a script that is not ours: it ran and printed nothing we model

    def _version_guard(self, script: str) -> str:
        """Exactly the line of guest contract v2: built by concatenation, as PowerShell 2.0 has no JSON."""
        return (
            f'{RESULT_MARKER}{{"schema":2,"script":"{script}","os":null,"license":null,"kmsProbe":null,'
            f'"attestation":null,"steps":[],"error":{{"step":"{POWERSHELL_VERSION_STEP}",'
            f'"hresult":"{hresult(HRESULT_NOT_SUPPORTED)}",'
            f'"message":"Windows PowerShell {self.ps_version} is older than 3.0"}}}}'
        )

    def _detect(self, params: Mapping[str, str]) -> str:
        problems = _kms_param_problems(params)
        if problems:
            return _emit([f"Invalid parameters: {'; '.join(problems)}"], _error_result("detect", problems))
        host, port = params["kmshost"], int(params["kmsport"])
        return _emit([], self._facts("detect", host, port))

    def _remediate(self, params: Mapping[str, str]) -> str:
        # The same checks, in the same order and words, as remediate.ps1.
        install = params.get("installkey", "")
        key = params.get("productkey", "")
        problems: list[str] = []
        if install not in ("0", "1"):
            problems.append("InstallKey is neither 0 nor 1")
        if install == "1" and not _KEY_FORMAT.match(key):
            problems.append("ProductKey is not a product key")
        if install == "0" and key:
            problems.append("ProductKey given but InstallKey is 0")
        problems += _kms_param_problems(params)
        conditional = any(params.get(name, "") for name in _EXPECT_PARAMETERS)
        if conditional:
            problems += _conditional_param_problems(params)
        if problems:
            line = f"Invalid parameters, nothing changed: {'; '.join(problems)}"
            return _emit([line], _error_result("remediate", problems))
        host, port = params["kmshost"], int(params["kmsport"])
        printed: list[str] = []
        steps: list[dict[str, str]] = []
        preconditions: dict[str, Any] | None = None
        if conditional:
            # A conditional re-key reads the facts first and acts only if every one is as given.
            check = self._facts("remediate", host, port)
            failed = unmet_preconditions(check, params)
            preconditions = {"met": not failed, "failed": failed, "before": _before_facts(check)}
            if failed:
                check["preconditions"] = preconditions
                return _emit([f"Preconditions not met, nothing changed: {', '.join(failed)}"], check)

        def step(name: str, action: Callable[[], int]) -> None:
            if steps and steps[-1]["hresult"] != hresult(S_OK):
                return  # steps stop at the first failure
            code = action()
            steps.append({"name": name, "hresult": hresult(code)})
            if code == S_OK:
                printed.append(f"Step {name}: done")
            else:
                printed.append(f"Step {name}: {hresult(code)}; later steps skipped")

        if install == "1":
            step("install-key", lambda: self._install_key(key))
        step("clear-kms-cache", self._clear_kms)
        step("set-kms-host", lambda: self._set_kms_host(host))
        step("set-kms-port", lambda: self._set_kms_port(port))
        step("refresh", lambda: S_OK)
        step("activate", self._activate)
        result = self._facts("remediate", host, port)
        result["steps"] = steps
        if preconditions is not None:
            result["preconditions"] = preconditions
        return _emit(printed, result)

    def _clear_kms(self) -> int:
        self.kms_machine, self.kms_port = None, 0
        return S_OK

    def _set_kms_host(self, host: str) -> int:
        self.kms_machine = host
        return S_OK

    def _set_kms_port(self, port: int) -> int:
        self.kms_port = port
        return S_OK

    def _install_key(self, key: str) -> int:
        info = KEYS.get(key)
        if info is None:
            return SL_E_INVALID_PRODUCT_KEY
        if self.build not in info.builds:
            return SL_E_MISMATCHED_PRODUCT_SKU
        if info.edition == "Enterprise" and self.edition_id == "ServerRdsh":
            # What Microsoft warns about: the multi-session VM becomes plain Enterprise, for good.
            self.edition_id, self.sku, self.product_type = "Enterprise", 4, 1
            self.caption = self.caption.replace(" multi-session", "")
        elif info.edition != base_edition(self.edition_id):
            return SL_E_MISMATCHED_PRODUCT_SKU
        self.channel = info.channel
        self.partial_product_key = key[-5:]
        self.license_status = 5
        self.grace_minutes = 0
        self.discovered_machine, self.discovered_port = None, 0
        return S_OK

    def _activate(self) -> int:
        if self.channel == "AVMA":
            return SL_E_IA_PARENT_PARTITION_NOT_ACTIVATED
        if self.channel != "KMS_CLIENT":
            return S_OK if self.license_status == 1 else SL_E_ONLINE_ACTIVATION_REFUSED
        if not self.kms_machine:
            return DNS_ERROR_RCODE_NAME_ERROR
        port = self.kms_port or KMS_PORT
        if not self._kms_answers(self.kms_machine, port):
            return SL_E_KMS_UNREACHABLE
        self.license_status = 1
        self.grace_minutes = _KMS_GRACE_MINUTES
        self.discovered_machine, self.discovered_port = self.kms_machine, port
        return S_OK

    def _kms_answers(self, host: str, port: int) -> bool:
        return self.kms_reachable and port == KMS_PORT and host.lower() in KMS_HOSTS.get(self.cloud, ())

    def _probe(self, host: str, port: int) -> dict[str, Any]:
        if self._kms_answers(host, port):
            return {"host": host, "port": port, "reachable": True, "error": None}
        # Azure's KMS names resolve everywhere but answer only where routed; other names don't resolve.
        known = any(host.lower() in hosts for hosts in KMS_HOSTS.values())
        error = "no answer within 3 s" if known else "socket error HostNotFound"
        return {"host": host, "port": port, "reachable": False, "error": error}

    def _facts(self, script: str, host: str, port: int) -> dict[str, Any]:
        return {
            "schema": 2,
            "script": script,
            "os": {
                "caption": self.caption,
                "version": nt_version(self.build),
                "build": self.build,
                "productType": self.product_type,
                "sku": self.sku,
                "editionId": self.edition_id,
            },
            "license": {
                "name": "" if self.null_name else self._product_name(),
                "description": "" if self.null_description else DESCRIPTIONS[self.channel],
                "productKeyChannel": PRODUCT_KEY_CHANNELS[self.channel] if self.build >= 9200 else None,
                "partialProductKey": self.partial_product_key,
                "licenseStatus": self.license_status,
                "graceMinutes": self.grace_minutes,
                "kmsMachine": self.kms_machine,
                "kmsPort": self.kms_port,
                "discoveredKmsMachine": self.discovered_machine,
                "discoveredKmsPort": self.discovered_port,
            },
            "kmsProbe": self._probe(host, port),
            "attestation": self._attestation(),
            "steps": [],
            "error": None,
        }

    def _attestation(self) -> dict[str, Any] | None:
        """Azure Edition's attestation check (guest contract v2); null on every other edition."""
        if not is_azure_edition(self.edition_id):
            return None
        if not self.imds_reachable:
            # The simulator's wording; the engine reads only that there is an error.
            return {"imdsReachable": False, "chainValid": None, "error": "IMDS attested document: no answer"}
        if not self.imds_chain_valid:
            return {
                "imdsReachable": True,
                "chainValid": False,
                "error": "X509Chain.Build failed: PartialChain",
            }
        return {"imdsReachable": True, "chainValid": True, "error": None}

    def _product_name(self) -> str:
        if self.build < 9200:
            prefix = "Windows Server(R)" if self.edition_id.startswith("Server") else "Windows(R) 7"
            return f"{prefix}, {self.edition_id} edition"
        return f"Windows(R), {self.edition_id} edition"


def _first_line(script: Sequence[str]) -> str:
    for chunk in script:
        for line in str(chunk).lstrip("\ufeff").splitlines():
            if line.strip():
                return line.strip()
    return ""


def _kms_param_problems(params: Mapping[str, str]) -> list[str]:
    problems = []
    if not _HOSTNAME.match(params.get("kmshost", "")):
        problems.append("KmsHost is not a host name")
    port = params.get("kmsport", "")
    if not _PORT_FORMAT.match(port) or not 1 <= int(port) <= 65535:
        problems.append("KmsPort is not a port number")
    return problems


# The conditional re-key's parameters (docs/guest-contract.md, "Conditional re-key"), lower-cased as
# run_script reads them, with the checks and words of remediate.ps1.
_EXPECT_PARAMETERS: Final = (
    "expectchannel",
    "expecteditionids",
    "expectskus",
    "expectbuild",
    "expectproducttypes",
    "refusekeychannels",
)
_EXPECT_FORMATS: Final = (
    ("expectchannel", re.compile(r"\A[A-Z_]{1,40}\Z"), "ExpectChannel is not a channel word"),
    (
        "expecteditionids",
        re.compile(r"\A[A-Za-z]{1,40}(?:,[A-Za-z]{1,40}){0,7}\Z"),
        "ExpectEditionIds is not a list of EditionIDs",
    ),
    ("expectskus", re.compile(r"\A[0-9]{1,10}(?:,[0-9]{1,10}){0,7}\Z"), "ExpectSkus is not a list of SKUs"),
    ("expectbuild", re.compile(r"\A[0-9]{1,6}\Z"), "ExpectBuild is not a build number"),
    (
        "expectproducttypes",
        re.compile(r"\A[1-3](?:,[1-3]){0,2}\Z"),
        "ExpectProductTypes is not a list of product types",
    ),
    (
        "refusekeychannels",
        re.compile(r"\A[A-Za-z0-9:]{1,40}(?:,[A-Za-z0-9:]{1,40}){0,15}\Z"),
        "RefuseKeyChannels is not a list of key channels",
    ),
)
_PLAIN_KEY_CHANNEL: Final = re.compile(r"\A[A-Za-z0-9:]{1,40}\Z")


def _conditional_param_problems(params: Mapping[str, str]) -> list[str]:
    problems = []
    if params.get("installkey", "") != "1":
        problems.append("a conditional re-key installs a key (InstallKey 1)")
    for name, pattern, problem in _EXPECT_FORMATS:
        if not pattern.match(params.get(name, "")):
            problems.append(problem)
    return problems


def unmet_preconditions(facts: Mapping[str, Any], params: Mapping[str, str]) -> list[str]:
    """The facts (as the script names them) that differ from a conditional re-key's parameters.

    Compared as remediate.ps1 does: the description contains the channel word (ordinal, case
    kept), EditionID, SKU, build and product type exactly equal to one of the given values (as
    text), a ProductKeyChannel absent, empty, or plain (letters, digits, colons) and starting with
    no refused prefix (ASCII case-insensitive), and the KMS probe reached the host.
    """
    os_facts, license_facts, probe = facts.get("os"), facts.get("license"), facts.get("kmsProbe")
    if facts.get("error") is not None or os_facts is None or license_facts is None:
        return ["facts"]
    failed = []
    if params["expectchannel"] not in str(license_facts["description"]):
        failed.append("channel")
    if str(os_facts["editionId"]) not in params["expecteditionids"].split(","):
        failed.append("editionId")
    if str(os_facts["sku"]) not in params["expectskus"].split(","):
        failed.append("sku")
    if str(os_facts["build"]) != params["expectbuild"]:
        failed.append("build")
    if str(os_facts["productType"]) not in params["expectproducttypes"].split(","):
        failed.append("productType")
    channel = license_facts["productKeyChannel"]
    if channel is not None and channel != "":
        refused = params["refusekeychannels"].split(",")
        plain = _PLAIN_KEY_CHANNEL.match(str(channel)) is not None
        if not plain or any(str(channel).lower().startswith(prefix.lower()) for prefix in refused):
            failed.append("productKeyChannel")
    if probe is None or not probe["reachable"]:
        failed.append("kmsProbe")
    return failed


def _before_facts(facts: Mapping[str, Any]) -> dict[str, Any] | None:
    os_facts, license_facts, probe = facts.get("os"), facts.get("license"), facts.get("kmsProbe")
    if facts.get("error") is not None or os_facts is None or license_facts is None:
        return None
    return {
        "editionId": os_facts["editionId"],
        "sku": os_facts["sku"],
        "build": os_facts["build"],
        "productType": os_facts["productType"],
        "productKeyChannel": license_facts["productKeyChannel"],
        "licenseStatus": license_facts["licenseStatus"],
        "kmsReachable": bool(probe is not None and probe["reachable"]),
    }


def _error_result(script: str, problems: list[str]) -> dict[str, Any]:
    return {
        "schema": 2,
        "script": script,
        "os": None,
        "license": None,
        "kmsProbe": None,
        "attestation": None,
        "steps": [],
        "error": {"step": "parameters", "hresult": hresult(E_INVALIDARG), "message": "; ".join(problems)},
    }


def _emit(printed: list[str], result: Mapping[str, Any]) -> str:
    """What the script writes: its progress lines, then the marked line last.

    Windows PowerShell's ConvertTo-Json escapes < > & ' as \\u003c etc.; so does this.
    """
    text = json.dumps(result, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return "\n".join([*printed, RESULT_MARKER + text])


def nt_version(build: int) -> str:
    """Win32_OperatingSystem.Version of a build: NT 6.0 2008, 6.1 2008 R2, 6.2 2012, 6.3 2012 R2, 10.0."""
    if build >= 10240:
        return f"10.0.{build}"
    if build >= 9600:
        return f"6.3.{build}"
    if build >= 9200:
        return f"6.2.{build}"
    if build >= 7600:
        return f"6.1.{build}"
    return f"6.0.{build}"


def _default_grace(channel: str, status: int) -> int:
    if status == 1:
        return {"KMS_CLIENT": _KMS_GRACE_MINUTES, "AVMA": _AVMA_GRACE_MINUTES}.get(channel, 0)
    return _OTHER_GRACE_MINUTES if status in (2, 3, 4, 6) else 0


def _pseudo_partial_key(seed: str) -> str:
    digest = hashlib.sha256(seed.lower().encode()).digest()
    return "".join(_KEY_ALPHABET[b % len(_KEY_ALPHABET)] for b in digest[:5])
