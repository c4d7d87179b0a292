"""One Run Command per AVMA VM in the common case: a re-key carried by the first Run Command, on the
condition that the guest shows exactly the facts the decision table would re-key on (issue 12).

ARM's instance view names the guest's OS (``osName``, ``osVersion``); where that names one catalog
row (:func:`shared.catalog.entry_for_arm_os`), the first Run Command may be the remediation script
with that row's key and the facts the guest must show for the key to be the right one: the AVMA
channel token in the product's description, one of the row's EditionIDs and SKUs, its build, a
server product type, a ``ProductKeyChannel`` that names no other channel, and the cloud's KMS
reachable. The script reads them again and installs the key and activates only if every one
matches; otherwise it changes nothing and reports the facts it read, and the workflow decides on
them as on a detection (``shared.decide``), so a wrong guess costs nothing but the ordinary second
Run Command.

Judgement stays here. Before the command is offered, :func:`expectation_for` runs the decision
table on every set of facts the script would accept (each EditionID, SKU, product type and license
status, with the ``ProductKeyChannel`` values it could see) and offers it only when every one
decides ``rekey: avma-channel`` with this very row. The script's part is to compare. Only in
enforce mode: an audit never sends a key.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from itertools import product

from shared.catalog import CatalogEntry, entry_for_arm_os
from shared.decide import Action, decide, key_channel_contradicts
from shared.guest.facts import (
    BeforeFacts,
    Channel,
    GuestResult,
    KmsProbe,
    LicenseFacts,
    LicenseStatus,
    OsFacts,
)
from shared.settings import Mode, Settings
from shared.vm import VmFacts

# The SPP Description token of the AVMA channel (shared.guest.facts.channel_of reads it first).
AVMA_CHANNEL_WORD = "VIRTUAL_MACHINE_ACTIVATION"
# Server product types (Win32_OperatingSystem.ProductType): 2 domain controller, 3 server.
SERVER_PRODUCT_TYPES = (2, 3)
# ProductKeyChannel values the script refuses: any that starts with one of these, any ASCII case.
# They are the ones shared.decide reads as naming another channel than AVMA (Retail, MAK, a KMS
# host key, any OEM:...); a prefix refuses more than that table does, never less.
REFUSED_KEY_CHANNELS = ("Retail", "Volume:MAK", "Volume:CSVLK", "OEM:")
# What the script accepts as a ProductKeyChannel at all: absent or empty, or these characters only
# (so that no Unicode case folding or white space can make the two sides read a value differently).
_PLAIN_KEY_CHANNEL = re.compile(r"[A-Za-z0-9:]{1,40}")
# Values a ProductKeyChannel may take that the table does not refuse next to an AVMA description:
# absent (before Windows 8), Volume:GVLK (the same edition's GVLK replaced by itself) and the
# simulator's guess for AVMA (docs/guest-contract.md).
_ACCEPTED_KEY_CHANNEL_SAMPLES = (None, "Volume:GVLK", "Volume:AVMA")


@dataclass(frozen=True, slots=True)
class Expectation:
    """The facts a conditional re-key may act on, and the key it then installs."""

    entry: CatalogEntry
    build: int
    edition_ids: tuple[str, ...]
    skus: tuple[int, ...]
    product_types: tuple[int, ...] = SERVER_PRODUCT_TYPES
    channel_token: str = AVMA_CHANNEL_WORD
    refused_key_channels: tuple[str, ...] = REFUSED_KEY_CHANNELS

    def accepts(self, before: BeforeFacts) -> bool:
        """Whether facts the guest read are ones the script may act on (what it must have checked)."""
        return (
            before.edition_id in self.edition_ids
            and before.sku in self.skus
            and before.build == self.build
            and before.product_type in self.product_types
            and before.kms_reachable
            and key_channel_accepted(before.product_key_channel, self.refused_key_channels)
        )


def key_channel_accepted(value: str | None, refused: tuple[str, ...] = REFUSED_KEY_CHANNELS) -> bool:
    """The script's rule for ``ProductKeyChannel``: absent or empty, or plain ASCII that starts with
    no refused prefix (ASCII case-insensitive). Stricter than ``shared.decide`` by construction."""
    if value is None or value == "":
        return True
    if _PLAIN_KEY_CHANNEL.fullmatch(value) is None:
        return False
    return not any(value.lower().startswith(prefix.lower()) for prefix in refused)


def expectation_for(vm: VmFacts, settings: Settings) -> Expectation | None:
    """The conditional re-key for this VM, or None: not enforce mode, ARM names no single catalog
    row, or some set of facts the script would accept is one the table would not re-key on."""
    if settings.mode is not Mode.ENFORCE:
        return None
    entry = entry_for_arm_os(vm.os_name, vm.os_version)
    if entry is None:
        return None
    build = _build(vm.os_version)
    if build is None or build not in entry.builds:
        return None
    return _verified(entry, build, settings)


def _build(os_version: str) -> int | None:
    parts = os_version.strip().removeprefix("Microsoft Windows NT ").split(".")
    return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None


@functools.lru_cache(maxsize=256)
def _verified(entry: CatalogEntry, build: int, settings: Settings) -> Expectation | None:
    expectation = Expectation(entry=entry, build=build, edition_ids=entry.edition_ids, skus=entry.skus)
    if not _refusals_cover_the_table(expectation.refused_key_channels):
        return None
    for edition_id, sku, product_type, status, key_channel in product(
        expectation.edition_ids,
        expectation.skus,
        expectation.product_types,
        LicenseStatus,
        _ACCEPTED_KEY_CHANNEL_SAMPLES,
    ):
        facts = _facts(settings, edition_id, sku, build, product_type, status, key_channel)
        decision = decide(facts, settings)
        rekeys = decision.action is Action.REKEY and decision.reason == "avma-channel"
        if not rekeys or decision.entry != entry:
            return None
    return expectation


def _refusals_cover_the_table(refused: tuple[str, ...]) -> bool:
    """Every ProductKeyChannel the table reads as another channel is refused by the script's rule."""
    named = ("Retail", "Volume:MAK", "Volume:CSVLK", "OEM:DM", "OEM:SLP", "OEM:NONSLP", "Volume:GVLK")
    return all(
        not key_channel_accepted(value, refused)
        for value in named
        if key_channel_contradicts(Channel.AVMA, value)
    )


