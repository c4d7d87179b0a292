"""The decision table: a pure function of (VM facts, guest facts, settings) to an action.

Every row is unit-tested without a server. The safety rules of DESIGN.md live here and nowhere
else: never re-key a multi-session VM, never touch retail/MAK/OEM, never act on an edition the
catalog does not know, never act in audit mode (the workflow turns a planned action into
``would-remediate``), and a custom KMS host is left alone unless the operator allows overriding it.
Never make a VM worse: an AVMA VM that is still Licensed is not re-keyed while the KMS is
unreachable (the GVLK would drop its activation at once, with no way back); that row is the only
one whose answer depends on the mode, so that the audit shows the plan.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from shared.catalog import AVMA_MIN_BUILD, CatalogEntry, select_key
from shared.guest.facts import (
    POWERSHELL_VERSION_STEP,
    AttestationFacts,
    Channel,
    GuestResult,
    LicenseStatus,
    OsFacts,
)
from shared.model import OutcomeKind
from shared.settings import Mode, Settings
from shared.vm import VmFacts

# EditionID ServerTurbine / ServerTurbineCor. Compared ASCII case-insensitively, the rule the scripts
# use (String.StartsWith with StringComparison.OrdinalIgnoreCase; not -like, whose case-insensitivity
# follows the current culture): see is_azure_edition.
AZURE_EDITION_PREFIX = "ServerTurbine"
MULTI_SESSION_EDITION = "serverrdsh"
MULTI_SESSION_SKU = 175  # PRODUCT_SERVERRDSH


class Action(enum.StrEnum):
    """What to do inside the guest."""

    NONE = "none"
    REKEY = "rekey"  # AVMA → install the GVLK, set the Azure KMS, activate
    REPAIR = "repair"  # KMS client not licensed → set the Azure KMS, activate


@dataclass(frozen=True, slots=True)
class Decision:
    """An action to take, or the final outcome when there is none."""

    action: Action
    kind: OutcomeKind | None
    reason: str
    entry: CatalogEntry | None = None

    @classmethod
    def final(cls, kind: OutcomeKind, reason: str) -> Decision:
        return cls(Action.NONE, kind, reason)


# PowerState/<code> values ARM reports besides ``running`` (states-billing.md; the SDKs' PowerState):
# on the way down or down, the VM is not ours to start; on the way up, or unknown, it soon may be.
NOT_RUNNING_STATES = frozenset({"stopping", "stopped", "deallocating", "deallocated"})
TRANSITIONAL_STATES = frozenset({"starting", "stopping", "deallocating", "unknown"})
DEFERRED_POWER_REASONS = {"starting": "vm-starting", "unknown": "power-state-unknown"}


def gate(vm: VmFacts, settings: Settings) -> Decision | None:
    """Rows decided from ARM alone; ``None`` means: run detection in the guest.

    A VM seen only in a listing has no agent status (``agent_ready is None``), and possibly no
    power state; those rows are then left for the full read that precedes any Run Command, as is a
    transitional power state in a listing (it may have settled by the time of the read). A VM that
    is starting, or whose power state ARM does not know (or gives in a form not known here), is
    deferred, never skipped: it is about to run, and a final verdict would keep it unfixed.
    """
    if (vm.os_type or "").lower() != "windows":
        return Decision.final(OutcomeKind.SKIPPED, "not-windows")
    if is_opted_out(vm, settings.opt_out_tag):
        return Decision.final(OutcomeKind.SKIPPED, "opted-out")
    power = vm.power_state.lower() if vm.power_state is not None else None
    if power is not None and power != "running":
        listed = vm.agent_ready is None
        if listed and (power in TRANSITIONAL_STATES or power not in NOT_RUNNING_STATES):
            return None
        if power in NOT_RUNNING_STATES:
            return Decision.final(OutcomeKind.SKIPPED, "not-running")
        return Decision.final(OutcomeKind.DEFERRED, DEFERRED_POWER_REASONS.get(power, "power-state-unknown"))
    if vm.agent_ready is False:
        return Decision.final(OutcomeKind.DEFERRED, "agent-not-ready")
    return None


def is_opted_out(vm: VmFacts, tag_name: str) -> bool:
    """A VM opts out with the tag present and any value but false/no/0 (tag names are case-insensitive)."""
    for name, value in vm.tags.items():
        if name.lower() == tag_name.lower():
            return value.strip().lower() not in {"false", "no", "0"}
    return False


def decide(guest: GuestResult, settings: Settings) -> Decision:
    """Rows decided from the detection result."""
    if guest.error is not None and guest.error.step == POWERSHELL_VERSION_STEP:
        return Decision.final(OutcomeKind.FAILED, "powershell-version")
    if guest.error is not None or guest.os is None:
        return Decision.final(OutcomeKind.FAILED, "detection-error")  # incl. write-result
    os_facts = guest.os
    if os_facts.edition_id.lower() == MULTI_SESSION_EDITION or os_facts.sku == MULTI_SESSION_SKU:
        return Decision.final(OutcomeKind.SKIPPED, "multi-session")
    lic = guest.license
    if lic is None:
        return Decision.final(OutcomeKind.SKIPPED, "no-product-key")
    channel = lic.channel
    licensed = lic.license_status == LicenseStatus.LICENSED
    acts = channel is Channel.AVMA or (channel is Channel.KMS_CLIENT and not licensed)
    if acts and key_channel_contradicts(channel, lic.product_key_channel):
        return Decision.final(OutcomeKind.SKIPPED, "channel-mismatch")

    if channel is Channel.AVMA:
        if os_facts.build < AVMA_MIN_BUILD:
            # AVMA guests start at 2012 R2: these facts contradict themselves; never re-keyed.
            return Decision.final(OutcomeKind.SKIPPED, "avma-before-2012r2")
        entry = select_key(os_facts)
        if entry is None:
            return Decision.final(OutcomeKind.SKIPPED, "unknown-edition")
        reachable = guest.kms_probe is not None and guest.kms_probe.reachable
        if not reachable:
            audit = settings.mode is Mode.AUDIT
            if licensed:
                # Still activated by its host: a GVLK now would drop that at once, and nothing
                # activates it until the route works. Wait; the retry re-detects.
                if audit:
                    return Decision(Action.REKEY, None, "avma-licensed-kms-unreachable", entry)
                return Decision(Action.NONE, OutcomeKind.DEFERRED, "kms-unreachable", entry)
            if audit:
                # Not licensed: no worse off after the re-key; the GVLK activates once routed.
                return Decision(Action.REKEY, None, "avma-kms-unreachable", entry)
        return Decision(Action.REKEY, None, "avma-channel", entry)

    if channel is Channel.KMS_CLIENT:
        if licensed:
            problem = attestation_problem(guest)
            if problem is not None:
                return Decision.final(OutcomeKind.FAILED, problem)
            return Decision.final(OutcomeKind.HEALTHY, "kms-client-licensed")
        custom = custom_kms_host(guest, settings)
        if custom is None:
            return Decision(Action.REPAIR, None, "kms-client-unlicensed")
        if settings.allow_custom_kms_override:
            return Decision(Action.REPAIR, None, "custom-kms-overridden")
        return Decision.final(OutcomeKind.SKIPPED, "custom-kms")

    if channel in (Channel.RETAIL, Channel.MAK, Channel.OEM):
        if licensed:
            return Decision.final(OutcomeKind.HEALTHY, f"{channel.value.lower()}-licensed")
        return Decision.final(OutcomeKind.SKIPPED, f"channel-{channel.value.lower()}")

    return Decision.final(OutcomeKind.SKIPPED, "unknown-channel")


def custom_kms_host(guest: GuestResult, settings: Settings) -> str | None:
    """The KMS host the guest is set to (or discovered through DNS) when it is not the Azure KMS."""
    lic = guest.license
    if lic is None:
        return None
    cloud = settings.cloud
    named = (*cloud.azure_kms_hosts, *cloud.kms_ips, *cloud.retired_kms_ips, settings.kms_host)
    azure_hosts = {h.lower() for h in named}
    for host in (lic.kms_machine, lic.discovered_kms_machine):
        name = (host or "").strip().lower()
        if name and name.split(":", 1)[0] not in azure_hosts:
            return name
    return None


def is_azure_edition(os_facts: OsFacts) -> bool:
    """Windows Server Datacenter: Azure Edition (registry EditionID ServerTurbine*, any ASCII case).

    Windows writes the EditionID CamelCase (``ServerTurbine``, ``ServerTurbineCor``); public SKU
    lists print it lower-case, and the catalog matches EditionIDs without case, so case is not
    relied on. The scripts run the attestation check when ``editionId.StartsWith('ServerTurbine',
    OrdinalIgnoreCase)``; for an ASCII prefix that is exactly this test, and where the prefix is not
    ASCII this says False (casefold would map e.g. U+017F to "s"), so every EditionID judged Azure
    Edition here is one the scripts checked: never a false ``attestation-not-reported``.
    """
    head = os_facts.edition_id[: len(AZURE_EDITION_PREFIX)]
    return head.isascii() and head.lower() == AZURE_EDITION_PREFIX.lower()


def attestation_problem(result: GuestResult) -> str | None:
    """Why an Azure Edition VM would show the activation watermark despite its KMS activation.

    Microsoft's "Windows activation watermark continues to be displayed" (MicrosoftDocs/
    SupportArticles-docs support/azure/virtual-machines/windows/activation-watermark-appears.md):
    Azure Edition needs IMDS's attested document (cause 1: IMDS unreachable, or answering with an
    HTTP error status: ``attestation-imds-http:<status>``) and the intermediate certificates of its
    signing chain (cause 2). A result that does not report the check (null on Azure Edition) is
    never taken as a pass. ``None``: not Azure Edition, or both checks passed.
    """
    if result.os is None or not is_azure_edition(result.os):
        return None
    facts = result.attestation
    if facts is None:
        return "attestation-not-reported"
    if not facts.imds_reachable:
        status = imds_http_status(facts)
        if status is not None:
            return f"attestation-imds-http:{status}"
        return "attestation-imds-unreachable"
    if facts.chain_valid is not True:
        return "attestation-chain-invalid"
    return None


# The scripts start attestation.error with "HTTP <status>: " when IMDS answered with an HTTP error
# status (WebException.Response; docs/guest-contract.md): the address was reached, IMDS refused.
_IMDS_HTTP_STATUS = re.compile(r"HTTP ([1-5][0-9]{2}): ")


def imds_http_status(facts: AttestationFacts) -> int | None:
    """The HTTP status IMDS answered the attested-document request with, when the guest says so."""
    if facts.imds_reachable or facts.error is None:
        return None
    match = _IMDS_HTTP_STATUS.match(facts.error)
    return int(match.group(1)) if match else None


# SoftwareLicensingProduct.ProductKeyChannel values that clearly name a channel (slmgr /dlv prints
# them as "Product Key Channel"; public captures in docs/guest-contract.md). An AVMA key's value is
# not documented, so no value is expected of AVMA; only a value naming ANOTHER channel contradicts.
_KEY_CHANNELS = {
    "retail": "RETAIL",
    "volume:gvlk": "KMS_CLIENT",
    "volume:mak": "MAK",
    "volume:csvlk": "KMS_HOST",
}


def key_channel(product_key_channel: str | None) -> str | None:
    """The channel a ProductKeyChannel value clearly names, or None (absent or not known)."""
    text = (product_key_channel or "").strip().casefold()
    if text.startswith("oem:"):
        return "OEM"
    return _KEY_CHANNELS.get(text)


def key_channel_contradicts(channel: Channel, product_key_channel: str | None) -> bool:
    """True when ProductKeyChannel clearly names another channel than the Description does.

    Volume:GVLK next to an AVMA Description does not count: AVMA's own value is undocumented, and
    a GVLK in place of a GVLK changes nothing, so the re-key is safe either way.
    """
    named = key_channel(product_key_channel)
    if named is None or channel is Channel.UNKNOWN:
        return False
    if channel is Channel.AVMA and named == "KMS_CLIENT":
        return False
    return named != channel.value
