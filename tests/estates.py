"""Estate-file VM entries for tests (the format of docs/simulator.md), realistic by default."""

from __future__ import annotations

from typing import Any

_AUTO: Any = object()


def windows_vm(
    vm_id: str,
    *,
    channel: str = "AVMA",
    status: int | None = None,
    kms_host: str | None = _AUTO,
    reachable: bool = True,
    edition: str = "ServerDatacenter",
    sku: int = 8,
    build: int = 20348,
    caption: str = "Microsoft Windows Server 2022 Datacenter",
    product_type: int = 3,
    power: str = "running",
    agent: bool = True,
    tags: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A running Windows Server 2022 Datacenter VM; a KMS client is licensed on the Azure KMS unless
    told otherwise, anything else has license status 5 and no KMS host. ``extra`` keys (estate VM
    keys such as ``busySeconds`` or ``powerState``) are merged last and win."""
    kms = channel == "KMS_CLIENT"
    return {
        "id": vm_id,
        "os": "Windows",
        "powerState": power,
        "agentReady": agent,
        "tags": tags or {},
        "guest": {
            "caption": caption,
            "build": build,
            "productType": product_type,
            "editionId": edition,
            "sku": sku,
            "channel": channel,
            "licenseStatus": status if status is not None else (1 if kms else 5),
            "kmsHost": ("azkms.core.windows.net:1688" if kms else None) if kms_host is _AUTO else kms_host,
            "kmsReachable": reachable,
        },
        **extra,
    }


# What azure-identity reads itself (its EnvironmentCredential and ManagedIdentityCredential), besides
# the engine's own settings: a developer's service principal or identity must not leak into a run.
_IDENTITY_ENV = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
)


def settings_a_run_reads() -> frozenset[str]:
    """Every environment variable a CLI run reads (the engine's, found in shared/ by
    tests/test_infra_contract.py, and azure-identity's), for tests that run on a clean environment."""
    from tests.test_infra_contract import code_settings

    return code_settings() | frozenset(_IDENTITY_ENV)
