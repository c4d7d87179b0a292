"""Deterministic estate recipes: ``count`` VMs in a given mix, the same for the same seed.

The counts per category are exact (largest remainder), not sampled, so a benchmark of 2,000 VMs
with ``avma: 0.05`` has exactly 100 AVMA VMs to fix. Output is the estate file format (plain dicts),
validated afterwards like any hand-written estate.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping
from typing import Any, Final

from simulator.estate import OPT_OUT_TAG, EstateError
from simulator.guest import PRODUCT_UNLICENSED

# (caption, build, productType, EditionID, OperatingSystemSKU)
OsProfile = tuple[str, int, int, str, int]

SERVER_PROFILES: Final[tuple[OsProfile, ...]] = (
    ("Microsoft Windows Server 2012 R2 Standard", 9600, 3, "ServerStandard", 7),
    ("Microsoft Windows Server 2012 R2 Datacenter", 9600, 3, "ServerDatacenter", 8),
    ("Microsoft Windows Server 2016 Standard", 14393, 3, "ServerStandard", 7),
    ("Microsoft Windows Server 2016 Datacenter", 14393, 3, "ServerDatacenter", 8),
    ("Microsoft Windows Server 2019 Standard", 17763, 3, "ServerStandard", 7),
    ("Microsoft Windows Server 2019 Datacenter", 17763, 3, "ServerDatacenter", 8),
    ("Microsoft Windows Server 2019 Datacenter", 17763, 3, "ServerDatacenter", 12),
    ("Microsoft Windows Server 2022 Standard", 20348, 3, "ServerStandard", 7),
    ("Microsoft Windows Server 2022 Datacenter", 20348, 3, "ServerDatacenter", 8),
    ("Microsoft Windows Server 2022 Datacenter: Azure Edition", 20348, 3, "ServerTurbine", 407),
    ("Microsoft Windows Server 2025 Standard", 26100, 3, "ServerStandard", 7),
    ("Microsoft Windows Server 2025 Datacenter", 26100, 3, "ServerDatacenter", 8),
    ("Microsoft Windows Server 2025 Datacenter: Azure Edition", 26100, 3, "ServerTurbine", 407),
)
CLIENT_PROFILES: Final[tuple[OsProfile, ...]] = (
    ("Microsoft Windows 10 Enterprise", 19045, 1, "Enterprise", 4),
    ("Microsoft Windows 11 Enterprise", 22631, 1, "Enterprise", 4),
    ("Microsoft Windows 11 Enterprise", 26100, 1, "Enterprise", 4),
)
MULTI_SESSION: Final[OsProfile] = (
    "Microsoft Windows 11 Enterprise multi-session",
    22631,
    3,
    "ServerRdsh",
    175,
)
# AVMA exists only on editions with an AVMA key (simulator.guest.avma_problem), and those the
# catalog knows; what it cannot match is a VM whose facts disagree: here OperatingSystemSKU reads
# PRODUCT_UNLICENSED (0xABCDABCD), GetProductInfo's value for an invalid or expired license.
UNKNOWN_EDITION: Final[OsProfile] = (
    "Microsoft Windows Server 2019 Datacenter",
    17763,
    3,
    "ServerDatacenter",
    PRODUCT_UNLICENSED,
)

AZURE_KMS: Final = "azkms.core.windows.net:1688"
CUSTOM_KMS: Final = "kms.contoso.local:1688"

# The categories a mix can name (what each means: docs/simulator.md).
DEFAULT_MIX: Final[Mapping[str, float]] = {"avma": 0.05, "linux": 0.2}
CATEGORIES: Final[tuple[str, ...]] = (
    "avma",
    "avma_unreachable",
    "avma_deallocated",
    "avma_agent_not_ready",
    "avma_opted_out",
    "avma_busy",
    "kms_healthy",
    "kms_unlicensed",
    "kms_custom",
    "retail",
    "mak",
    "oem",
    "multi_session",
    "unknown_edition",
    "client_kms",
    "linux",
    "deallocated",
)


def generate_vms(
    *, count: int, seed: int, mix: Mapping[str, float], subscriptions: int
) -> tuple[list[str], list[dict[str, Any]]]:
    """Subscription ids and VM dicts (estate file format) for this recipe."""
    for name in mix:
        if name not in CATEGORIES:
            raise EstateError(f"$.generate.mix.{name}", f"unknown category (known: {', '.join(CATEGORIES)})")
    # No mix: the defaults. A mix: exactly those fractions; whatever they leave is kms_healthy.
    fractions = dict.fromkeys(CATEGORIES, 0.0)
    fractions.update(mix or DEFAULT_MIX)
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise EstateError("$.generate.mix", f"fractions add up to {total:g}, more than 1")
    fractions["kms_healthy"] += max(0.0, 1.0 - total)
    counts = _exact_counts(count, fractions)
    rng = random.Random(seed)
    subs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(subscriptions)]
    categories = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(categories)
    vms = [_vm(i, category, subs[i % subscriptions], rng) for i, category in enumerate(categories)]
    return subs, vms


def _exact_counts(count: int, fractions: Mapping[str, float]) -> dict[str, int]:
    total = sum(fractions.values()) or 1.0
    raw = {name: count * value / total for name, value in fractions.items()}
    counts = {name: math.floor(value) for name, value in raw.items()}
    left = count - sum(counts.values())
    by_remainder = sorted(raw, key=lambda name: (-(raw[name] - counts[name]), name))
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def _vm(index: int, category: str, sub: str, rng: random.Random) -> dict[str, Any]:
    rg = f"rg-{['app', 'data', 'web', 'ops'][index % 4]}-{index // 250:02d}"
    name = f"vm-{category.replace('_', '-')[:20]}-{index:05d}"
    vm: dict[str, Any] = {
        "id": f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}",
        "os": "Windows",
        "powerState": "running",
        "agentReady": True,
        "tags": {"env": rng.choice(["prod", "test", "dev"])},
        "location": rng.choice(["westeurope", "northeurope", "eastus2"]),
    }
    if category == "linux":
        vm["os"] = "Linux"
        return vm
    profile = rng.choice(SERVER_PROFILES)
    channel, status, reachable = "KMS_CLIENT", 1, True
    kms: str | None = AZURE_KMS
    if category.startswith("avma"):
        channel, status, kms = "AVMA", 5, None
        if category == "avma_unreachable":
            reachable = False
        elif category == "avma_deallocated":
            vm["powerState"] = "deallocated"
        elif category == "avma_agent_not_ready":
            vm["agentReady"] = False
        elif category == "avma_opted_out":
            vm["tags"][OPT_OUT_TAG] = "true"
        elif category == "avma_busy":
            vm["busySeconds"] = 0.5
    elif category == "kms_unlicensed":
        status, kms = 5, rng.choice([None, AZURE_KMS])
    elif category == "kms_custom":
        status, kms = rng.choice([1, 5]), CUSTOM_KMS
    elif category in ("retail", "mak", "oem"):
        channel, status, kms = category.upper(), rng.choice([1, 1, 1, 5]), None
    elif category == "multi_session":
        # AVMA is for Windows Server guests only: a multi-session VM is a KMS client, its key the
        # one that must never be replaced by Enterprise's.
        profile, status, kms = MULTI_SESSION, rng.choice([1, 5]), rng.choice([None, AZURE_KMS])
    elif category == "unknown_edition":
        profile, channel, status, kms = UNKNOWN_EDITION, "AVMA", 5, None
    elif category == "client_kms":
        profile = rng.choice(CLIENT_PROFILES)
    elif category == "deallocated":
        vm["powerState"] = rng.choice(["deallocated", "stopped"])
    if vm["powerState"] != "running":
        vm["agentReady"] = False
    caption, build, product_type, edition, sku = profile
    vm["guest"] = {
        "caption": caption,
        "build": build,
        "productType": product_type,
        "editionId": edition,
        "sku": sku,
        "channel": channel,
        "licenseStatus": status,
        "kmsHost": kms,
        "kmsReachable": reachable,
    }
    return vm
