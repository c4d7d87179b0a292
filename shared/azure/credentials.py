"""The credential for ARM: managed identity where the platform offers one, else DefaultAzureCredential."""

from __future__ import annotations

import os
from collections.abc import Mapping

from azure.core.credentials_async import AsyncTokenCredential
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

from shared.settings import Settings


def make_credential(settings: Settings, env: Mapping[str, str] | None = None) -> AsyncTokenCredential:
    """App Service / Functions (and the simulator) expose IDENTITY_ENDPOINT: use that identity directly.

    ``AZURE_CLIENT_ID`` selects a user-assigned identity. Elsewhere (an admin's laptop) the default
    chain applies, e.g. ``az login``, with the authority of the configured cloud.
    """
    env = os.environ if env is None else env
    client_id = env.get("AZURE_CLIENT_ID") or None
    if env.get("IDENTITY_ENDPOINT"):
        return ManagedIdentityCredential(client_id=client_id)
    return DefaultAzureCredential(
        authority=settings.cloud.authority_host, managed_identity_client_id=client_id
    )
