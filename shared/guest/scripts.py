"""The two Run Command scripts (package data) and the request bodies that run them.

Only parameter values ever carry caller-provided text: the script lines are the files as shipped,
so nothing a caller passes can become PowerShell code. Values are validated here too (and again in
the scripts) so that a bad host, port or key never reaches a VM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TypedDict

from shared.guest.facts import SCHEMA_VERSION
from shared.model import is_host_name

COMMAND_ID = "RunPowerShellScript"
_MARKER_LINE = re.compile(r"# avma-remediator guest script: (detect|remediate) v([0-9]+)")
_PRODUCT_KEY = re.compile(r"[A-Z0-9]{5}(?:-[A-Z0-9]{5}){4}")


class RunCommandParameter(TypedDict):
    name: str
    value: str


class RunCommandInput(TypedDict):
    """Body of ``POST .../virtualMachines/{vm}/runCommand`` (RunCommandInput, REST casing)."""

    commandId: str
    script: list[str]
    parameters: list[RunCommandParameter]


@dataclass(frozen=True, slots=True)
class GuestScript:
    """One guest script: its name and schema version (from the marker line) and its lines."""

    name: str
    version: int
    lines: tuple[str, ...]  # a tuple so that no caller can change the shared copy


INCLUDE = "# @include common.ps1"


def _read(file_name: str) -> str:
    text = resources.files("shared.guest").joinpath(file_name).read_text(encoding="utf-8")
    if not text.isascii():
        raise RuntimeError(f"{file_name} must be ASCII (Run Command and Windows PowerShell code pages)")
    return text


def _load(name: str) -> GuestScript:
    """The script as sent: ``<name>.ps1`` with its one include line replaced by ``common.ps1``.

    Run Command takes one self-contained script, so the helpers both scripts need live once in
    common.ps1 and are inserted here, at load time, never from caller input.
    """
    own = _read(f"{name}.ps1").splitlines()
    if own.count(INCLUDE) != 1:
        raise RuntimeError(f"{name}.ps1 must contain the line {INCLUDE!r} exactly once")
    at = own.index(INCLUDE)
    lines = tuple(own[:at] + _read("common.ps1").splitlines() + own[at + 1 :])
    marker = _MARKER_LINE.fullmatch(lines[0]) if lines else None
    if marker is None or marker.group(1) != name:
        raise RuntimeError(f"{name}.ps1 does not start with its marker line")
    version = int(marker.group(2))
    if version != SCHEMA_VERSION:
        raise RuntimeError(f"{name}.ps1 is schema v{version}, the parser reads v{SCHEMA_VERSION}")
    return GuestScript(name=name, version=version, lines=lines)


DETECT = _load("detect")
REMEDIATE = _load("remediate")


def detect_command(kms_host: str, kms_port: int) -> RunCommandInput:
    """Run Command body for the read-only detection script."""
    return _command(
        DETECT,
        [("KmsHost", _host(kms_host)), ("KmsPort", _port(kms_port))],
    )


def remediate_command(*, product_key: str | None, kms_host: str, kms_port: int) -> RunCommandInput:
    """Run Command body for the remediation script.

    ``product_key`` None means "KMS client repair": set the host and activate without installing a
    key. The ProductKey parameter is then left out (the script sees it empty).
    """
    parameters: list[tuple[str, str]] = []
    if product_key is None:
        install = "0"
    else:
        install = "1"
        parameters.append(("ProductKey", _key(product_key)))
    parameters += [("KmsHost", _host(kms_host)), ("KmsPort", _port(kms_port)), ("InstallKey", install)]
    return _command(REMEDIATE, parameters)


def _command(script: GuestScript, parameters: list[tuple[str, str]]) -> RunCommandInput:
    return {
        "commandId": COMMAND_ID,
        "script": list(script.lines),
        "parameters": [{"name": name, "value": value} for name, value in parameters],
    }


def _host(value: object) -> str:
    if not is_host_name(value):
        raise ValueError(f"KMS host {str(value)[:80]!r} is not a host name")
    return value


def _port(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"KMS port {str(value)[:20]!r} is not a port number (1-65535)")
    return str(value)


def _key(value: object) -> str:
    if not isinstance(value, str) or not _PRODUCT_KEY.fullmatch(value):
        raise ValueError("product key is not of the form XXXXX-XXXXX-XXXXX-XXXXX-XXXXX")
    return value


_CHANNEL_TOKEN = re.compile(r"[A-Z_]{1,40}")
_EDITION_ID = re.compile(r"[A-Za-z]{1,40}")
_KEY_CHANNEL_PREFIX = re.compile(r"[A-Za-z0-9:]{1,40}")
_MAX_LISTED = 8


def conditional_rekey_command(
    *,
    product_key: str,
    kms_host: str,
    kms_port: int,
    channel_token: str,
    edition_ids: tuple[str, ...],
    skus: tuple[int, ...],
    build: int,
    product_types: tuple[int, ...],
    refused_key_channels: tuple[str, ...],
) -> RunCommandInput:
    """The remediation script as a conditional re-key (docs/guest-contract.md, "Conditional re-key").

    It first reads the facts and acts (installs ``product_key``, sets the KMS, activates) only if
    the product's description contains ``channel_token``, the EditionID is one of ``edition_ids``
    (exactly), the SKU one of ``skus``, the build ``build``, the product type one of
    ``product_types``, the ProductKeyChannel absent or plain and starting with none of
    ``refused_key_channels``, and the KMS answers; else it changes nothing and reports the facts.
    """
    parameters = [
        ("ProductKey", _key(product_key)),
        ("KmsHost", _host(kms_host)),
        ("KmsPort", _port(kms_port)),
        ("InstallKey", "1"),
        ("ExpectChannel", _listed([channel_token], _CHANNEL_TOKEN, "channel token", most=1)),
        ("ExpectEditionIds", _listed(edition_ids, _EDITION_ID, "EditionID")),
        ("ExpectSkus", _numbers(skus, 0, 2**32 - 1, "SKU")),
        ("ExpectBuild", _numbers((build,), 1, 999_999, "build", most=1)),
        ("ExpectProductTypes", _numbers(product_types, 1, 3, "product type", most=3)),
        ("RefuseKeyChannels", _listed(refused_key_channels, _KEY_CHANNEL_PREFIX, "key channel", most=16)),
    ]
    return _command(REMEDIATE, parameters)


def _listed(values: object, pattern: re.Pattern[str], what: str, *, most: int = _MAX_LISTED) -> str:
    items = list(values) if isinstance(values, (list, tuple)) else []
    if not 1 <= len(items) <= most or not all(isinstance(v, str) and pattern.fullmatch(v) for v in items):
        raise ValueError(f"{what} list {str(values)[:80]!r}: 1 to {most} of {pattern.pattern}")
    return ",".join(items)


def _numbers(values: object, low: int, high: int, what: str, *, most: int = _MAX_LISTED) -> str:
    items = list(values) if isinstance(values, (list, tuple)) else []
    good = all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in items)
    if not 1 <= len(items) <= most or not good:
        raise ValueError(f"{what} list {str(values)[:80]!r}: 1 to {most} whole numbers in {low}..{high}")
    return ",".join(str(v) for v in items)
