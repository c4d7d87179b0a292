"""The credential for ARM: managed identity where the platform offers one, else DefaultAzureCredential."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
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


class SingleFlightCredential:
    """The first token request per scope set made once, over a credential whose cache is then shared.

    azure-identity caches tokens per credential instance, in memory, and "the in-memory cache may be
    cleared by creating a new credential instance" (Azure/azure-sdk-for-python
    sdk/identity/azure-identity/TOKEN_CACHING.md; the managed-identity client keeps its ``TokenCache``
    in ``azure/identity/_internal/managed_identity_client.py``). Its async ``get_token`` holds no lock
    (``azure/identity/aio/_internal/get_token_mixin.py``: look in the cache, else request), so
    invocations that start together on a cold process would each ask the identity endpoint. Here the
    first call per scope set holds a lock; those that arrive meanwhile wait and then find its token in
    the cache. Once a call has succeeded, calls go straight through: a refresh is azure-identity's
    (it asks again when less than 300 s are left, at most every 30 s, and keeps the valid token if
    the refresh fails, ``azure/identity/_internal/utils.py`` ``get_refresh_status``), and callers
    are not held behind one slow refresh. Bound to the loop it first waits on (``asyncio.Lock``), as
    the per-loop client cache (``shared.clients``) is.
    """

    def __init__(self, inner: AsyncTokenCredential) -> None:
        self._inner = inner
        self._locks: dict[tuple[object, ...], asyncio.Lock] = {}
        self._warm: set[tuple[object, ...]] = set()

    @contextlib.asynccontextmanager
    async def _first(self, key: tuple[object, ...]) -> AsyncIterator[None]:
        if key in self._warm:
            yield
            return
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            yield
            self._warm.add(key)

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        async with self._first(("token", scopes, claims, tenant_id, enable_cae)):
            return await self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """What azure-core's bearer policy calls when a credential has it (AsyncSupportsTokenInfo)."""
        given = options or {}
        inner = self._inner
        async with self._first(("info", scopes, tuple(sorted(given.items())))):
            if isinstance(inner, AsyncSupportsTokenInfo):
                return await inner.get_token_info(*scopes, options=options)
            token = await inner.get_token(
                *scopes,
                claims=given.get("claims"),
                tenant_id=given.get("tenant_id"),
                enable_cae=bool(given.get("enable_cae", False)),
            )
            return AccessTokenInfo(token.token, token.expires_on)

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> SingleFlightCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