def _facts(
    settings: Settings,
    edition_id: str,
    sku: int,
    build: int,
    product_type: int,
    status: LicenseStatus,
    key_channel: str | None,
) -> GuestResult:
    """A detection result with these facts (the rest as an AVMA guest reports it)."""
    return GuestResult(
        script="detect",
        os=OsFacts(
            caption="", version="", build=build, product_type=product_type, sku=sku, edition_id=edition_id
        ),
        license=LicenseFacts(
            name="",
            description=f"Windows(R) Operating System, {AVMA_CHANNEL_WORD} channel",
            product_key_channel=key_channel,
            partial_product_key=None,
            license_status=status,
            grace_minutes=0,
            kms_machine=None,
            kms_port=0,
            discovered_kms_machine=None,
            discovered_kms_port=0,
        ),
        kms_probe=KmsProbe(host=settings.kms_host, port=settings.kms_port, reachable=True, error=None),
    )


def before_as_result(before: BeforeFacts) -> GuestResult:
    """The facts a met conditional re-key read, as a result the hints read ("it was AVMA")."""
    return GuestResult(
        script="detect",
        os=None,
        license=LicenseFacts(
            name="",
            description=f"Windows(R) Operating System, {AVMA_CHANNEL_WORD} channel",
            product_key_channel=before.product_key_channel,
            partial_product_key=None,
            license_status=before.license_status,
            grace_minutes=0,
            kms_machine=None,
            kms_port=0,
            discovered_kms_machine=None,
            discovered_kms_port=0,
        ),
        kms_probe=None,
    )
