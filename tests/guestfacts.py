"""Builders of realistic guest facts for the pure tests (values as Windows reports them)."""

from __future__ import annotations

from shared.guest.facts import (
    AttestationFacts,
    GuestResult,
    KmsProbe,
    LicenseFacts,
    LicenseStatus,
    OsFacts,
    ScriptError,
    Step,
)

DESCRIPTIONS = {
    "AVMA": "Windows(R) Operating System, VIRTUAL_MACHINE_ACTIVATION channel",
    "KMS_CLIENT": "Windows(R) Operating System, VOLUME_KMSCLIENT channel",
    "MAK": "Windows(R) Operating System, VOLUME_MAK channel",
    "RETAIL": "Windows(R) Operating System, RETAIL channel",
    "OEM": "Windows(R) Operating System, OEM_DM channel",
    "TIMEBASED": "Windows(R) Operating System, TIMEBASED_EVAL channel",
}

SERVER_2022_DC = OsFacts(
    "Microsoft Windows Server 2022 Datacenter", "10.0.20348", 20348, 3, 8, "ServerDatacenter"
)
SERVER_2019_STD = OsFacts(
    "Microsoft Windows Server 2019 Standard", "10.0.17763", 17763, 3, 7, "ServerStandard"
)
MULTI_SESSION = OsFacts(
    "Microsoft Windows 11 Enterprise multi-session", "10.0.22631", 22631, 3, 175, "ServerRdsh"
)
AZURE_EDITION_2022 = OsFacts(
    "Microsoft Windows Server 2022 Datacenter: Azure Edition", "10.0.20348", 20348, 3, 407, "ServerTurbine"
)
ATTESTED = AttestationFacts(imds_reachable=True, chain_valid=True, error=None)
NO_IMDS = AttestationFacts(imds_reachable=False, chain_valid=None, error="The operation has timed out.")
BAD_CHAIN = AttestationFacts(imds_reachable=True, chain_valid=False, error="PartialChain")
ODD_EDITION = OsFacts(
    "Microsoft Windows Server 2022 Datacenter", "10.0.20348", 20348, 3, 8, "ServerHypothetical"
)


def license_facts(
    channel: str = "AVMA",
    status: int = 5,
    kms_machine: str | None = None,
    discovered: str | None = None,
    key_channel: str | None = None,
) -> LicenseFacts:
    return LicenseFacts(
        name="Windows(R), ServerDatacenter edition",
        description=DESCRIPTIONS[channel],
        product_key_channel=key_channel,
        partial_product_key="DV9BG",
        license_status=LicenseStatus(status),
        grace_minutes=0,
        kms_machine=kms_machine,
        kms_port=1688 if kms_machine else 0,
        discovered_kms_machine=discovered,
        discovered_kms_port=1688 if discovered else 0,
    )


def detected(
    os_facts: OsFacts | None = SERVER_2022_DC,
    lic: LicenseFacts | None = None,
    *,
    reachable: bool = True,
    error: ScriptError | None = None,
    attestation: AttestationFacts | None = None,
) -> GuestResult:
    return GuestResult(
        script="detect",
        os=os_facts,
        license=lic if lic is not None else license_facts(),
        kms_probe=KmsProbe("azkms.core.windows.net", 1688, reachable, None if reachable else "timed out"),
        error=error,
        attestation=attestation,
    )


def remediated(
    steps: list[tuple[str, str]],
    channel: str = "KMS_CLIENT",
    status: int = 1,
    *,
    os_facts: OsFacts = SERVER_2022_DC,
    attestation: AttestationFacts | None = None,
) -> GuestResult:
    return GuestResult(
        script="remediate",
        os=os_facts,
        license=license_facts(channel, status, "azkms.core.windows.net"),
        kms_probe=KmsProbe("azkms.core.windows.net", 1688, True, None),
        steps=tuple(Step(n, h) for n, h in steps),
        attestation=attestation,
    )
