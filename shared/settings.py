"""Every setting the engine reads, read once from the environment and validated up front.

A bad value stops the run before anything touches a VM (the CLI exits 2), and every problem is
reported at once rather than one per attempt.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from shared.clouds import CLOUDS, CloudProfile

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# RFC 1123 host name (letters, digits, hyphens, dots); no spaces, quotes or shell characters.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Azure tag names may not contain < > % & \ ? /
_TAG_NAME = re.compile(r"^[^<>%&\\?/]{1,512}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def is_subscription_id(text: str) -> bool:
    """Subscription ids are GUIDs."""
    return bool(_GUID.match(text))


class ConfigError(ValueError):
    """One or more settings are missing or invalid; the message lists each problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class Mode(enum.StrEnum):
    """``audit`` never changes a VM; ``enforce`` remediates."""

    AUDIT = "audit"
    ENFORCE = "enforce"


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one engine instance."""

    cloud: CloudProfile
    mode: Mode = Mode.AUDIT
    arm_endpoint: str = ""
    ca_bundle: str | None = None
    subscriptions: tuple[str, ...] = ()
    opt_out_tag: str = "avma-remediator-opt-out"
    allow_custom_kms_override: bool = False
    kms_host: str = ""
    kms_port: int = 1688
    max_concurrency: int = 16
    run_command_timeout_s: float = 900.0
    poll_interval_s: float = 10.0

    @property
    def kms_target(self) -> str:
        return f"{self.kms_host}:{self.kms_port}"

    def with_mode(self, mode: Mode) -> Settings:
        return replace(self, mode=mode)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise :class:`ConfigError` naming each bad one."""
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        cloud_name = get("AZURE_CLOUD", "AzureCloud") or "AzureCloud"
        cloud = CLOUDS.get(cloud_name)
        if cloud is None:
            problems.append(f"AZURE_CLOUD={cloud_name!r}: expected one of {', '.join(CLOUDS)}")
            cloud = CLOUDS["AzureCloud"]

        mode_text = get("REMEDIATION_MODE", "audit").lower() or "audit"
        try:
            mode = Mode(mode_text)
        except ValueError:
            problems.append(f"REMEDIATION_MODE={mode_text!r}: expected 'audit' or 'enforce'")
            mode = Mode.AUDIT

        arm_endpoint = get("ARM_ENDPOINT") or cloud.arm_endpoint
        if not arm_endpoint.startswith("https://"):
            problems.append(f"ARM_ENDPOINT={arm_endpoint!r}: must be an https:// URL")
        arm_endpoint = arm_endpoint.rstrip("/")

        ca_bundle = get("AZURE_CA_BUNDLE") or None
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            problems.append(f"AZURE_CA_BUNDLE={ca_bundle!r}: no such file")

        subscriptions = tuple(s for s in re.split(r"[\s,;]+", get("TARGET_SUBSCRIPTIONS")) if s)
        for sub in subscriptions:
            if not _GUID.match(sub):
                problems.append(f"TARGET_SUBSCRIPTIONS: {sub[:60]!r} is not a subscription id (GUID)")

        opt_out_tag = get("OPT_OUT_TAG", "avma-remediator-opt-out")
        if not _TAG_NAME.match(opt_out_tag):
            problems.append(f"OPT_OUT_TAG={opt_out_tag!r}: not a valid Azure tag name")

        allow_override = _bool(get("ALLOW_CUSTOM_KMS_OVERRIDE"), "ALLOW_CUSTOM_KMS_OVERRIDE", problems)

        kms_host = get("KMS_HOST") or cloud.kms_host
        if not _HOSTNAME.match(kms_host):
            problems.append(f"KMS_HOST={kms_host[:80]!r}: not a host name")
        kms_port = _number(get("KMS_PORT"), "KMS_PORT", cloud.kms_port, 1, 65535, problems, whole=True)
        concurrency = _number(get("MAX_CONCURRENCY"), "MAX_CONCURRENCY", 16, 1, 512, problems, whole=True)
        timeout = _number(
            get("RUN_COMMAND_TIMEOUT_SECONDS"), "RUN_COMMAND_TIMEOUT_SECONDS", 900, 0.01, 5400, problems
        )
        poll = _number(get("POLL_INTERVAL_SECONDS"), "POLL_INTERVAL_SECONDS", 10, 0.0, 300, problems)

        if problems:
            raise ConfigError(problems)
        return cls(
            cloud=cloud,
            mode=mode,
            arm_endpoint=arm_endpoint,
            ca_bundle=ca_bundle,
            subscriptions=subscriptions,
            opt_out_tag=opt_out_tag,
            allow_custom_kms_override=allow_override,
            kms_host=kms_host.lower(),
            kms_port=int(kms_port),
            max_concurrency=int(concurrency),
            run_command_timeout_s=float(timeout),
            poll_interval_s=float(poll),
        )


def _bool(text: str, name: str, problems: list[str]) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low not in _FALSE:
        problems.append(f"{name}={text!r}: expected true or false")
    return False


def _number(
    text: str,
    name: str,
    default: float,
    low: float,
    high: float,
    problems: list[str],
    *,
    whole: bool = False,
) -> float:
    if not text:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        problems.append(f"{name}={text!r}: expected a {'whole ' if whole else ''}number")
        return default
    if not low <= value <= high:
        problems.append(f"{name}={text!r}: must be between {low:g} and {high:g}")
        return default
    return value
