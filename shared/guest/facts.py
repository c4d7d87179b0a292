"""Typed facts read from a guest, and the parser of the scripts' marked JSON line.

The contract is docs/guest-contract.md. All judgement is made in Python on these facts; the
scripts only read and report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

RESULT_MARKER = "AVMA-REMEDIATOR-RESULT "
SCHEMA_VERSION = 1
WINDOWS_APPLICATION_ID = "55c92734-d682-4d71-983e-d6ec3f16059f"


class GuestOutputError(ValueError):
    """The Run Command output holds no valid result line (missing, truncated, garbled, wrong schema)."""


class Channel(enum.StrEnum):
    """Licensing channel, from the SPP Description token (locale-independent)."""

    AVMA = "AVMA"
    KMS_CLIENT = "KMS_CLIENT"
    MAK = "MAK"
    RETAIL = "RETAIL"
    OEM = "OEM"
    UNKNOWN = "UNKNOWN"


class LicenseStatus(enum.IntEnum):
    """SoftwareLicensingProduct.LicenseStatus."""

    UNLICENSED = 0
    LICENSED = 1
    OOB_GRACE = 2
    OOT_GRACE = 3
    NON_GENUINE_GRACE = 4
    NOTIFICATION = 5
    EXTENDED_GRACE = 6


@dataclass(frozen=True, slots=True)
class OsFacts:
    caption: str
    version: str
    build: int
    product_type: int
    sku: int
    edition_id: str


@dataclass(frozen=True, slots=True)
class LicenseFacts:
    name: str
    description: str
    product_key_channel: str | None
    partial_product_key: str | None
    license_status: LicenseStatus
    grace_minutes: int
    kms_machine: str | None
    kms_port: int
    discovered_kms_machine: str | None
    discovered_kms_port: int

    @property
    def channel(self) -> Channel:
        return channel_of(self.description)


@dataclass(frozen=True, slots=True)
class KmsProbe:
    host: str
    port: int
    reachable: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    hresult: str  # "0x" + 8 upper-case hex digits

    @property
    def ok(self) -> bool:
        return self.hresult == "0x00000000"


@dataclass(frozen=True, slots=True)
class ScriptError:
    step: str
    hresult: str
    message: str


@dataclass(frozen=True, slots=True)
class GuestResult:
    """One parsed result line."""

    script: str  # "detect" | "remediate"
    os: OsFacts | None
    license: LicenseFacts | None
    kms_probe: KmsProbe | None
    steps: tuple[Step, ...] = field(default_factory=tuple)
    error: ScriptError | None = None


def channel_of(description: str) -> Channel:
    """Map an SPP Description to a channel (table in docs/guest-contract.md)."""
    text = description.upper()
    if "VIRTUAL_MACHINE_ACTIVATION" in text:
        return Channel.AVMA
    if "VOLUME_KMSCLIENT" in text:
        return Channel.KMS_CLIENT
    if "VOLUME_MAK" in text:
        return Channel.MAK
    if "RETAIL" in text:
        return Channel.RETAIL
    if "OEM_" in text:
        return Channel.OEM
    return Channel.UNKNOWN


def parse_result(output: str, *, expected_script: str) -> GuestResult:
    """Find the last marker line in ``output`` and parse it; raise :class:`GuestOutputError` otherwise."""
    raise NotImplementedError  # implemented with the scripts (see docs/guest-contract.md)
